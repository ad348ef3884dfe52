// attention.cpp — flash attention forward/backward on the CPU (math in attention.h).
//
// Layout choice: queries on the vector lanes.
// ----------------------------------------------
// A tile of kBr queries is transposed once into Qᵀ (D × kBr, pre-multiplied by
// the scale), and score tiles are kept transposed too: Sᵀ (keys × queries).
// Then every per-query quantity of the softmax (running max, running sum,
// rescale factor, log-sum-exp) is a vector along the lanes, and the row
// reductions of the softmax become lane-wise max/add down the rows of Sᵀ —
// plain vertical SIMD, no horizontal reductions. K and V are never packed:
// they are only read as broadcast scalars (one K[j][d] or V[j][d] times a
// vector of queries), straight from the caller's strided memory.
//
// Every product is one small GEMM of the same form (block_gemm below):
//   C[r][c] (+)= Σ_p A[r·ars + p·aps] · B[p·ldb + c]     (c along vectors)
// computed by a register-tiled micro-kernel (MR rows × NV vectors of
// accumulators, one broadcast of A times NV vectors of B per step of p).
//
// Forward, for one query tile (queries i, lanes) against key tiles j:
//   Sᵀ   = K_j · (s·Qᵀ)                          (nk × W)   GEMM, p = d
//   mask: Sᵀ[j][i] = −inf where key j is hidden from query i
//   online softmax (per query lane i; m = running max, l = running sum):
//     m' = max(m, max_j Sᵀ[j][i])
//     Pᵀ[j][i] = exp(Sᵀ[j][i] − m')
//     α  = exp(m − m')                           (rescales what came before)
//     l' = α·l + Σ_j Pᵀ[j][i]
//     Oᵀ[d][i] = α·Oᵀ[d][i] + Σ_j V[j][d]·Pᵀ[j][i]   GEMM, p = j
//   after the last key tile: O[i][d] = Oᵀ[d][i] / l,  L_i = m + log l.
// By induction Oᵀ/l = Σ_j exp(S_ij − m) V_j / Σ_j exp(S_ij − m) for all keys
// seen so far, and m cancels: this is softmax(S) V exactly (in real
// arithmetic). Causal tiles wholly above the diagonal are never visited;
// only tiles crossing it are masked element-wise. A query with no visible
// key keeps m = −inf, l = 0: we use 0 in place of m' inside exp (so no
// −inf − (−inf) = NaN appears) and write O = 0, L = −inf.
// Non-finite inputs follow the reference (docs/kernels.md): NaN and +inf
// scores reach l through exp (NaN), so O and L come out NaN for that query;
// a query that sees keys whose scores are all −inf ends with l = 0 and gets
// O = L = NaN (0/0), told apart from one that sees no key by the masks, not
// by l. Hidden keys' V rows never enter O: a masked tile whose V rows are
// not all finite takes an exact loop that skips the hidden pairs.
// The rescale α·Oᵀ is applied as the PV GEMM stores its tile (C = α·C + acc,
// one FMA), and only when some lane's max moved.
//
// Forward cost on Zen 3 (AVX2, 1 thread, causal B=4 H=12 T=1024 D=64, min of
// 7): 120 ms → 92 ms (54 → 70 GFLOP/s, ~70 % of the FMA peak). The
// steps, each measured alone: tasks head by head so K, V stay cached (~17 %),
// the online softmax in one sweep per 8-lane column with exp_avx2 (~4 %),
// 8×8 register transposes for Qᵀ in and O out (2–3 %, 8 % at T = 256), a
// 4-row kernel for the last rows of 64 (1–3 %), α fused into the GEMM (~1 %).
// Now the two GEMM loops are ~80 % of the time (at ~85 % of peak), exp ~10 %.
//
// Backward (dO given; D_i = Σ_d dO_id O_id = Σ_j P_ij dP_ij):
//   P_ij  = exp(S_ij − L_i)                      recomputed from the saved L
//   dV   += Pᵀ dO                 (O = P V)
//   dP    = dO Vᵀ
//   dS_ij = P_ij (dP_ij − D_i)    (softmax: dS_ij = P_ij (dP_ij − Σ_k P_ik dP_ik))
//   dQ   += s · dS K,  dK += s · dSᵀ Q            (S = s · Q Kᵀ)
// Loop order: key tiles outside (their dK, dV accumulate in a small buffer),
// query tiles inside (dQ accumulates in a per-head buffer). One task owns
// one (batch, head) — or, when there are few heads, one interleaved share of
// its key tiles with a private dQ that is summed afterwards in a fixed order
// — so no two threads ever write the same memory and the result does not
// depend on the thread count. For L = −inf (a query that saw nothing) we use
// L = +inf, so every recomputed P of that query is exactly 0. In a masked
// tile, P and dS are set to 0 at hidden pairs after they are computed (a
// NaN L or dP must not stay there), and the dV, dK, dQ products skip hidden
// pairs when the head's dO, Q or K hold an inf or NaN (block_gemm_masked).
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu/reduce.h"
#include "cpu/vexp.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace numformer::cpu {
namespace {

#ifndef NF_ATTN_BR
#define NF_ATTN_BR 64
#endif
#ifndef NF_ATTN_NV
#define NF_ATTN_NV 4
#endif
constexpr index_t kBr = NF_ATTN_BR;  // queries per tile (vector lanes of Sᵀ, Oᵀ)
#ifndef NF_ATTN_BC
#define NF_ATTN_BC 64
#endif
constexpr index_t kBc = NF_ATTN_BC;  // keys per tile (rows of Sᵀ)
constexpr index_t kMaxLanes = 16;  // the widest vector: 16 floats (AVX-512)

index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
index_t round_up(index_t a, index_t b) { return ceil_div(a, b) * b; }

// One instruction-set variant: VB-byte vectors, MR×NVMAX accumulator tile.
template <typename T_, int VB_, int MR_, int NVMAX_>
struct Cfg {
    using T = T_;
    static constexpr int VB = VB_, MR = MR_, NVMAX = NVMAX_;
    static constexpr int VL = VB / int(sizeof(T));  // lanes per vector
    static_assert(NVMAX >= 1 && NVMAX <= 4, "micro-kernel dispatch handles 1..4 vectors");
    static_assert(VL <= kMaxLanes && kBr % VL == 0, "a query tile is whole vectors");
};

// AVX-512: 32 zmm; 4×4 accumulators + 4 B vectors + a broadcast.
#ifndef NF_ATTN_MR
#define NF_ATTN_MR 4
#endif
template <typename T> using Avx512Cfg = Cfg<T, 64, NF_ATTN_MR, NF_ATTN_NV>;
// AVX2+FMA: 16 ymm; 6×2 accumulators + 2 B vectors + a broadcast.
template <typename T> using Avx2Cfg = Cfg<T, 32, 6, 2>;
// Baseline (SSE2 / NEON): 16-byte vectors, 4×2 accumulators.
template <typename T> using GenericCfg = Cfg<T, 16, 4, 2>;

// ---------------------------------------------------------------------------
// Micro-kernel: C[0:m, 0:NV·VL] (+)= Σ_{p<np} A(r, p) · B[p, :]
//   A(r, p) = a[min(r, m−1)·ars + p·aps]   (rows past m repeat the last one,
//             so the loop has no edge case; only m rows are stored)
//   B[p, :] = b[p·ldb + 0 .. NV·VL)
// ---------------------------------------------------------------------------
template <class C, int MR, int NV>
NF_INLINE void micro(index_t np, const typename C::T* NF_RESTRICT a, index_t ars, index_t aps,
                     index_t m, const typename C::T* NF_RESTRICT b, index_t ldb,
                     typename C::T* NF_RESTRICT c, index_t ldc, bool accumulate,
                     const typename C::T* NF_RESTRICT cs) {
    using T = typename C::T;
    constexpr int VL = C::VL;
    index_t ro[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) ro[r] = std::min<index_t>(r, m - 1) * ars;
#if defined(__GNUC__) || defined(__clang__)
    typedef T V __attribute__((vector_size(C::VB)));
    V acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V{};
    for (index_t p = 0; p < np; ++p, a += aps, b += ldb) {
        V bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + v * VL, sizeof(V));
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const T ar = a[ro[r]];
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[r][v] += bv[v] * ar;  // FMA
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
        if (r >= m) break;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
            V cv = acc[r][v];
            if (accumulate) {
                V old;
                std::memcpy(&old, c + r * ldc + v * VL, sizeof(V));
                if (cs != nullptr) {
                    V sv;
                    std::memcpy(&sv, cs + v * VL, sizeof(V));
                    cv += old * sv;  // one FMA
                } else {
                    cv += old;
                }
            }
            std::memcpy(c + r * ldc + v * VL, &cv, sizeof(V));
        }
    }
