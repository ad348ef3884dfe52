// gemm.cpp — cache-blocked, packed matrix product with a register-tiled
// micro-kernel: the Goto/BLIS algorithm, written for row-major C.
//
// C (M×N) = op(A) (M×K) · op(B) (K×N). The five loops, outermost first:
//
//   for ic in 0..M step MC:          A block: MC rows        (shared, ~L3)
//     for pc in 0..K step KC:        depth slice
//       pack op(A)[ic:+MC, pc:+KC] -> Ap    (all threads, split by MR panels)
//       for jc in 0..N step NC:      B block: NC columns      (shared, ~L2)
//         pack op(B)[pc:+KC, jc:+NC] -> Bp  (all threads, split by NR panels)
//         for ir over MR-row panels of Ap   <- threads take panels dynamically
//           for jr over NR-column panels of Bp
//             C[ir:+MR, jr:+NR] += Ap_panel · Bp_panel     micro-kernel
//
// Why this order (numbers for AVX-512 float: MR×NR = 12×32, KC = 384):
//  * The micro-kernel broadcasts one element of A per row and multiplies it
//    with NR/16 vectors of B: per step of k, 12 broadcasts + 2 vector loads
//    feed 24 FMAs, and the 12×32 tile of C lives in 24 zmm registers.
//  * The A micro-panel (MR×KC = 18 KiB) is reused by every NR panel of the B
//    block in the jr loop, so it stays in L1 (32 KiB); the B micro-panels
//    (KC×NR = 48 KiB each) stream from the B block, which is sized to stay in
//    L2 (KC×NC = 384×384×4 B = 576 KiB of the 1 MiB L2). Streaming 128 B of B
//    per 24 FMAs is ~5 B/cycle, far below L2 bandwidth.
//  * Each B block is packed ONCE and shared by all threads (both cores read it
//    into their own L2); the threads split the M panels. Each A block is
//    likewise packed once and shared (it is read once per B block, from L3).
//    Packing therefore costs one copy of op(B) per A block (M/MC copies in
//    all) and one copy of op(A) in total — a few percent of the flops even
//    for N = 768. (Per-thread repacking of B was what made the first version
//    lose to OpenBLAS.)
//  * KC large (384) means C is read and written only K/KC times; the write-
//    back of the first slice also applies bias / keeps the old C (accumulate),
//    so no separate pass over C is ever made.
//  * The B block is double-buffered: threads pack block g+1 into the other
//    buffer while others still compute on block g. Work is handed out as
//    small tasks (pack one panel / compute one A panel × the B block) from a
//    ticket counter, with no barriers (see blocked_shared): on these shared,
//    noisy 2-core machines a barrier per block lost 30-40% whenever the OS
//    descheduled one thread.
//
// Packing copies each block into the order the micro-kernel reads it
// (contiguous, zero-padded to whole MR/NR panels), so the four transpose
// combinations only differ in the packing loops and the micro-kernel's k loop
// never sees a stride or an edge. Edges are handled at write-back (masked
// stores on AVX-512, a scalar copy elsewhere).
//
// Determinism: the depth slicing (KC, and the balanced slice length derived
// from K) depends only on K and the instruction set, and every element of C
// is produced by exactly one thread, slice after slice in order; so results
// do not depend on the thread count or on which driver (shared blocks, or
// one whole product per thread for batches) ran them.
//
// Products with at most kGemmStreamRows rows (gemm.h; one token during sampling) skip packing
// and stream B as stored (compute_rows below).
#include "cpu/gemm.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "cpu/reduce.h"

#if NUMFORMER_X86_DISPATCH
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace numformer::cpu {
namespace {

index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
index_t round_up(index_t a, index_t b) { return ceil_div(a, b) * b; }

// One variant of the kernel: register tile MR×NR built from VB-byte vectors;
// cache blocks KC (depth, max), MC (A block rows, max), NC (B block columns, max).
//   MR·KC·sizeof(T) ≲ 18 KiB: the A micro-panel stays in L1;
//   KC·NC·sizeof(T) ≲ 512 KiB: the B block stays in (a 1 MiB) L2;
//   MC·KC·sizeof(T) ≲ 4.5 MiB: the shared A block stays in L3.
template <typename T_, int MR_, int NR_, int VB_, int KC_, int MC_, int NC_>
struct Config {
    using T = T_;
    static constexpr int MR = MR_, NR = NR_, VB = VB_, KC = KC_, MC = MC_, NC = NC_;
    static_assert(MC % MR == 0 && NC % NR == 0 && KC % 4 == 0, "blocks are whole panels");
};

// AVX-512: 32 zmm registers; 12×2 accumulators + 2 for B + broadcasts.
// KC = 384, NC = 384: B block 576 KiB (measured against NC = 320 / 512 and
// KC = 256 / 512 on the GPT-2 shapes: within 1-3%, this the best overall).
using Avx512F32 = Config<float, 12, 32, 64, 384, 3072, 384>;
using Avx512F64 = Config<double, 12, 16, 64, 256, 2304, 256>;
// AVX2+FMA: 16 ymm registers; 6×2 accumulators + 2 for B + 1 broadcast.
using Avx2F32 = Config<float, 6, 16, 32, 384, 3072, 320>;
using Avx2F64 = Config<double, 6, 8, 32, 256, 2304, 256>;
// Baseline (SSE2 on x86-64, NEON on aarch64): 16-byte vectors, 4×2 accumulators.
using GenericF32 = Config<float, 4, 8, 16, 256, 2048, 512>;
using GenericF64 = Config<double, 4, 4, 16, 256, 2048, 256>;

// The part of C one task computes: rows [i0, i0+m), columns [j0, j0+n) of
// batch item `item`.
struct Tile {
    index_t item, i0, m, j0, n;
    index_t p0 = 0, p1 = 0;  // depth range (few-rows path, B stored K×N)
};

// ---------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------

// Copy op(A)[i0:i0+m, p0:p0+kc] into panels of MR rows: element (i, p) of
// panel r goes to out[(r·kc + p)·MR + i]. Missing rows of the last panel are 0.
template <typename T, int MR>
NF_INLINE void pack_a(const T* a, bool trans, index_t lda, index_t i0, index_t m, index_t p0,
                      index_t kc, T* out) {
    for (index_t r0 = 0; r0 < m; r0 += MR, out += MR * kc) {
        const index_t rows = std::min<index_t>(MR, m - r0);
        if (!trans && rows == MR) {
            // A is M×K: MR row streams, read in step; each p writes MR
            // consecutive values (one or two cache lines).
            const T* src[MR];
            for (int i = 0; i < MR; ++i) src[i] = a + (i0 + r0 + i) * lda + p0;
            for (index_t p = 0; p < kc; ++p)
#pragma GCC unroll 16
                for (int i = 0; i < MR; ++i) out[p * MR + i] = src[i][p];
            continue;
        }
        if (!trans) {  // op(A)(i, p) = a[i·lda + p], lda = K
            for (index_t i = 0; i < rows; ++i) {
                const T* src = a + (i0 + r0 + i) * lda + p0;
                for (index_t p = 0; p < kc; ++p) out[p * MR + i] = src[p];
            }
        } else {  // A is stored K×M: op(A)(i, p) = a[p·lda + i], lda = M — rows are contiguous
            for (index_t p = 0; p < kc; ++p) {
                const T* src = a + (p0 + p) * lda + i0 + r0;
                for (index_t i = 0; i < rows; ++i) out[p * MR + i] = src[i];
            }
        }
        for (index_t i = rows; i < MR; ++i)
            for (index_t p = 0; p < kc; ++p) out[p * MR + i] = T(0);
    }
}

// Copy op(B)[p0:p0+kc, j0:j0+n] into panels of NR columns: element (p, j) of
// panel s goes to out[(s·kc + p)·NR + j]. Missing columns are 0.
template <typename T, int NR>
NF_INLINE void pack_b(const T* b, bool trans, index_t ldb, index_t j0, index_t n, index_t p0,
                      index_t kc, T* out) {
    for (index_t s0 = 0; s0 < n; s0 += NR, out += NR * kc) {
        const index_t cols = std::min<index_t>(NR, n - s0);
        if (!trans) {  // B is K×N: op(B)(p, j) = b[p·ldb + j], ldb = N — a row is NR contiguous values
            for (index_t p = 0; p < kc; ++p) {
                const T* src = b + (p0 + p) * ldb + j0 + s0;
                T* dst = out + p * NR;
                if (cols == NR) {
                    std::memcpy(dst, src, sizeof(T) * NR);
                } else {
                    for (index_t j = 0; j < cols; ++j) dst[j] = src[j];
                    for (index_t j = cols; j < NR; ++j) dst[j] = T(0);
                }
            }
        } else if (cols == NR) {  // B is stored N×K: NR row streams of B, read in step
            const T* src[NR];
            for (int j = 0; j < NR; ++j) src[j] = b + (j0 + s0 + j) * ldb + p0;
            for (index_t p = 0; p < kc; ++p)
#pragma GCC unroll 32
                for (int j = 0; j < NR; ++j) out[p * NR + j] = src[j][p];
        } else {
            for (index_t j = 0; j < cols; ++j) {
                const T* src = b + (j0 + s0 + j) * ldb + p0;
                for (index_t p = 0; p < kc; ++p) out[p * NR + j] = src[p];
            }
            for (index_t j = cols; j < NR; ++j)
                for (index_t p = 0; p < kc; ++p) out[p * NR + j] = T(0);
        }
    }
}

// ---------------------------------------------------------------------------
// Micro-kernels: C[0:m, 0:n] (+)= Ap (MR×kc panel) · Bp (kc×NR panel)
// ---------------------------------------------------------------------------
//
// acc[i][·] = Σ_p a[p][i] · b[p][·] — an outer-product update per step p:
// one broadcast of a[p][i] times NR/VL vectors of B, MR·NR/VL FMAs per p,
// with all MR·NR partial sums held in vector registers.
//
// Write-back: C = C_old + (bias + acc). On the first depth slice C_old is
// only read when accumulating (load_c) and the bias (if any) is added, so C
// is written once per slice and never needs a separate initialisation pass.
// Every variant uses exactly this expression, so results are identical
// whether a tile is full or at an edge.

// Portable version (GCC/Clang vector extensions; scalar elsewhere). Used for
// the AVX2 and generic instruction sets and for double on AVX-512.
template <typename T, int MR, int NR, int VB>
NF_INLINE void micro_kernel(index_t kc, const T* NF_RESTRICT a, const T* NF_RESTRICT b,
                            T* NF_RESTRICT c, index_t ldc, index_t m, index_t n, bool load_c,
                            const T* NF_RESTRICT bias) {
#if defined(__GNUC__) || defined(__clang__)
    // V is VB bytes of T, arithmetic is lane-wise, `vector * scalar` broadcasts.
    typedef T V __attribute__((vector_size(VB)));
    constexpr int VL = VB / int(sizeof(T));  // lanes per vector
    constexpr int NV = NR / VL;              // vectors per row of the tile
    static_assert(NR % VL == 0, "NR is a whole number of vectors");

    V acc[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = V{};

    for (index_t p = 0; p < kc; ++p, a += MR, b += NR) {
        V bv[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + v * VL, sizeof(V));
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            const T ai = a[i];
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) acc[i][v] += bv[v] * ai;  // FMA when the target has it
        }
    }

    if (m == MR && n == NR) {  // full tile: vector read-modify-write of C
        V bias_v[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
            bias_v[v] = V{};
            if (bias != nullptr) std::memcpy(&bias_v[v], bias + v * VL, sizeof(V));
        }
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) {
                V cv = V{};
                if (load_c) std::memcpy(&cv, c + i * ldc + v * VL, sizeof(V));
                cv += bias_v[v] + acc[i][v];
                std::memcpy(c + i * ldc + v * VL, &cv, sizeof(V));
            }
    } else {  // edge tile: only the m×n corner exists in C
        T tile[MR][NR];
        std::memcpy(tile, acc, sizeof(tile));
        for (index_t i = 0; i < m; ++i)
            for (index_t j = 0; j < n; ++j)
                c[i * ldc + j] = (load_c ? c[i * ldc + j] : T(0)) +
                                 ((bias != nullptr ? bias[j] : T(0)) + tile[i][j]);
    }
#else
    (void)VB;
    T acc[MR][NR] = {};
    for (index_t p = 0; p < kc; ++p, a += MR, b += NR)
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) acc[i][j] += a[i] * b[j];
    for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j)
            c[i * ldc + j] = (load_c ? c[i * ldc + j] : T(0)) +
                             ((bias != nullptr ? bias[j] : T(0)) + acc[i][j]);