#else
    T acc[MR][NV * VL] = {};
    for (index_t p = 0; p < np; ++p, a += aps, b += ldb)
        for (int r = 0; r < MR; ++r)
            for (int j = 0; j < NV * VL; ++j) acc[r][j] += a[ro[r]] * b[j];
    for (index_t r = 0; r < m; ++r)
        for (int j = 0; j < NV * VL; ++j)
            c[r * ldc + j] = (accumulate ? c[r * ldc + j] * (cs ? cs[j] : T(1)) : T(0)) + acc[r][j];
#endif
}

// One MR-row block of C for nv vectors of columns (the micro-kernel for nv).
template <class C, int MR>
NF_INLINE void micro_rows(int nv, index_t np, const typename C::T* a, index_t ars, index_t aps,
                          index_t m, const typename C::T* b, index_t ldb, typename C::T* c,
                          index_t ldc, bool accumulate, const typename C::T* cs) {
    switch (nv) {
        case 1: micro<C, MR, 1>(np, a, ars, aps, m, b, ldb, c, ldc, accumulate, cs); break;
        case 2:
            if constexpr (C::NVMAX >= 2) micro<C, MR, 2>(np, a, ars, aps, m, b, ldb, c, ldc, accumulate, cs);
            break;
        case 3:
            if constexpr (C::NVMAX >= 3) micro<C, MR, 3>(np, a, ars, aps, m, b, ldb, c, ldc, accumulate, cs);
            break;
        default:
            if constexpr (C::NVMAX >= 4) micro<C, MR, 4>(np, a, ars, aps, m, b, ldb, c, ldc, accumulate, cs);
            break;
    }
}

// C (M × N) (+)= A (M × np, strides ars/aps) · B (np × N, row stride ldb).
// N must be a whole number of vectors (callers pad lanes / head dimension).
// Rows go in blocks of C::MR; the last m < MR rows use a kernel of 4 or 2
// rows when that suffices (64 = 10·6 + 4 rows: a 6-row kernel there would
// compute 2 rows for nothing, 3 % of the work). Every element of C gets the
// same sequence of FMAs whatever the block, so the result does not change.
template <class C>
NF_INLINE void block_gemm(index_t M, index_t N, index_t np, const typename C::T* a, index_t ars,
                          index_t aps, const typename C::T* b, index_t ldb, typename C::T* c,
                          index_t ldc, bool accumulate, const typename C::T* cs = nullptr) {
    constexpr index_t NR = index_t(C::VL) * C::NVMAX;
    constexpr int MR = C::MR;
    if (np == 0) {  // empty sum: C = 0, or unchanged (scaled)
        for (index_t i = 0; i < M; ++i)
            for (index_t j = 0; j < N; ++j)
                c[i * ldc + j] = accumulate ? c[i * ldc + j] * (cs ? cs[j] : typename C::T(1)) : typename C::T(0);
        return;
    }
    for (index_t j0 = 0; j0 < N; j0 += NR) {
        const int nv = int(std::min<index_t>(NR, N - j0) / C::VL);
        const auto* csj = cs != nullptr ? cs + j0 : nullptr;
        index_t i0 = 0;
        for (; i0 + MR <= M; i0 += MR)
            micro_rows<C, MR>(nv, np, a + i0 * ars, ars, aps, MR, b + j0, ldb, c + i0 * ldc + j0, ldc, accumulate, csj);
        const index_t m = M - i0;  // 0 ≤ m < MR rows left
        const auto* ai = a + i0 * ars;
        auto* ci = c + i0 * ldc + j0;
        if (m == 0) continue;
        if constexpr (MR > 2) {
            if (m <= 2) {
                micro_rows<C, 2>(nv, np, ai, ars, aps, m, b + j0, ldb, ci, ldc, accumulate, csj);
                continue;
            }
        }
        if constexpr (MR > 4) {
            if (m <= 4) {
                micro_rows<C, 4>(nv, np, ai, ars, aps, m, b + j0, ldb, ci, ldc, accumulate, csj);
                continue;
            }
        }
        micro_rows<C, MR>(nv, np, ai, ars, aps, m, b + j0, ldb, ci, ldc, accumulate, csj);
    }
}

// Set, in the nk × W tile st (row stride kBr) for queries i0.. and keys j0..,
// what the masks hide to `fill`: −inf in a score tile (forward), 0 in a P or
// dS tile (backward: a select, not a multiply, so a NaN there cannot stay).
template <typename T>
NF_INLINE void causal_mask(T* st, index_t nk, index_t W, index_t i0, index_t j0, index_t off, T fill) {
    // Query i0+i sees key j0+j iff j0+j ≤ i0+i+off, i.e. i ≥ j0+j−off−i0.
    for (index_t j = 0; j < nk; ++j) {
        const index_t hidden = std::min<index_t>(W, j0 + j - off - i0);  // lanes 0..hidden-1
        for (index_t i = 0; i < hidden; ++i) st[j * kBr + i] = fill;
    }
}

template <typename T>
NF_INLINE void padding_mask(T* st, index_t nk, index_t W, const std::uint8_t* km, T fill) {
    for (index_t j = 0; j < nk; ++j)
        if (!km[j])
            for (index_t i = 0; i < W; ++i) st[j * kBr + i] = fill;
}

// May query i see key j (absolute positions)?
struct Visible {
    bool causal;
    index_t off;              // Tk − Tq
    const std::uint8_t* km;   // this batch row's key mask, or null
    bool operator()(index_t i, index_t j) const {
        return (!causal || j <= i + off) && (km == nullptr || km[j] != 0);
    }
};

// Non-finite inputs (docs/kernels.md): a hidden key does not exist for the
// query, so in a partly masked tile the products that sum over keys or
// queries must skip the hidden pairs — P = 0 there, but 0·inf and 0·NaN are
// NaN. The fast GEMMs multiply every pair, which is exact whenever the other
// operand is finite; this checks that (x·0 is 0 only for finite x; an integer
// OR, so it vectorises), once per task for the head's rows a masked tile may
// need, so a tile costs nothing more.
template <typename T>
bool rows_nonfinite(const T* x, index_t st, index_t n, index_t D) {
    unsigned bad = 0;
    for (index_t r = 0; r < n; ++r)
        for (index_t d = 0; d < D; ++d) bad |= unsigned(!(x[r * st + d] * T(0) == T(0)));
    return bad != 0;
}