#endif
}

#if NUMFORMER_X86_DISPATCH
// AVX-512 float, 12×32, written with intrinsics for control over the hot loop:
// per step of k, two aligned 64-byte loads of B, 12 broadcasts of A and 24
// FMAs into zmm accumulators (24 + 2 + broadcast registers ≤ 32). On Zen 4 a
// zmm FMA issues as two 256-bit halves, one per cycle, with latency 4: the 24
// independent accumulator chains hide the latency six times over.
//
// Prefetching: the MR rows of C are prefetched before the k loop so that the
// read-modify-write at the end does not stall on L3/memory. The packed B
// panel streams from L2 sequentially; the hardware prefetcher keeps up with
// it (software prefetches 8 steps ahead measured 0.4% slower: two more
// load-port µops per 24 FMAs for nothing).

NF_TARGET("avx512f,avx2,fma")
NF_INLINE void micro_avx512_f32(index_t kc, const float* NF_RESTRICT a, const float* NF_RESTRICT b,
                                float* NF_RESTRICT c, index_t ldc, index_t m, index_t n,
                                bool load_c, const float* NF_RESTRICT bias) {
    constexpr int MR = 12;
    const index_t last = std::min<index_t>(n, 32) - 1;
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i)
        if (i < m) {
            _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + last), _MM_HINT_T0);
        }

    __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();

#pragma GCC unroll 4
    for (index_t p = 0; p < kc; ++p, a += MR, b += 32) {
        const __m512 b0 = _mm512_load_ps(b);  // packed panels are 64-byte aligned
        const __m512 b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) {
            const __m512 ai = _mm512_set1_ps(a[i]);
            acc0[i] = _mm512_fmadd_ps(ai, b0, acc0[i]);
            acc1[i] = _mm512_fmadd_ps(ai, b1, acc1[i]);
        }
    }

    // Masks select the n ≤ 32 columns that exist; masked-off lanes are
    // neither read nor written (no fault, no data race with a neighbour).
    const __mmask16 k0 = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
    const __mmask16 k1 = n >= 32 ? __mmask16(0xFFFF)
                                 : n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1u);
    __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
    if (bias != nullptr) {
        bias0 = _mm512_maskz_loadu_ps(k0, bias);
        bias1 = _mm512_maskz_loadu_ps(k1, bias + 16);
    }
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i)
        if (i < m) {
            float* row = c + i * ldc;
            __m512 v0 = _mm512_add_ps(bias0, acc0[i]);
            __m512 v1 = _mm512_add_ps(bias1, acc1[i]);
            if (load_c) {
                v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(k0, row), v0);
                v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(k1, row + 16), v1);
            }
            _mm512_mask_storeu_ps(row, k0, v0);
            _mm512_mask_storeu_ps(row + 16, k1, v1);
        }
}
#endif

// C[0:m, 0:n] (+)= Ap panel (MR×kc) · the whole packed B block (kc × n, in
// NR panels): the jr loop. The A panel stays in L1 throughout.
template <typename Cfg>
NF_INLINE void sweep_block(index_t kc, const typename Cfg::T* ap, const typename Cfg::T* bp,
                             index_t n, typename Cfg::T* c, index_t ldc, index_t m, bool load_c,
                             const typename Cfg::T* bias) {
    constexpr int NR = Cfg::NR;
    for (index_t j = 0; j < n; j += NR)
        micro_kernel<typename Cfg::T, Cfg::MR, NR, Cfg::VB>(
            kc, ap, bp + j * kc, c + j, ldc, m, std::min<index_t>(NR, n - j), load_c,
            bias != nullptr ? bias + j : nullptr);
}

// C = bias (or 0), or C += bias when accumulating: what the product is when
// K = 0 (the tiled path folds this into the first depth slice otherwise).
template <typename T>
NF_INLINE void init_rows(T* c, index_t ldc, index_t m, index_t n, const T* bias, bool accumulate) {
    if (accumulate && bias == nullptr) return;
    for (index_t i = 0; i < m; ++i) {
        T* row = c + i * ldc;
        if (accumulate)
            for (index_t j = 0; j < n; ++j) row[j] += bias[j];
        else if (bias != nullptr)
            for (index_t j = 0; j < n; ++j) row[j] = bias[j];
        else
            for (index_t j = 0; j < n; ++j) row[j] = T(0);
    }
}