// block_gemm's C[r][c] (+)= Σ_p A(r, p) · B[p][c] (with the same α rescale
// cs), summing only the terms `keep(r, p, c)` allows: the exact form for a
// masked tile whose operand rows hold inf or NaN. Plain loops: it runs only
// for such tiles.
template <typename T, class Keep>
void block_gemm_masked(index_t M, index_t N, index_t np, const T* a, index_t ars, index_t aps, const T* b,
                       index_t ldb, T* c, index_t ldc, bool accumulate, const T* cs, Keep keep) {
    for (index_t r = 0; r < M; ++r)
        for (index_t col = 0; col < N; ++col) {
            T acc = T(0);
            for (index_t p = 0; p < np; ++p)
                if (keep(r, p, col)) acc += a[r * ars + p * aps] * b[p * ldb + col];
            T& cr = c[r * ldc + col];
            cr = accumulate ? (cs != nullptr ? cr * cs[col] : cr) + acc : acc;
        }
}

// Padding-mask summary of keys [j0, j0+nk): 0 = all hidden, 1 = some hidden, 2 = none.
NF_INLINE int mask_state(const std::uint8_t* km, index_t nk) {
    if (km == nullptr) return 2;
    index_t visible = 0;
    for (index_t j = 0; j < nk; ++j) visible += km[j] != 0;
    return visible == 0 ? 0 : (visible == nk ? 2 : 1);
}

// ---------------------------------------------------------------------------
// Forward: one online-softmax step on a score tile
// ---------------------------------------------------------------------------
//
// For the nk × W tile st = Sᵀ (row stride kBr), lane-wise over the queries i:
//   m'  = max(m, max_j Sᵀ[j][i])        the new running max
//   m″  = m' with −inf replaced by 0    (no −inf − (−inf) inside exp)
//   Pᵀ[j][i] = exp(Sᵀ[j][i] − m″)       in place (hidden keys: exp(−inf) = 0)
//   α   = exp(m − m″)                   (m = −inf, nothing seen yet: α = 0)
//   l'  = α·l + Σ_j Pᵀ[j][i]            summed in order of j
// m, l are updated, α is written for the caller's rescale of Oᵀ. Returns
// whether any lane's max moved (when none did, α = 1 in every lane).

// Portable form: one pass per quantity over the whole tile (the loops along
// the lanes auto-vectorise). ws: 3·kBr scratch.
template <typename T>
NF_INLINE bool online_softmax_lanes(T* NF_RESTRICT st, index_t nk, index_t W, T* NF_RESTRICT m,
                                    T* NF_RESTRICT l, T* NF_RESTRICT alpha, T* NF_RESTRICT ws) {
    const T neg_inf = -std::numeric_limits<T>::infinity();
    T* NF_RESTRICT tmax = ws;       // this tile's max
    T* NF_RESTRICT ms = ws + kBr;   // m″
    T* NF_RESTRICT tsum = ms + kBr; // Σ_j Pᵀ[j]
    for (index_t i = 0; i < W; ++i) tmax[i] = neg_inf;
    for (index_t j = 0; j < nk; ++j)
        for (index_t i = 0; i < W; ++i) tmax[i] = std::max(tmax[i], st[j * kBr + i]);
    int rescale = 0;  // does any running max move? (rarely, after the first tiles)
    for (index_t i = 0; i < W; ++i) {
        const T mn = std::max(m[i], tmax[i]);
        rescale |= mn != m[i];
        ms[i] = mn == neg_inf ? T(0) : mn;
        alpha[i] = vexp(m[i] - ms[i]);
        m[i] = mn;
        tsum[i] = T(0);
    }
    for (index_t j = 0; j < nk; ++j)
        for (index_t i = 0; i < W; ++i) {
            const T pji = vexp(st[j * kBr + i] - ms[i]);
            st[j * kBr + i] = pji;
            tsum[i] += pji;
        }
    for (index_t i = 0; i < W; ++i) l[i] = alpha[i] * l[i] + tsum[i];  // α·l: exact when α = 1
    return rescale != 0;
}

#if NUMFORMER_X86_DISPATCH
// AVX2 float: one column of 8 query lanes at a time, all of its work in one
// sweep down the tile (max, then exp + store + sum), with m″, α and the sum in
// registers. In the portable form the exp pass alone was ~14 % of the forward
// (the auto-vectorised vexp carries a clamp blend, and Σ went through memory,
// tsum[i] += …, on every element); this one made the whole forward ~4 %
// faster (Zen 3, 1 thread). Same quantities and order of summation, and
// exp_avx2 is vexp's method: the output was bit-identical on the benchmark.
// (Not inlined: an always-inline callee with a target attribute must sit
// directly in a function of that target; one call per tile costs nothing.)
NF_TARGET("avx2,fma")
bool online_softmax_avx2(float* NF_RESTRICT st, index_t nk, index_t W, float* NF_RESTRICT m,
                         float* NF_RESTRICT l, float* NF_RESTRICT alpha) {
    const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int moved = 0;
    for (index_t c = 0; c < W; c += 8) {
        float* NF_RESTRICT sc = st + c;
        __m256 tmax = neg_inf;  // max(s, tmax): a NaN score never wins, as in std::max
        for (index_t j = 0; j < nk; ++j) tmax = _mm256_max_ps(_mm256_loadu_ps(sc + j * kBr), tmax);
        const __m256 mo = _mm256_loadu_ps(m + c);
        const __m256 mn = _mm256_max_ps(tmax, mo);
        moved |= _mm256_movemask_ps(_mm256_cmp_ps(mn, mo, _CMP_NEQ_UQ));
        const __m256 ms = _mm256_andnot_ps(_mm256_cmp_ps(mn, neg_inf, _CMP_EQ_OQ), mn);
        const __m256 a = exp_avx2(_mm256_sub_ps(mo, ms));
        _mm256_storeu_ps(m + c, mn);
        _mm256_storeu_ps(alpha + c, a);
        // Two rows per step: two independent exp chains for the scheduler.
        __m256 sum = _mm256_setzero_ps();
        index_t j = 0;
        for (; j + 2 <= nk; j += 2) {
            const __m256 p0 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + j * kBr), ms));
            const __m256 p1 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + (j + 1) * kBr), ms));
            _mm256_storeu_ps(sc + j * kBr, p0);
            _mm256_storeu_ps(sc + (j + 1) * kBr, p1);
            sum = _mm256_add_ps(_mm256_add_ps(sum, p0), p1);
        }
        if (j < nk) {
            const __m256 p0 = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + j * kBr), ms));
            _mm256_storeu_ps(sc + j * kBr, p0);
            sum = _mm256_add_ps(sum, p0);
        }
        _mm256_storeu_ps(l + c, _mm256_fmadd_ps(a, _mm256_loadu_ps(l + c), sum));
    }
    return moved != 0;
}
#endif

template <class C>
NF_INLINE bool online_softmax_step(typename C::T* st, index_t nk, index_t W, typename C::T* m,
                                   typename C::T* l, typename C::T* alpha, typename C::T* ws) {
#if NUMFORMER_X86_DISPATCH
    if constexpr (std::is_same_v<typename C::T, float> && C::VB == 32)
        return online_softmax_avx2(st, nk, W, m, l, alpha);
#endif
    return online_softmax_lanes(st, nk, W, m, l, alpha, ws);
}

// ---------------------------------------------------------------------------
// Forward: the transposes in and out of the lane layout
// ---------------------------------------------------------------------------
// dst[c·ldd + r] = f · src[r·lds + c] for r < R, c < N: s·Qᵀ from Q on the way
// in (f = s), O from Oᵀ on the way out (f = 1). Portable form: row blocks of
// kMaxLanes so the writes along r stay within a few cache lines.
template <typename T>
NF_INLINE void transpose_scaled_rows(const T* NF_RESTRICT src, index_t lds, index_t R, index_t N,
                                     T f, T* NF_RESTRICT dst, index_t ldd) {
    for (index_t rb = 0; rb < R; rb += kMaxLanes) {
        const index_t re = std::min<index_t>(R, rb + kMaxLanes);
        for (index_t c = 0; c < N; ++c)
            for (index_t r = rb; r < re; ++r) dst[c * ldd + r] = f * src[r * lds + c];
    }
}