// ---------------------------------------------------------------------------
// Few rows (M ≤ kGemmStreamRows = 16): row-vector products, B read in place
// ---------------------------------------------------------------------------
//
// Sampling with a KV cache multiplies one token's row at a time (M = 1).
// Packing a K×N slice of B for a single row would cost more than the product,
// so this path streams B once, as stored, for all M rows:
//   B is K×N:  P_c[i, j0:j1] = Σ_{p in chunk c} op(A)[i, p] · B[p, j0:j1]
//              C[i, j] (+)= bias_j + Σ_c P_c[i, j]          (chunks in order)
//   B is N×K:  C[i, j]      = Σ_p op(A)[i, p] · B[j, p]   (contiguous dots)
// For B stored K×N a task is one chunk of kSmallDepth rows of B (times all
// columns, or 8192 of them): one contiguous run of memory per task, which
// each core's prefetcher streams at full speed. (Splitting the columns
// between threads instead had each thread read every row of B in pieces of
// N/threads columns: the 3072×768 MLP projection read at 28 GB/s against 34
// for the contiguous LM head.) The partial sums P_c are M×N floats per
// chunk, added in chunk order, so the result does not depend on the thread
// count. For B stored N×K a task is a block of kSmallCols columns of C.
// M ≤ 8 covers batched generation (8 prompts): GPT-2 124M decoding at batch
// 8 went from 75 to 106 tokens/s against the packed path (2 threads). Up to
// 16 rows it also beats packing for a short prompt's prefill (Zen 3, 2
// threads, min of 7; this path / packed): at M = 16 the MLP's 768×3072
// 1.45 / 1.88 ms, its 3072×768 0.87 / 1.58 ms, the LM head 22 / 26 ms; at
// M = 24 packing wins (fc 1.5 against 2.1 ms, head 28 against 35 ms).
constexpr index_t kSmallCols = 512;    // columns per task when B is N×K (dot products)
constexpr index_t kWideCols = 8192;    // at most, when B is K×N (streamed rows); see few_rows
constexpr index_t kSmallDepth = 128;   // rows of B (K×N) per task

// !trans_b: part[i·n + j] = Σ_{p0 ≤ p < p1} op(A)[i, p] · B[p, j] for the
// tile's columns (part: M×N, this chunk's partial sums).
// trans_b:  C[i, j] (+)= bias_j + Σ_p op(A)[i, p] · B[j, p].
template <typename T>
NF_INLINE void compute_rows(const GemmProblem<T>& pr, const Tile& t, T* ap, T* part) {
    const index_t m = pr.m, n = pr.n, k = pr.k;
    const T* a = pr.a + t.item * m * k;
    const T* b = pr.b + t.item * k * n;
    T* c = pr.c + t.item * m * n;

    // The M rows of op(A), contiguous: A itself, or gathered from A's columns
    // (only the depth range the tile reads).
    const index_t q0 = pr.trans_b ? 0 : t.p0, q1 = pr.trans_b ? k : t.p1;
    const T* rows = a;
    if (pr.trans_a) {
        for (index_t i = 0; i < m; ++i)
            for (index_t p = q0; p < q1; ++p) ap[i * k + p] = a[p * m + i];  // A is K×M
        rows = ap;
    }

    if (!pr.trans_b) {
        for (index_t i = 0; i < m; ++i)
            std::fill(part + i * n + t.j0, part + i * n + t.j0 + t.n, T(0));
        // Eight rows of B per sweep over the C row: an eighth of the C traffic
        // (measured on one core, M = 1: 19–28 GB/s of B against 15–21 with
        // four rows; sixteen rows spill the row pointers and lose).
        index_t p = t.p0;
        for (; p + 8 <= t.p1; p += 8) {
            const T* NF_RESTRICT b0 = b + p * n + t.j0;
            const T* NF_RESTRICT b1 = b0 + n;
            const T* NF_RESTRICT b2 = b1 + n;
            const T* NF_RESTRICT b3 = b2 + n;
            const T* NF_RESTRICT b4 = b3 + n;
            const T* NF_RESTRICT b5 = b4 + n;
            const T* NF_RESTRICT b6 = b5 + n;
            const T* NF_RESTRICT b7 = b6 + n;
            for (index_t i = 0; i < m; ++i) {
                const T* ai = rows + i * k + p;
                const T a0 = ai[0], a1 = ai[1], a2 = ai[2], a3 = ai[3];
                const T a4 = ai[4], a5 = ai[5], a6 = ai[6], a7 = ai[7];
                T* NF_RESTRICT c_row = part + i * n + t.j0;
                for (index_t j = 0; j < t.n; ++j)
                    c_row[j] += ((a0 * b0[j] + a1 * b1[j]) + (a2 * b2[j] + a3 * b3[j])) +
                                ((a4 * b4[j] + a5 * b5[j]) + (a6 * b6[j] + a7 * b7[j]));
            }
        }
        for (; p + 4 <= t.p1; p += 4) {
            const T* NF_RESTRICT b0 = b + p * n + t.j0;
            const T* NF_RESTRICT b1 = b0 + n;
            const T* NF_RESTRICT b2 = b1 + n;
            const T* NF_RESTRICT b3 = b2 + n;
            for (index_t i = 0; i < m; ++i) {
                const T* ai = rows + i * k + p;
                const T a0 = ai[0], a1 = ai[1], a2 = ai[2], a3 = ai[3];
                T* NF_RESTRICT c_row = part + i * n + t.j0;
                for (index_t j = 0; j < t.n; ++j)
                    c_row[j] += (a0 * b0[j] + a1 * b1[j]) + (a2 * b2[j] + a3 * b3[j]);
            }
        }
        for (; p < t.p1; ++p) {
            const T* NF_RESTRICT b_row = b + p * n + t.j0;
            for (index_t i = 0; i < m; ++i) {
                const T a_ip = rows[i * k + p];
                T* NF_RESTRICT c_row = part + i * n + t.j0;
                for (index_t j = 0; j < t.n; ++j) c_row[j] += a_ip * b_row[j];
            }
        }
    } else {
        // C[i, j] = C_old + (bias_j + dot(A row i, B row j)). Four rows of A
        // per read of a B row (dot4_lanes); the 1–3 rows left over take four
        // B rows per read of the A row (dot_lanes_b4: at M = 1 that is four
        // memory streams). Every dot is summed in dot_lanes's order, so the
        // grouping never changes a bit.
        auto store = [&](index_t i, index_t j, T d) {
            T& cij = c[i * n + j];
            cij = (pr.accumulate ? cij : T(0)) + ((pr.bias ? pr.bias[j] : T(0)) + d);
        };
        const index_t m4 = m / 4 * 4, j_end = t.j0 + t.n;
        for (index_t j = t.j0; j < j_end; ++j) {
            const T* b_row = b + j * k;  // row j of B = column j of op(B)
            for (index_t i = 0; i < m4; i += 4) {
                T d[4];
                dot4_lanes(rows + i * k, rows + (i + 1) * k, rows + (i + 2) * k, rows + (i + 3) * k, b_row, k, d);
                for (index_t r = 0; r < 4; ++r) store(i + r, j, d[r]);
            }
        }
        index_t j = t.j0;
        for (; j + 4 <= j_end; j += 4)
            for (index_t i = m4; i < m; ++i) {
                T d[4];
                dot_lanes_b4(rows + i * k, b + j * k, b + (j + 1) * k, b + (j + 2) * k, b + (j + 3) * k, k, d);
                for (index_t r = 0; r < 4; ++r) store(i, j + r, d[r]);
            }
        for (; j < j_end; ++j)
            for (index_t i = m4; i < m; ++i) store(i, j, dot_lanes(rows + i * k, b + j * k, k));
    }
}