#if NUMFORMER_X86_DISPATCH
// AVX2 float: 8×8 blocks transposed in registers (unpack, shuffle, then swap
// 128-bit halves), the edges as in the portable form. The scalar loops read
// or wrote one float per cache line and took ~4 % of the forward.
NF_TARGET("avx2,fma")
void transpose_scaled_avx2(const float* NF_RESTRICT src, index_t lds, index_t R, index_t N, float f,
                           float* NF_RESTRICT dst, index_t ldd) {
    const __m256 vf = _mm256_set1_ps(f);
    const index_t R8 = R / 8 * 8, N8 = N / 8 * 8;
    for (index_t r0 = 0; r0 < R8; r0 += 8)
        for (index_t c0 = 0; c0 < N8; c0 += 8) {
            __m256 x[8], t[8];
            for (int k = 0; k < 8; ++k) x[k] = _mm256_mul_ps(vf, _mm256_loadu_ps(src + (r0 + k) * lds + c0));
            for (int k = 0; k < 8; k += 2) {  // t: pairs of rows interleaved
                t[k] = _mm256_unpacklo_ps(x[k], x[k + 1]);
                t[k + 1] = _mm256_unpackhi_ps(x[k], x[k + 1]);
            }
            for (int k = 0; k < 8; k += 4) {  // x: 4-row columns within each 128-bit half
                x[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
                x[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
                x[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
                x[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
            }
            for (int k = 0; k < 4; ++k) {  // rows 0-3 and 4-7 meet across the halves
                _mm256_storeu_ps(dst + (c0 + k) * ldd + r0, _mm256_permute2f128_ps(x[k], x[k + 4], 0x20));
                _mm256_storeu_ps(dst + (c0 + k + 4) * ldd + r0, _mm256_permute2f128_ps(x[k], x[k + 4], 0x31));
            }
        }
    if (N8 < N) transpose_scaled_rows(src + N8, lds, R8, N - N8, f, dst + N8 * ldd, ldd);
    if (R8 < R) transpose_scaled_rows(src + R8 * lds, lds, R - R8, N, f, dst + R8, ldd);
}
#endif

template <class C>
NF_INLINE void transpose_scaled(const typename C::T* src, index_t lds, index_t R, index_t N,
                                typename C::T f, typename C::T* dst, index_t ldd) {
#if NUMFORMER_X86_DISPATCH
    if constexpr (std::is_same_v<typename C::T, float> && C::VB == 32)
        return transpose_scaled_avx2(src, lds, R, N, f, dst, ldd);
#endif
    transpose_scaled_rows(src, lds, R, N, f, dst, ldd);
}

// ---------------------------------------------------------------------------
// Forward: one (batch·head, query tile) task
// ---------------------------------------------------------------------------

template <typename T>
index_t forward_workspace(index_t D) {
    return 2 * D * kBr + kBc * kBr + 6 * kBr;
}

template <class C>
NF_INLINE void forward_task(const AttentionProblem<typename C::T>& P, index_t bh, index_t qt,
                            typename C::T* out, typename C::T* lse, typename C::T* ws) {
    using T = typename C::T;
    const T neg_inf = -std::numeric_limits<T>::infinity();
    const index_t b = bh / P.heads, h = bh % P.heads;
    const index_t D = P.dim, Tq = P.tq, Tk = P.tk, off = Tk - Tq;
    const index_t i0 = qt * kBr, nq = std::min<index_t>(kBr, Tq - i0);
    const index_t W = round_up(nq, C::VL);  // lanes computed (≥ nq)

    T* NF_RESTRICT qt_ = ws;                // D × kBr   s·Qᵀ
    T* NF_RESTRICT st = qt_ + D * kBr;      // kBc × kBr Sᵀ, then Pᵀ
    T* NF_RESTRICT ot = st + kBc * kBr;     // D × kBr   Oᵀ (unnormalised)
    T* NF_RESTRICT m = ot + D * kBr;        // running max per query
    T* NF_RESTRICT l = m + kBr;             // running sum per query
    T* NF_RESTRICT alpha = l + kBr;         // exp(m_old − m_new)
    T* NF_RESTRICT sw = alpha + kBr;        // 3·kBr scratch of online_softmax_step

    // s·Qᵀ for this tile; lanes nq..W−1 are zero queries (computed, never written).
    const T* qh = P.q.head(b, h) + i0 * P.q.st;
    transpose_scaled<C>(qh, P.q.st, nq, D, P.scale, qt_, kBr);
    for (index_t d = 0; d < D; ++d)
        for (index_t i = nq; i < W; ++i) qt_[d * kBr + i] = T(0);
    for (index_t i = 0; i < W; ++i) {
        m[i] = neg_inf;
        l[i] = T(0);
    }

    const T* kh = P.k.head(b, h);
    const T* vh = P.v.head(b, h);
    const std::uint8_t* km = P.key_mask != nullptr ? P.key_mask + b * Tk : nullptr;
    const Visible vis{P.causal, off, km};
    // Keys any query of this tile may see: [0, j_end).
    const index_t j_end = P.causal ? std::min<index_t>(Tk, i0 + nq + off) : Tk;
    bool first = true;
    int v_bad = -1;  // do V rows [0, j_end) hold an inf or NaN? (−1: not looked yet)
    for (index_t j0 = 0; j0 < j_end; j0 += kBc) {
        const index_t nk = std::min<index_t>(kBc, j_end - j0);
        const int pad = mask_state(km != nullptr ? km + j0 : nullptr, nk);
        if (pad == 0) continue;  // every key hidden: contributes nothing

        // Sᵀ = K_j · (s·Qᵀ)                              (nk × W)
        block_gemm<C>(nk, W, D, kh + j0 * P.k.st, P.k.st, 1, qt_, kBr, st, kBr, false);
        const bool crosses = P.causal && j0 + nk - 1 > i0 + off;
        if (crosses) causal_mask(st, nk, W, i0, j0, off, neg_inf);
        if (pad == 1) padding_mask(st, nk, W, km + j0, neg_inf);

        // Online softmax, lane-wise over the queries.
        const bool rescale = online_softmax_step<C>(st, nk, W, m, l, alpha, sw);
        // Oᵀ = α ⊙ Oᵀ + V_jᵀ · Pᵀ                      (D × W), p = key
        // (α applied as the GEMM stores, not by a pass of its own over Oᵀ;
        // when no max moved, α = 1 in every lane and it is skipped.)
        const T* vj = vh + j0 * P.v.st;
        if ((crosses || pad == 1) && v_bad < 0) v_bad = rows_nonfinite(vh, P.v.st, j_end, D);
        if ((crosses || pad == 1) && v_bad)  // a hidden v may be inf or NaN
            block_gemm_masked<T>(D, W, nk, vj, 1, P.v.st, st, kBr, ot, kBr, !first, rescale ? alpha : nullptr,
                              [&](index_t, index_t j, index_t i) { return vis(i0 + i, j0 + j); });
        else
            block_gemm<C>(D, W, nk, vj, 1, P.v.st, st, kBr, ot, kBr, !first, rescale ? alpha : nullptr);
        first = false;
    }

    // O = Oᵀᵀ / l ; L = m + log l. A query with no visible key: O = 0,
    // L = −inf. One whose visible scores were all −inf has l = 0: 0/0, so
    // O = NaN, L = NaN (docs/kernels.md, non-finite inputs); NaN and +inf
    // scores made l NaN already. (l > 0 and finite otherwise.)
    index_t first_key = 0;  // the first key the padding mask lets through (Tk: none)
    if (km != nullptr)
        while (first_key < Tk && km[first_key] == 0) ++first_key;
    T* oh = out + (bh * Tq + i0) * D;
    T* lh = lse + bh * Tq + i0;
    T* NF_RESTRICT inv = alpha;  // 1/l, or 0 where nothing was seen
    T* NF_RESTRICT sees = sw;     // 1 where the query sees some key, else 0
    for (index_t i = 0; i < nq; ++i) {
        const bool any = first_key < Tk && (!P.causal || first_key <= i0 + i + off);
        sees[i] = any ? T(1) : T(0);
        inv[i] = any ? T(1) / l[i] : T(0);
        lh[i] = !any ? neg_inf : l[i] == T(0) ? std::numeric_limits<T>::quiet_NaN() : m[i] + std::log(l[i]);
    }
    if (first)  // no key tile visited (so no query sees a key): Oᵀ was never written
        std::fill(ot, ot + D * kBr, T(0));
    else  // a select, not × 0: an unseen lane's Oᵀ may hold inf or NaN
        for (index_t d = 0; d < D; ++d)
            for (index_t i = 0; i < nq; ++i) ot[d * kBr + i] = sees[i] != T(0) ? ot[d * kBr + i] * inv[i] : T(0);
    transpose_scaled<C>(ot, kBr, D, nq, T(1), oh, D);
}

// ---------------------------------------------------------------------------
// Backward: one (batch·head, share of key tiles) task
// ---------------------------------------------------------------------------

struct BackwardShape {
    index_t Tqp, Dp;  // queries padded to whole vectors; head dim padded likewise
    bool pack_rows;   // D is not whole vectors: copy Q, dO, K rows padded to Dp
};

template <class C>
BackwardShape backward_shape(index_t Tq, index_t D) {
    BackwardShape s;
    s.Tqp = round_up(Tq, C::VL);
    s.Dp = round_up(D, C::VL);
    s.pack_rows = s.Dp != D;
    return s;
}

// Upper bound over all variants (lanes ≤ kMaxLanes).
inline index_t backward_workspace(index_t Tq, index_t Tk, index_t D) {
    const index_t Tqp = round_up(Tq, kMaxLanes), Dp = round_up(D, kMaxLanes);
    return 2 * D * (Tqp + kMaxLanes) + 2 * Tqp + (2 * Tqp * Dp + Tk * Dp) + Tqp * Dp + 2 * kBc * kBr +
           2 * kBc * Dp;
}

template <class C>
NF_INLINE void backward_task(const AttentionProblem<typename C::T>& P,
                             const Tensor4<typename C::T>& O, const Tensor4<typename C::T>& dO,
                             const typename C::T* lse, index_t bh, index_t share, index_t shares,
                             typename C::T* dq_out, typename C::T* dk, typename C::T* dv,
                             typename C::T* ws) {
    using T = typename C::T;
    const T inf = std::numeric_limits<T>::infinity();
    const index_t b = bh / P.heads, h = bh % P.heads;
    const index_t D = P.dim, Tq = P.tq, Tk = P.tk, off = Tk - Tq;
    const BackwardShape sh = backward_shape<C>(Tq, D);
    const index_t Tqp = sh.Tqp, Dp = sh.Dp;

    const T* qh = P.q.head(b, h);
    const T* kh = P.k.head(b, h);
    const T* vh = P.v.head(b, h);
    const T* oh = O.head(b, h);
    const T* doh = dO.head(b, h);
    const std::uint8_t* km = P.key_mask != nullptr ? P.key_mask + b * Tk : nullptr;
    const Visible vis{P.causal, off, km};

    // Qᵀ and dOᵀ rows are ldt apart: kMaxLanes more than needed, so that rows
    // are not a multiple of 4 KiB apart (which would make a B panel of the
    // micro-kernel, D rows of one cache line, fall into one L1 set).
    const index_t ldt = Tqp + kMaxLanes;
    T* NF_RESTRICT qt_ = ws;             // D × ldt   s·Qᵀ
    T* NF_RESTRICT dot_ = qt_ + D * ldt; // D × ldt   dOᵀ
    T* NF_RESTRICT lb = dot_ + D * ldt;  // Tqp       L (−inf → +inf; padding +inf)
    T* NF_RESTRICT dd = lb + Tqp;        // Tqp       D_i = Σ_d dO·O
    T* NF_RESTRICT dqa = dd + Tqp;       // Tqp × Dp  dQ accumulator
    T* NF_RESTRICT st = dqa + Tqp * Dp;  // kBc × kBr Sᵀ, then Pᵀ
    T* NF_RESTRICT dpt = st + kBc * kBr; // kBc × kBr dPᵀ, then s·dSᵀ
    T* NF_RESTRICT dka = dpt + kBc * kBr;// kBc × Dp
    T* NF_RESTRICT dva = dka + kBc * Dp; // kBc × Dp
    T* rows = dva + kBc * Dp;            // packed Q, dO, K rows when D is not whole vectors

    // Transposes in blocks of kMaxLanes queries: each pass writes one short
    // contiguous run per d and reads kMaxLanes rows that stay in L1.
    for (index_t ib = 0; ib < Tq; ib += kMaxLanes) {
        const index_t ie = std::min<index_t>(Tq, ib + kMaxLanes);
        for (index_t d = 0; d < D; ++d)
            for (index_t i = ib; i < ie; ++i) {
                qt_[d * ldt + i] = P.scale * qh[i * P.q.st + d];
                dot_[d * ldt + i] = doh[i * dO.st + d];
            }
    }
    for (index_t d = 0; d < D; ++d)
        for (index_t i = Tq; i < ldt; ++i) qt_[d * ldt + i] = dot_[d * ldt + i] = T(0);
    for (index_t i = 0; i < Tqp; ++i) {
        const T L = i < Tq ? lse[bh * Tq + i] : inf;
        lb[i] = L == -inf ? inf : L;
        T acc = T(0);
        if (i < Tq)
            for (index_t d = 0; d < D; ++d) acc += doh[i * dO.st + d] * oh[i * O.st + d];
        dd[i] = acc;
    }
    std::fill(dqa, dqa + Tqp * Dp, T(0));

    // Row-major operands read as vectors along d: Q, dO, K.
    const T *qr = qh, *dor = doh, *kr = kh;
    index_t ldq = P.q.st, ldo = dO.st, ldk = P.k.st;
    if (sh.pack_rows) {
        T* qp = rows;
        T* dop = qp + Tqp * Dp;
        T* kp = dop + Tqp * Dp;
        std::fill(rows, rows + 2 * Tqp * Dp + Tk * Dp, T(0));
        for (index_t i = 0; i < Tq; ++i)
            for (index_t d = 0; d < D; ++d) {
                qp[i * Dp + d] = qh[i * P.q.st + d];
                dop[i * Dp + d] = doh[i * dO.st + d];
            }
        for (index_t j = 0; j < Tk; ++j)
            for (index_t d = 0; d < D; ++d) kp[j * Dp + d] = kh[j * P.k.st + d];
        qr = qp, dor = dop, kr = kp;
        ldq = ldo = ldk = Dp;
    }

    // Inf or NaN in the rows the masked tiles' products sum over (see rows_nonfinite)?
    const bool any_mask = P.causal || km != nullptr;
    const bool q_bad = any_mask && rows_nonfinite(qh, P.q.st, Tq, D);
    const bool do_bad = any_mask && rows_nonfinite(doh, dO.st, Tq, D);
    const bool k_bad = any_mask && rows_nonfinite(kh, P.k.st, Tk, D);

    const index_t n_ktiles = ceil_div(Tk, kBc);
    for (index_t kt = share; kt < n_ktiles; kt += shares) {
        const index_t j0 = kt * kBc, nk = std::min<index_t>(kBc, Tk - j0);
        std::fill(dka, dka + nk * Dp, T(0));
        std::fill(dva, dva + nk * Dp, T(0));
        const int pad = mask_state(km != nullptr ? km + j0 : nullptr, nk);
        // First query that sees key j0 (causal): i + off ≥ j0.
        const index_t i_first = P.causal ? std::max<index_t>(0, j0 - off) : 0;
        if (pad != 0)
            for (index_t i0 = (i_first / kBr) * kBr; i0 < Tq; i0 += kBr) {
                const index_t nq = std::min<index_t>(kBr, Tq - i0);
                const index_t W = round_up(nq, C::VL);
                // Sᵀ = K_j · (s·Qᵀ), then Pᵀ = exp(Sᵀ − L), masked   (nk × W)
                // (masked after exp, to exact zeros: a row with L = NaN
                // would give exp(−inf − NaN) = NaN for its hidden keys)
                block_gemm<C>(nk, W, D, kh + j0 * P.k.st, P.k.st, 1, qt_ + i0, ldt, st, kBr, false);
                for (index_t j = 0; j < nk; ++j)
                    for (index_t i = 0; i < W; ++i) st[j * kBr + i] = vexp(st[j * kBr + i] - lb[i0 + i]);
                const bool crosses = P.causal && j0 + nk - 1 > i0 + off;
                if (crosses) causal_mask(st, nk, W, i0, j0, off, T(0));
                if (pad == 1) padding_mask(st, nk, W, km + j0, T(0));
                const bool masked = crosses || pad == 1;
                // In a masked tile, hidden pairs are skipped where the other
                // operand is not finite (see rows_nonfinite).
                const auto key_row = [&](index_t j, index_t i, index_t) { return vis(i0 + i, j0 + j); };
                const auto query_row = [&](index_t i, index_t j, index_t) { return vis(i0 + i, j0 + j); };
                // dPᵀ = V_j · dOᵀ                                       (nk × W)
                block_gemm<C>(nk, W, D, vh + j0 * P.v.st, P.v.st, 1, dot_ + i0, ldt, dpt, kBr, false);
                // dV_j += Pᵀ · dO                                        (nk × Dp), p = query
                if (masked && do_bad)
                    block_gemm_masked<T>(nk, Dp, nq, st, kBr, 1, dor + i0 * ldo, ldo, dva, Dp, true, nullptr, key_row);
                else
                    block_gemm<C>(nk, Dp, nq, st, kBr, 1, dor + i0 * ldo, ldo, dva, Dp, true);
                // s·dSᵀ = s · Pᵀ ⊙ (dPᵀ − D), hidden pairs set to 0 (their dP or D may be NaN)
                for (index_t j = 0; j < nk; ++j)
                    for (index_t i = 0; i < W; ++i)
                        dpt[j * kBr + i] = P.scale * (st[j * kBr + i] * (dpt[j * kBr + i] - dd[i0 + i]));
                if (crosses) causal_mask(dpt, nk, W, i0, j0, off, T(0));
                if (pad == 1) padding_mask(dpt, nk, W, km + j0, T(0));
                // dK_j += s·dSᵀ · Q                                     (nk × Dp), p = query
                if (masked && q_bad)
                    block_gemm_masked<T>(nk, Dp, nq, dpt, kBr, 1, qr + i0 * ldq, ldq, dka, Dp, true, nullptr, key_row);
                else
                    block_gemm<C>(nk, Dp, nq, dpt, kBr, 1, qr + i0 * ldq, ldq, dka, Dp, true);
                // dQ_i += s·dS · K_j                                    (nq × Dp), p = key
                if (masked && k_bad)
                    block_gemm_masked<T>(nq, Dp, nk, dpt, 1, kBr, kr + j0 * ldk, ldk, dqa + i0 * Dp, Dp, true, nullptr,
                                      query_row);
                else
                    block_gemm<C>(nq, Dp, nk, dpt, 1, kBr, kr + j0 * ldk, ldk, dqa + i0 * Dp, Dp, true);
            }
        T* dkh = dk + (bh * Tk + j0) * D;
        T* dvh = dv + (bh * Tk + j0) * D;
        for (index_t j = 0; j < nk; ++j)
            for (index_t d = 0; d < D; ++d) {
                dkh[j * D + d] = dka[j * Dp + d];
                dvh[j * D + d] = dva[j * Dp + d];
            }
    }
    for (index_t i = 0; i < Tq; ++i)
        for (index_t d = 0; d < D; ++d) dq_out[i * D + d] = dqa[i * Dp + d];
}

// ---------------------------------------------------------------------------
// Instruction-set variants
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Forward for a few queries (decoding with a KV cache: Tq = 1 per sequence)
// ---------------------------------------------------------------------------
//
// The tiled kernel puts queries on the vector lanes; with one query a vector
// holds one useful lane and the rest is padding (a token of GPT-2 spent
// 65 µs per layer there at 100 cached keys; see below for this path's
// times). With few queries the direct form is cheaper: for each query i of (b, h),
//   s_j = scale · q_i·k_j   for the visible keys j      (dot products along d)
//   m = max_j s_j,  p_j = exp(s_j − m),  l = Σ_j p_j
//   o_i = Σ_j p_j v_j / l,  L_i = m + log l               (axpy along d)
// — the same quantities the online softmax reaches after its last tile.
// ws: Tk scores.
constexpr index_t kDecodeQueries = 4;   // at most this many queries use this path

// The steps of decode_task that carry its arithmetic, portable forms.
// s_j = q·k_j for keys j < lim, four keys per pass (four independent sums in
// flight; a dot of 64 is short, and one at a time is bound by its final
// reduction).
template <typename T>
NF_INLINE void decode_scores(const T* q, const T* k, index_t kst, index_t D, index_t lim, T* s) {
    index_t j = 0;
    for (; j + 4 <= lim; j += 4) {
        const T* k0 = k + j * kst;
        dot_lanes_b4(q, k0, k0 + kst, k0 + 2 * kst, k0 + 3 * kst, D, s + j);
    }
    for (; j < lim; ++j) s[j] = dot_lanes(q, k + j * kst, D);
}

// o = inv · Σ_j p_j v_j over the visible keys j < lim (keys the padding
// mask km hides are skipped, so their values never reach o, even when they
// are not finite; a visible key with p_j = 0 and v_j inf gives NaN, as in
// the tiled path and the reference).
template <typename T>
NF_INLINE void decode_values(const T* p, const std::uint8_t* km, const T* v, index_t vst, index_t D, index_t lim,
                             T inv, T* NF_RESTRICT o) {
    for (index_t d = 0; d < D; ++d) o[d] = T(0);
    for (index_t j = 0; j < lim; ++j) {
        const T pj = p[j];
        if (km != nullptr && km[j] == 0) continue;
        const T* NF_RESTRICT vj = v + j * vst;
        for (index_t d = 0; d < D; ++d) o[d] += pj * vj[d];
    }
    for (index_t d = 0; d < D; ++d) o[d] *= inv;
}

#if NUMFORMER_X86_DISPATCH
// AVX2 float forms, for D a multiple of 8 (every GPT-2/BERT head size).
// Scores: eight keys at a time, one accumulator per key (D/8 FMAs each), then
// the eight horizontal sums in one transpose-add tree — hadd(k0,k1) …,
// hadd of those, and one cross-half add — instead of eight reductions of
// 16 scalar lanes. Values: o is kept in registers 32 floats at a time while
// the keys stream by, instead of being loaded and stored once per key.
// Together they took a GPT-2 decode step's attention (12 heads, 101 keys,
// 1 thread, K and V in cache) from ~42 to ~21 µs on Zen 3; the row
// reductions had been most of it.
NF_TARGET("avx2,fma")
NF_INLINE __m256 sum8_avx2(const __m256 a[8]) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    // u0 lanes: [k0..k3 over the low halves | k0..k3 over the high halves]
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

NF_TARGET("avx2,fma")
NF_INLINE float sum1_avx2(__m256 a) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

NF_TARGET("avx2,fma")
void decode_scores_avx2(const float* q, const float* k, index_t kst, index_t D, index_t lim, float* s) {
    index_t j = 0;
    for (; j + 8 <= lim; j += 8) {
        const float* kj = k + j * kst;
        __m256 acc[8];
#pragma GCC unroll 8
        for (int x = 0; x < 8; ++x) acc[x] = _mm256_setzero_ps();
        for (index_t d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(q + d);
#pragma GCC unroll 8
            for (int x = 0; x < 8; ++x) acc[x] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kj + x * kst + d), acc[x]);
        }
        _mm256_storeu_ps(s + j, sum8_avx2(acc));
    }
    for (; j < lim; ++j) {
        __m256 acc = _mm256_setzero_ps();
        for (index_t d = 0; d < D; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + j * kst + d), acc);
        s[j] = sum1_avx2(acc);
    }
}

// o[0 : 8W) = inv · Σ_j p_j v_j[0 : 8W), with the W vectors of o in registers.
template <int W>
NF_TARGET("avx2,fma")
NF_INLINE void decode_values_chunk_avx2(const float* p, const std::uint8_t* km, const float* v, index_t vst,
                                        index_t lim, float inv, float* o) {
    __m256 acc[W];
#pragma GCC unroll 4
    for (int x = 0; x < W; ++x) acc[x] = _mm256_setzero_ps();
    for (index_t j = 0; j < lim; ++j) {
        if (km != nullptr && km[j] == 0) continue;  // hidden: never read (see decode_values)
        const __m256 pj = _mm256_set1_ps(p[j]);
#pragma GCC unroll 4
        for (int x = 0; x < W; ++x) acc[x] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * vst + 8 * x), acc[x]);
    }
    const __m256 s = _mm256_set1_ps(inv);
#pragma GCC unroll 4
    for (int x = 0; x < W; ++x) _mm256_storeu_ps(o + 8 * x, _mm256_mul_ps(acc[x], s));
}

NF_TARGET("avx2,fma")
void decode_values_avx2(const float* p, const std::uint8_t* km, const float* v, index_t vst, index_t D, index_t lim,
                        float inv, float* o) {
    index_t d = 0;
    for (; d + 32 <= D; d += 32) decode_values_chunk_avx2<4>(p, km, v + d, vst, lim, inv, o + d);
    switch ((D - d) / 8) {
        case 3: decode_values_chunk_avx2<3>(p, km, v + d, vst, lim, inv, o + d); break;
        case 2: decode_values_chunk_avx2<2>(p, km, v + d, vst, lim, inv, o + d); break;
        case 1: decode_values_chunk_avx2<1>(p, km, v + d, vst, lim, inv, o + d); break;
        default: break;
    }
}
#endif

// Whether variant C uses the AVX2 float forms (AVX2 and AVX-512 builds, float).
template <class C>
constexpr bool kDecodeFast = C::VB >= 32 && std::is_same_v<typename C::T, float>;

// The scores and values steps in the AVX2 forms when `Fast` and D allows,
// else in the portable ones.
template <typename T, bool Fast>
NF_INLINE void decode_scores_for(const T* q, const T* k, index_t kst, index_t D, index_t lim, T* s) {
#if NUMFORMER_X86_DISPATCH
    if constexpr (Fast) {
        if (D % 8 == 0) return decode_scores_avx2(q, k, kst, D, lim, s);
    }
#endif
    decode_scores(q, k, kst, D, lim, s);
}