// ---------------------------------------------------------------------------
// Instruction-set variants (the same templates, compiled three ways)
// ---------------------------------------------------------------------------

template <typename T>
using PackFn = void (*)(const T*, bool, index_t, index_t, index_t, index_t, index_t, T*);
template <typename T>
using SweepFn = void (*)(index_t, const T*, const T*, index_t, T*, index_t, index_t, bool,
                         const T*);
template <typename T>
using RowsFn = void (*)(const GemmProblem<T>&, const Tile&, T*, T*);

template <typename T>
struct Kernel {
    index_t mr, nr, kc, mc, nc;
    PackFn<T> pack_a, pack_b;
    SweepFn<T> sweep;  // packed, register-tiled path: one A panel × one B block
    RowsFn<T> rows;    // few-rows path
};

// Each wrapper instantiates the (always-inlined) template bodies inside a
// function compiled for one instruction set. NF_TARGET is empty for generic.
#define NF_GEMM_VARIANT(NAME, TARGET)                                                         \
    template <typename Cfg>                                                                   \
    TARGET void pack_a_##NAME(const typename Cfg::T* a, bool t, index_t ld, index_t i0,       \
                              index_t m, index_t p0, index_t kc, typename Cfg::T* out) {      \
        pack_a<typename Cfg::T, Cfg::MR>(a, t, ld, i0, m, p0, kc, out);                       \
    }                                                                                         \
    template <typename Cfg>                                                                   \
    TARGET void pack_b_##NAME(const typename Cfg::T* b, bool t, index_t ld, index_t j0,       \
                              index_t n, index_t p0, index_t kc, typename Cfg::T* out) {      \
        pack_b<typename Cfg::T, Cfg::NR>(b, t, ld, j0, n, p0, kc, out);                       \
    }                                                                                         \
    template <typename Cfg>                                                                   \
    TARGET void sweep_##NAME(index_t kc, const typename Cfg::T* ap, const typename Cfg::T* bp, \
                             index_t n, typename Cfg::T* c, index_t ldc, index_t m,           \
                             bool load_c, const typename Cfg::T* bias) {                      \
        sweep_block<Cfg>(kc, ap, bp, n, c, ldc, m, load_c, bias);                             \
    }                                                                                         \
    template <typename T>                                                                     \
    TARGET void rows_##NAME(const GemmProblem<T>& p, const Tile& t, T* ap, T* bp) {          \
        compute_rows(p, t, ap, bp);                                                           \
    }                                                                                         \
    template <typename Cfg>                                                                   \
    Kernel<typename Cfg::T> kernel_##NAME() {                                                 \
        return {Cfg::MR,           Cfg::NR,           Cfg::KC,         Cfg::MC,               \
                Cfg::NC,           pack_a_##NAME<Cfg>, pack_b_##NAME<Cfg>, sweep_##NAME<Cfg>, \
                rows_##NAME<typename Cfg::T>};                                                \
    }

NF_GEMM_VARIANT(generic, )
#if NUMFORMER_X86_DISPATCH
NF_GEMM_VARIANT(avx2, NF_TARGET("avx2,fma"))
NF_GEMM_VARIANT(avx512, NF_TARGET("avx512f,avx2,fma"))

// The float AVX-512 sweep uses the hand-written 12×32 micro-kernel.
NF_TARGET("avx512f,avx2,fma")
void sweep_avx512_f32(index_t kc, const float* ap, const float* bp, index_t n, float* c,
                      index_t ldc, index_t m, bool load_c, const float* bias) {
    static_assert(Avx512F32::MR == 12 && Avx512F32::NR == 32, "micro_avx512_f32 is 12×32");
    for (index_t j = 0; j < n; j += 32)
        micro_avx512_f32(kc, ap, bp + j * kc, c + j, ldc, m, std::min<index_t>(32, n - j), load_c,
                         bias != nullptr ? bias + j : nullptr);
}
#endif
#undef NF_GEMM_VARIANT

Kernel<float> kernel_for(Isa isa, float /*tag*/) {
#if NUMFORMER_X86_DISPATCH
    if (isa == Isa::avx512) {
        Kernel<float> k = kernel_avx512<Avx512F32>();
        k.sweep = sweep_avx512_f32;
        return k;
    }
    if (isa == Isa::avx2) return kernel_avx2<Avx2F32>();
#endif
    (void)isa;
    return kernel_generic<GenericF32>();
}