template <typename T, bool Fast>
NF_INLINE void decode_values_for(const T* p, const std::uint8_t* km, const T* v, index_t vst, index_t D, index_t lim,
                                 T inv, T* o) {
#if NUMFORMER_X86_DISPATCH
    if constexpr (Fast) {
        if (D % 8 == 0) return decode_values_avx2(p, km, v, vst, D, lim, inv, o);
    }
#endif
    decode_values(p, km, v, vst, D, lim, inv, o);
}

// Forward for a few queries (decoding with a KV cache: Tq = 1 per sequence)
// — see the comment above kDecodeQueries. `Fast`: the AVX2 float forms.
template <typename T, bool Fast>
NF_INLINE void decode_task(const AttentionProblem<T>& P, index_t bh, T* out, T* lse, T* ws) {
    const T neg_inf = -std::numeric_limits<T>::infinity();
    const index_t b = bh / P.heads, h = bh % P.heads;
    const index_t D = P.dim, Tq = P.tq, Tk = P.tk, off = Tk - Tq;
    const T* qh = P.q.head(b, h);
    const T* kh = P.k.head(b, h);
    const T* vh = P.v.head(b, h);
    const std::uint8_t* km = P.key_mask != nullptr ? P.key_mask + b * Tk : nullptr;
    for (index_t i = 0; i < Tq; ++i) {
        const T* NF_RESTRICT q = qh + i * P.q.st;
        T* NF_RESTRICT o = out + (bh * Tq + i) * D;
        const index_t lim = P.causal ? std::min<index_t>(Tk, i + off + 1) : Tk;  // keys [0, lim)
        decode_scores_for<T, Fast>(q, kh, P.k.st, D, lim, ws);
        T m = neg_inf;
        bool any = false;  // a visible key?
        for (index_t j = 0; j < lim; ++j) {
            const bool visible = km == nullptr || km[j] != 0;
            const T sj = visible ? P.scale * ws[j] : neg_inf;
            ws[j] = sj;
            m = sj > m ? sj : m;  // a NaN score is skipped here but makes its p, and so l, NaN
            any |= visible;
        }
        if (!any) {  // no visible key: O = 0, L = −inf
            for (index_t d = 0; d < D; ++d) o[d] = T(0);
            lse[bh * Tq + i] = neg_inf;
            continue;
        }
        // Hidden keys: exp(−inf − m) = 0. Visible scores all −inf (m = −inf):
        // −inf − (−inf) = NaN, so o and L are NaN (0/0; docs/kernels.md).
        for (index_t j = 0; j < lim; ++j) ws[j] = vexp(ws[j] - m);
        const T l = sum_lanes(ws, lim);
        const T inv = T(1) / l;
        decode_values_for<T, Fast>(ws, km, vh, P.v.st, D, lim, inv, o);
        lse[bh * Tq + i] = m + std::log(l);
    }
}