Kernel<double> kernel_for(Isa isa, double /*tag*/) {
#if NUMFORMER_X86_DISPATCH
    if (isa == Isa::avx512) return kernel_avx512<Avx512F64>();
    if (isa == Isa::avx2) return kernel_avx2<Avx2F64>();
#endif
    (void)isa;
    return kernel_generic<GenericF64>();
}

// ---------------------------------------------------------------------------
// Scratch memory
// ---------------------------------------------------------------------------

// 64-byte aligned scratch for the packed blocks. One arena per *calling*
// thread (thread_local), grown on demand and kept between calls, so a
// training loop does not allocate on every product; concurrent Python threads
// each get their own. It is grown before any parallel region, so
// std::bad_alloc reaches Python as MemoryError.
class Arena {
public:
    Arena() = default;
    Arena(const Arena&) = delete;
    Arena& operator=(const Arena&) = delete;
    ~Arena() { release(); }

    void* get(size_t bytes) {
        if (bytes > capacity_) {
            void* fresh = ::operator new(bytes, std::align_val_t{64});  // may throw: old kept
            release();
            data_ = fresh;
            capacity_ = bytes;
        }
        return data_;
    }

private:
    void release() {
        if (data_ != nullptr) ::operator delete(data_, std::align_val_t{64});
        data_ = nullptr;
        capacity_ = 0;
    }
    void* data_ = nullptr;
    size_t capacity_ = 0;
};

template <typename T>
T* arena_floats(index_t count) {
    static thread_local Arena arena;
    return static_cast<T*>(arena.get(sizeof(T) * static_cast<size_t>(std::max<index_t>(count, 1))));
}

// Below this many flops a product runs on one thread: waking a thread team
// costs microseconds, which is all a product this small takes.
constexpr double kParallelFlops = 1 << 20;

// ---------------------------------------------------------------------------
// Blocked drivers
// ---------------------------------------------------------------------------

// Block sizes for one problem. The depth slice is balanced (K = 400 with
// KC = 384 becomes two slices of 200, not 384 + 16) and depends only on K and
// the kernel, never on the thread count (determinism, see the top). MC and NC
// are balanced the same way and are free to vary: they do not change any sum.
struct Blocking {
    index_t kc, mc, nc;
};

template <typename T>
Blocking blocking_for(const GemmProblem<T>& pr, const Kernel<T>& kern) {
    Blocking bk;
    bk.kc = round_up(ceil_div(pr.k, ceil_div(pr.k, kern.kc)), 4);
    bk.mc = round_up(ceil_div(pr.m, ceil_div(pr.m, kern.mc)), kern.mr);
    bk.nc = round_up(ceil_div(pr.n, ceil_div(pr.n, kern.nc)), kern.nr);
    return bk;
}

// Split `count` panels into `parts` contiguous ranges; range `part` is [lo, hi).
inline void split(index_t count, int parts, int part, index_t* lo, index_t* hi) {
    *lo = count * part / parts;
    *hi = count * (part + 1) / parts;
}

// Pointers to batch item `item` of the problem.
template <typename T>
struct Item {
    const T* a;
    const T* b;
    T* c;
};
template <typename T>
Item<T> item_of(const GemmProblem<T>& pr, index_t item) {
    return {pr.a + item * pr.m * pr.k, pr.b + item * pr.k * pr.n, pr.c + item * pr.m * pr.n};
}

// One whole product on the calling thread (used for batches: one item per
// thread). Same loops as blocked_shared, without the sharing.
template <typename T>
void blocked_serial(const GemmProblem<T>& pr, const Kernel<T>& kern, const Blocking& bk,
                    const Item<T>& it, T* ap, T* bp) {
    const index_t m = pr.m, n = pr.n, k = pr.k;
    const index_t lda = pr.trans_a ? m : k, ldb = pr.trans_b ? k : n, ldc = n;
    for (index_t ic = 0; ic < m; ic += bk.mc) {
        const index_t mcur = std::min(bk.mc, m - ic);
        for (index_t pc = 0; pc < k; pc += bk.kc) {
            const index_t kcur = std::min(bk.kc, k - pc);
            const bool first = pc == 0;
            kern.pack_a(it.a, pr.trans_a, lda, ic, mcur, pc, kcur, ap);
            for (index_t jc = 0; jc < n; jc += bk.nc) {
                const index_t ncur = std::min(bk.nc, n - jc);
                kern.pack_b(it.b, pr.trans_b, ldb, jc, ncur, pc, kcur, bp);
                for (index_t ir = 0; ir < mcur; ir += kern.mr)
                    kern.sweep(kcur, ap + ir * kcur, bp, ncur, it.c + (ic + ir) * ldc + jc, ldc,
                               std::min<index_t>(kern.mr, mcur - ir), !first || pr.accumulate,
                               first && pr.bias ? pr.bias + jc : nullptr);
            }
        }
    }
}

// All threads cooperate on each product: A and B blocks packed once and
// shared. There are no barriers: the work is a fixed sequence of small tasks
// handed out by one ticket counter, in the order of the loop nest at the top:
//
//   for each step (item, ic, pc):
//     for each B block (jc) of the step:
//       [pack one A panel] × A panels     (first block of the step only)
//       [pack one B panel] × B panels
//       [compute one A panel × the B block] × A panels
//
// A task only waits for the tasks it reads from or overwrites — computing
// needs its A and B blocks packed; packing B into one of the two buffers
// needs the block that used it two blocks ago computed; packing A needs the
// previous step computed — and every dependency has a smaller ticket, so it
// is already held by some running thread (no deadlock). A thread that the OS
// deschedules (these machines are shared) therefore stalls the others only
// when they need the one task it holds, not at every block as a barrier would.
//
// Each C tile is written by one task per step, and step s+1's tasks start
// only after every task of step s has finished, so the slices of K are
// added in order: the result is the same as blocked_serial's, bit for bit.
struct Step {
    index_t item, ic, pc, mcur, kcur, a_panels;
};
struct Block {
    index_t step, jc, ncur, b_panels, a_tasks, first_ticket;
};

using Counter = std::atomic<index_t>;

inline void cpu_relax() {
#if NUMFORMER_X86_DISPATCH
    __builtin_ia32_pause();
#endif
}

// Spin until counter ≥ target (acquire: the producer's writes are visible).
// After a short spin, yield the core: the producer may be waiting for it.
inline void wait_for(const Counter& counter, index_t target) {
    for (int spins = 0; counter.load(std::memory_order_acquire) < target; ++spins) {
        if (spins < 256)
            cpu_relax();
        else
            std::this_thread::yield();
    }
}

template <typename T>
void blocked_shared(const GemmProblem<T>& pr, const Kernel<T>& kern, const Blocking& bk,
                    int threads, T* ap, T* bp0, T* bp1) {
    const index_t m = pr.m, n = pr.n, k = pr.k, mr = kern.mr, nr = kern.nr;
    const index_t lda = pr.trans_a ? m : k, ldb = pr.trans_b ? k : n, ldc = n;

    // The task list, as steps and blocks (a few hundred at most).
    std::vector<Step> steps;
    std::vector<Block> blocks;
    index_t tickets = 0;
    for (index_t item = 0; item < pr.batch; ++item)
        for (index_t ic = 0; ic < m; ic += bk.mc)
            for (index_t pc = 0; pc < k; pc += bk.kc) {
                Step st{item, ic, pc, std::min(bk.mc, m - ic), std::min(bk.kc, k - pc), 0};
                st.a_panels = ceil_div(st.mcur, mr);
                for (index_t jc = 0; jc < n; jc += bk.nc) {
                    Block b{index_t(steps.size()), jc, std::min(bk.nc, n - jc), 0, 0, tickets};
                    b.b_panels = ceil_div(b.ncur, nr);
                    b.a_tasks = jc == 0 ? st.a_panels : 0;
                    tickets += b.a_tasks + b.b_panels + st.a_panels;
                    blocks.push_back(b);
                }
                steps.push_back(st);
            }
    const index_t blocks_per_step = ceil_div(n, bk.nc);
    const index_t n_steps = index_t(steps.size()), n_blocks = index_t(blocks.size());
    // Completion counts: A panels packed per step, B panels packed per block,
    // A panels computed per block and per step.
    std::unique_ptr<Counter[]> a_packed(new Counter[n_steps]), step_done(new Counter[n_steps]);
    std::unique_ptr<Counter[]> b_packed(new Counter[n_blocks]), block_done(new Counter[n_blocks]);
    for (index_t i = 0; i < n_steps; ++i) a_packed[i].store(0), step_done[i].store(0);
    for (index_t i = 0; i < n_blocks; ++i) b_packed[i].store(0), block_done[i].store(0);
    Counter next_ticket{0};

#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        index_t g = 0;  // this thread's current block (tickets only grow)
        for (;;) {
            const index_t t = next_ticket.fetch_add(1, std::memory_order_relaxed);
            if (t >= tickets) break;
            while (g + 1 < n_blocks && blocks[g + 1].first_ticket <= t) ++g;
            const Block& blk = blocks[g];
            const Step& st = steps[blk.step];
            const Item<T> it = item_of(pr, st.item);
            T* bp = (g & 1) ? bp1 : bp0;
            index_t task = t - blk.first_ticket;

            if (task < blk.a_tasks) {  // pack A panel `task` of this step
                if (blk.step > 0)
                    wait_for(step_done[blk.step - 1], blocks_per_step * steps[blk.step - 1].a_panels);
                const index_t ir = task * mr;
                kern.pack_a(it.a, pr.trans_a, lda, st.ic + ir, std::min(mr, st.mcur - ir), st.pc,
                            st.kcur, ap + ir * st.kcur);
                a_packed[blk.step].fetch_add(1, std::memory_order_release);
                continue;
            }
            task -= blk.a_tasks;
            if (task < blk.b_panels) {  // pack B panel `task` of this block
                if (g >= 2) wait_for(block_done[g - 2], steps[blocks[g - 2].step].a_panels);
                const index_t jr = task * nr;
                kern.pack_b(it.b, pr.trans_b, ldb, blk.jc + jr, std::min(nr, blk.ncur - jr), st.pc,
                            st.kcur, bp + jr * st.kcur);
                b_packed[g].fetch_add(1, std::memory_order_release);
                continue;
            }
            task -= blk.b_panels;  // compute A panel `task` × this B block
            wait_for(a_packed[blk.step], st.a_panels);
            wait_for(b_packed[g], blk.b_panels);
            const index_t ir = task * mr;
            const bool first = st.pc == 0;
            kern.sweep(st.kcur, ap + ir * st.kcur, bp, blk.ncur, it.c + (st.ic + ir) * ldc + blk.jc,
                       ldc, std::min(mr, st.mcur - ir), !first || pr.accumulate,
                       first && pr.bias ? pr.bias + blk.jc : nullptr);
            block_done[g].fetch_add(1, std::memory_order_release);
            step_done[blk.step].fetch_add(1, std::memory_order_release);
        }
    }
}

// C = bias (or 0), or C += bias when accumulating: the product when K = 0.
template <typename T>
void empty_product(const GemmProblem<T>& pr) {
    for (index_t item = 0; item < pr.batch; ++item)
        init_rows(pr.c + item * pr.m * pr.n, pr.n, pr.m, pr.n, pr.bias, pr.accumulate);
}