template <typename T>
using ForwardFn = void (*)(const AttentionProblem<T>&, index_t, index_t, T*, T*, T*);
template <typename T>
using BackwardFn = void (*)(const AttentionProblem<T>&, const Tensor4<T>&, const Tensor4<T>&,
                            const T*, index_t, index_t, index_t, T*, T*, T*, T*);

#define NF_ATTN_VARIANT(NAME, TARGET, CFG)                                                        \
    template <typename T>                                                                         \
    TARGET void forward_##NAME(const AttentionProblem<T>& p, index_t bh, index_t qt, T* out,      \
                               T* lse, T* ws) {                                                   \
        forward_task<CFG<T>>(p, bh, qt, out, lse, ws);                                            \
    }                                                                                             \
    template <typename T>                                                                         \
    TARGET void decode_##NAME(const AttentionProblem<T>& p, index_t bh, index_t /*qt*/, T* out,   \
                              T* lse, T* ws) {                                                    \
        decode_task<T, kDecodeFast<CFG<T>>>(p, bh, out, lse, ws);                                 \
    }                                                                                             \
    template <typename T>                                                                         \
    TARGET void backward_##NAME(const AttentionProblem<T>& p, const Tensor4<T>& o,               \
                                const Tensor4<T>& dout, const T* lse, index_t bh, index_t share, \
                                index_t shares, T* dq, T* dk, T* dv, T* ws) {                     \
        backward_task<CFG<T>>(p, o, dout, lse, bh, share, shares, dq, dk, dv, ws);                \
    }