// Few rows: B read in place. B stored N×K: tasks are column blocks of all M
// rows. B stored K×N: tasks are depth chunks × column blocks, writing partial
// sums that a second loop adds into C (see compute_rows).
template <typename T>
void few_rows(const GemmProblem<T>& pr, const Kernel<T>& kern, int max_threads) {
    const index_t m = pr.m, n = pr.n, k = pr.k;
    const double flops = 2.0 * double(pr.batch) * double(m) * double(n) * double(k);
    const int wanted = flops < kParallelFlops ? 1 : max_threads;
    // Column blocks: 512 for the dot products (B N×K); for B K×N as wide as
    // possible (a chunk's rows are then one contiguous run) while the M
    // partial rows of a task (≤ 8 × 8192 floats) stay in L2.
    const index_t cols = pr.trans_b ? kSmallCols : std::min(kWideCols, round_up(n, 16));
    const index_t tiles_n = ceil_div(n, cols);
    const index_t chunks = pr.trans_b ? 1 : ceil_div(k, kSmallDepth);
    const index_t tasks = pr.batch * chunks * tiles_n;
    const int threads = int(std::min<index_t>(wanted, tasks));
    // Per thread: the M rows of op(A) gathered when A is transposed; then the
    // partial sums, batch × chunks × M×N (none for the dot products).
    const index_t slab = round_up(std::max<index_t>(1, m * k), 16);
    const index_t part_len = pr.trans_b ? 0 : pr.batch * chunks * m * n;
    T* scratch = arena_floats<T>(slab * threads + part_len);
    T* parts = scratch + slab * threads;
    // The second loop: C rows (item, i), in blocks of kReduceCols columns.
    constexpr index_t kReduceCols = 2048;
    const index_t reduce_tiles = ceil_div(n, kReduceCols);
    const index_t reduce_tasks = pr.trans_b ? 0 : pr.batch * m * reduce_tiles;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#if defined(_OPENMP)
        T* ap = scratch + slab * omp_get_thread_num();
#else
        T* ap = scratch;
#endif
#pragma omp for schedule(dynamic, 1)
        for (index_t task = 0; task < tasks; ++task) {
            Tile t;
            t.item = task / (chunks * tiles_n);
            const index_t chunk = task / tiles_n % chunks;
            t.i0 = 0;
            t.m = m;
            t.j0 = (task % tiles_n) * cols;
            t.n = std::min(cols, n - t.j0);
            t.p0 = chunk * kSmallDepth;
            t.p1 = std::min(k, t.p0 + kSmallDepth);
            kern.rows(pr, t, ap, parts + (t.item * chunks + chunk) * m * n);
        }
        // C = C_old (when accumulating) + (bias + P_0 + P_1 + …), chunks in order.
#pragma omp for schedule(static)
        for (index_t task = 0; task < reduce_tasks; ++task) {
            const index_t row = task / reduce_tiles, item = row / m, i = row % m;
            const index_t j0 = (task % reduce_tiles) * kReduceCols, j1 = std::min(n, j0 + kReduceCols);
            const T* part = parts + item * chunks * m * n + i * n;
            T* c_row = pr.c + item * m * n + i * n;
            T sum[kReduceCols];
            for (index_t j = j0; j < j1; ++j) sum[j - j0] = pr.bias != nullptr ? pr.bias[j] : T(0);
            for (index_t ch = 0; ch < chunks; ++ch) {
                const T* NF_RESTRICT pc = part + ch * m * n;
                for (index_t j = j0; j < j1; ++j) sum[j - j0] += pc[j];
            }
            if (pr.accumulate)
                for (index_t j = j0; j < j1; ++j) c_row[j] += sum[j - j0];
            else
                std::memcpy(c_row + j0, sum, sizeof(T) * size_t(j1 - j0));
        }
    }
}

}  // namespace

template <typename T>
void gemm(const GemmProblem<T>& pr) {
    if (pr.batch <= 0 || pr.m <= 0 || pr.n <= 0) return;  // C is empty
    if (pr.k <= 0) return empty_product(pr);
    const Kernel<T> kern = kernel_for(active_isa(), T{});
    const int max_threads = num_threads();
    if (pr.m <= kGemmStreamRows) return few_rows(pr, kern, max_threads);

    const Blocking bk = blocking_for(pr, kern);
    const double flops = 2.0 * double(pr.batch) * double(pr.m) * double(pr.n) * double(pr.k);
    const index_t a_len = round_up(bk.mc * bk.kc, 16);  // mc is a multiple of MR
    const index_t b_len = round_up(bk.nc * bk.kc, 16);  // nc is a multiple of NR
    int threads = flops < kParallelFlops ? 1 : max_threads;

    // A batch of at least 4 products per thread: one whole product per thread
    // at a time (no barriers, nothing shared; e.g. attention's per-head
    // products). Otherwise every thread works on every product.
    if (threads > 1 && pr.batch >= 4 * index_t(threads)) {
        const index_t slab = a_len + b_len;
        T* scratch = arena_floats<T>(slab * threads);
#pragma omp parallel num_threads(threads)
        {
#if defined(_OPENMP)
            T* ap = scratch + slab * omp_get_thread_num();
#else
            T* ap = scratch;
#endif
#pragma omp for schedule(dynamic, 1)
            for (index_t item = 0; item < pr.batch; ++item)
                blocked_serial(pr, kern, bk, item_of(pr, item), ap, ap + a_len);
        }
        return;
    }

    // Threads beyond the number of A panels would only wait for tasks.
    threads = int(std::min<index_t>(threads, ceil_div(bk.mc, kern.mr)));
    T* scratch = arena_floats<T>(a_len + 2 * b_len);
    if (threads == 1) {
        for (index_t item = 0; item < pr.batch; ++item)
            blocked_serial(pr, kern, bk, item_of(pr, item), scratch, scratch + a_len);
        return;
    }
    blocked_shared(pr, kern, bk, threads, scratch, scratch + a_len, scratch + a_len + b_len);
}

template void gemm<float>(const GemmProblem<float>&);
template void gemm<double>(const GemmProblem<double>&);

}  // namespace numformer::cpu