NF_ATTN_VARIANT(generic, , GenericCfg)
#if NUMFORMER_X86_DISPATCH
NF_ATTN_VARIANT(avx2, NF_TARGET("avx2,fma"), Avx2Cfg)
NF_ATTN_VARIANT(avx512, NF_TARGET("avx512f,avx2,fma"), Avx512Cfg)
#endif
#undef NF_ATTN_VARIANT

template <typename T>
ForwardFn<T> forward_for(Isa isa) {
    return NF_PICK_ISA(isa, forward_generic<T>, forward_avx2<T>, forward_avx512<T>);
}

template <typename T>
ForwardFn<T> decode_for(Isa isa) {
    return NF_PICK_ISA(isa, decode_generic<T>, decode_avx2<T>, decode_avx512<T>);
}

template <typename T>
BackwardFn<T> backward_for(Isa isa) {
    return NF_PICK_ISA(isa, backward_generic<T>, backward_avx2<T>, backward_avx512<T>);
}

// 64-byte aligned scratch, one per thread, kept between calls (OpenMP
// threads persist) so that repeated calls do not fault in fresh pages;
// a buffer above kKeepBytes is released at the end of the call.
template <typename T>
class Scratch {
public:
    explicit Scratch(index_t count) {
        const size_t bytes = sizeof(T) * static_cast<size_t>(std::max<index_t>(count, 1));
        Slot& s = slot();
        if (s.bytes < bytes) {
            release(s);
            s.data = ::operator new(bytes, std::align_val_t(64));
            s.bytes = bytes;
        }
        data_ = static_cast<T*>(s.data);
    }
    ~Scratch() {
        Slot& s = slot();
        if (s.bytes > kKeepBytes) release(s);
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    T* data() { return data_; }

private:
    static constexpr size_t kKeepBytes = size_t(32) << 20;
    struct Slot {
        void* data = nullptr;
        size_t bytes = 0;
        ~Slot() { release(*this); }
    };
    static void release(Slot& s) {
        if (s.data != nullptr) ::operator delete(s.data, std::align_val_t(64));
        s.data = nullptr;
        s.bytes = 0;
    }
    static Slot& slot() {
        thread_local Slot s;
        return s;
    }
    T* data_;
};

// Threads for `tasks` tasks of about `flops_per_task` each: one thread when
// the whole call is tiny (thread start-up would dominate).
int threads_for(index_t tasks, double flops) {
    if (tasks <= 1 || flops < 2e6) return 1;
    return int(std::min<index_t>(num_threads(), tasks));
}

}  // namespace

template <typename T>
void attention_forward(const AttentionProblem<T>& p, T* out, T* lse) {
    const index_t bh_count = p.batch * p.heads;
    if (bh_count == 0 || p.tq == 0) return;
    const bool few = p.tq <= kDecodeQueries;  // one task per (b, h), see decode_task
    const ForwardFn<T> fn = few ? decode_for<T>(active_isa()) : forward_for<T>(active_isa());
    const index_t n_qtiles = few ? 1 : ceil_div(p.tq, kBr);
    const index_t tasks = bh_count * n_qtiles;
    // The few-queries path does 4·Tq flops per key and reads 8·D bytes of K
    // and V: it is bound by memory, and a second thread (its own L2, its
    // own stream of loads) pays from ~256 KiB of K and V on, 16× earlier
    // than the flop count alone says (GPT-2, 12 heads × 101 keys: 25 → 15 µs).
    const double flops = 4.0 * double(bh_count) * double(p.tq) * double(p.tk) * double(p.dim);
    const int threads = threads_for(tasks, few ? 16.0 * flops : flops);
    const index_t ws_size = few ? std::max<index_t>(p.tk, 1) : forward_workspace<T>(p.dim);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Scratch<T> ws(ws_size);
        // Head by head, and within a head the heaviest query tile first (the
        // last query tiles see the most keys when causal). Consecutive tasks
        // then read the same K and V, which stay in L2/L3; taking the heads
        // in turn instead (the order before) fetched a new head's K and V for
        // every task and cost ~18 % of the forward (Zen 3, T = 1024, D = 64).
#pragma omp for schedule(dynamic, 1)
        for (index_t t = 0; t < tasks; ++t) {
            const index_t qt = n_qtiles - 1 - t % n_qtiles;
            fn(p, t / n_qtiles, qt, out, lse, ws.data());
        }
    }
}

template <typename T>
void attention_backward(const AttentionProblem<T>& p, const Tensor4<T>& o, const Tensor4<T>& dout,
                        const T* lse, T* dq, T* dk, T* dv) {
    const index_t bh_count = p.batch * p.heads;
    if (bh_count == 0) return;
    const BackwardFn<T> fn = backward_for<T>(active_isa());
    // Few heads: split each head's key tiles into `shares` interleaved parts
    // with private dQ buffers. Chosen from the shape only, so the summation
    // order (and the result) does not depend on the thread count.
    const index_t n_ktiles = ceil_div(p.tk, kBc);
    const index_t shares = std::max<index_t>(1, std::min<index_t>(n_ktiles, ceil_div(16, bh_count)));
    const index_t tasks = bh_count * shares;
    const index_t head_q = p.tq * p.dim;
    std::vector<T> partial(shares > 1 ? static_cast<size_t>(tasks * head_q) : 0);
    const int threads = threads_for(tasks, 10.0 * double(bh_count) * double(p.tq) * double(p.tk) * double(p.dim));
    const index_t ws_size = backward_workspace(p.tq, p.tk, p.dim);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Scratch<T> ws(ws_size);
#pragma omp for schedule(dynamic, 1)
        for (index_t t = 0; t < tasks; ++t) {
            const index_t bh = t / shares, s = t % shares;
            T* dq_dst = shares > 1 ? partial.data() + t * head_q : dq + bh * head_q;
            fn(p, o, dout, lse, bh, s, shares, dq_dst, dk, dv, ws.data());
        }
        if (shares > 1) {
#pragma omp for schedule(static)
            for (index_t bh = 0; bh < bh_count; ++bh) {
                T* dst = dq + bh * head_q;
                const T* src = partial.data() + bh * shares * head_q;
                std::copy(src, src + head_q, dst);
                for (index_t s = 1; s < shares; ++s)
                    for (index_t x = 0; x < head_q; ++x) dst[x] += src[s * head_q + x];
            }
        }
    }
}

template void attention_forward<float>(const AttentionProblem<float>&, float*, float*);
template void attention_forward<double>(const AttentionProblem<double>&, double*, double*);
template void attention_backward<float>(const AttentionProblem<float>&, const Tensor4<float>&,
                                        const Tensor4<float>&, const float*, float*, float*, float*);
template void attention_backward<double>(const AttentionProblem<double>&, const Tensor4<double>&,
                                         const Tensor4<double>&, const double*, double*, double*,
                                         double*);

}  // namespace numformer::cpu
