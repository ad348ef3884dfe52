// gemm.cpp — cache-blocked, packed matrix product with a register-tiled
// micro-kernel (the classic Goto/BLIS structure, written plainly).
//
// C (M×N) = op(A) (M×K) · op(B) (K×N) is cut into tiles of at most MC×NC
// elements of C; each tile is one task for one thread. Inside a task:
//
//   for p0 in 0..K step KC:                     depth slice
//     pack op(A)[tile rows, p0:p0+KC]  -> Ap    (MC×KC, stays in L2)
//     pack op(B)[p0:p0+KC, tile cols]  -> Bp    (KC×NC)
//     for each NR-wide column panel of Bp:      (KC×NR, stays in L1)
//       for each MR-tall row panel of Ap:
//         C[MR×NR] += Ap_panel · Bp_panel       micro-kernel, all in registers
//
// Packing copies each slice into the order the micro-kernel reads it
// (contiguous, zero-padded to whole MR/NR panels), so
//   * the four transpose combinations only differ in the packing loops,
//   * the micro-kernel has no edge cases inside its k loop,
//   * every load in the hot loop is unit-stride.
// Products with at most kSmallM rows (a single token during sampling) skip
// packing and stream B as stored (compute_rows below).
//
// Each element of C is produced by exactly one task with a fixed summation
// order, so results do not depend on the number of threads (they do depend,
// in the last bits, on the instruction set, which decides where FMAs are used
// and the KC slicing).
#include "cpu/gemm.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "cpu/reduce.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace numformer::cpu {
namespace {

index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
index_t round_up(index_t a, index_t b) { return ceil_div(a, b) * b; }

// One variant of the kernel: register tile MR×NR built from VB-byte vectors,
// cache blocks KC (depth), MC (rows per task) and NC (columns per task).
//   KC·NR·sizeof(T) ≈ 16 KiB so a B micro-panel sits in half of L1;
//   MC·KC·sizeof(T) ≈ 72-576 KiB so the A block sits in L2;
//   MC, NC are also the task grain for threading.
template <typename T_, int MR_, int NR_, int VB_, int KC_, int MC_, int NC_>
struct Config {
    using T = T_;
    static constexpr int MR = MR_, NR = NR_, VB = VB_, KC = KC_, MC = MC_, NC = NC_;
    static_assert(MC % MR == 0 && NC % NR == 0, "blocks are whole panels");
};

// AVX-512: 32 zmm registers; 12×2 accumulators + 2 for B + 1 broadcast.
using Avx512F32 = Config<float, 12, 32, 64, 128, 144, 256>;
using Avx512F64 = Config<double, 12, 16, 64, 128, 144, 256>;
// AVX2+FMA: 16 ymm registers; 6×2 accumulators + 2 for B + 1 broadcast.
using Avx2F32 = Config<float, 6, 16, 32, 256, 144, 256>;
using Avx2F64 = Config<double, 6, 8, 32, 256, 144, 256>;
// Baseline (SSE2 on x86-64, NEON on aarch64): 16-byte vectors, 4×2 accumulators.
using GenericF32 = Config<float, 4, 8, 16, 512, 144, 256>;
using GenericF64 = Config<double, 4, 4, 16, 512, 144, 256>;

// The part of C one task computes: rows [i0, i0+m), columns [j0, j0+n) of
// batch item `item`.
struct Tile {
    index_t item, i0, m, j0, n;
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
        if (!trans) {  // A is M×K: op(A)(i, p) = a[i·lda + p], lda = K
            for (index_t i = 0; i < rows; ++i) {
                const T* src = a + (i0 + r0 + i) * lda + p0;
                for (index_t p = 0; p < kc; ++p) out[p * MR + i] = src[p];
            }
        } else {  // A is stored K×M: op(A)(i, p) = a[p·lda + i], lda = M
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
        if (!trans) {  // B is K×N: op(B)(p, j) = b[p·ldb + j], ldb = N
            for (index_t p = 0; p < kc; ++p) {
                const T* src = b + (p0 + p) * ldb + j0 + s0;
                T* dst = out + p * NR;
                for (index_t j = 0; j < cols; ++j) dst[j] = src[j];
                for (index_t j = cols; j < NR; ++j) dst[j] = T(0);
            }
        } else {  // B is stored N×K: op(B)(p, j) = b[j·ldb + p], ldb = K
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
// Micro-kernel: C[0:m, 0:n] += Ap (MR×kc panel) · Bp (kc×NR panel)
// ---------------------------------------------------------------------------
//
// acc[i][·] = Σ_p a[p][i] · b[p][·] — an outer-product update per step p:
// one broadcast of a[p][i] times NR/VL vectors of B, MR·NR/VL FMAs per p,
// with all MR·NR partial sums held in vector registers.
//
// Write-back: C = C + acc normally. On the first depth slice C's old value is
// only kept when accumulating (load_c) and the bias (if any) is added, so C
// is written once per slice and never needs a separate initialisation pass.
template <typename T, int MR, int NR, int VB>
NF_INLINE void micro_kernel(index_t kc, const T* NF_RESTRICT a, const T* NF_RESTRICT b,
                            T* NF_RESTRICT c, index_t ldc, index_t m, index_t n, bool load_c,
                            const T* NF_RESTRICT bias) {
#if defined(__GNUC__) || defined(__clang__)
    // GCC/Clang vector extensions: V is VB bytes of T, arithmetic is lane-wise,
    // and `vector * scalar` broadcasts the scalar.
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

// ---------------------------------------------------------------------------
// One task: a tile of C, all of K
// ---------------------------------------------------------------------------

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

template <typename Cfg>
NF_INLINE void compute_tile(const GemmProblem<typename Cfg::T>& pr, const Tile& t,
                            typename Cfg::T* ap, typename Cfg::T* bp) {
    using T = typename Cfg::T;
    constexpr int MR = Cfg::MR, NR = Cfg::NR;
    const T* a = pr.a + t.item * pr.m * pr.k;
    const T* b = pr.b + t.item * pr.k * pr.n;
    const index_t lda = pr.trans_a ? pr.m : pr.k;  // row length of A as stored
    const index_t ldb = pr.trans_b ? pr.k : pr.n;  // row length of B as stored
    const index_t ldc = pr.n;
    T* c = pr.c + t.item * pr.m * pr.n + t.i0 * ldc + t.j0;

    const T* bias = pr.bias ? pr.bias + t.j0 : nullptr;
    if (pr.k == 0) init_rows(c, ldc, t.m, t.n, bias, pr.accumulate);

    for (index_t p0 = 0; p0 < pr.k; p0 += Cfg::KC) {
        const index_t kc = std::min<index_t>(Cfg::KC, pr.k - p0);
        const bool first = p0 == 0;  // the slice that also applies bias / old C
        pack_a<T, MR>(a, pr.trans_a, lda, t.i0, t.m, p0, kc, ap);
        pack_b<T, NR>(b, pr.trans_b, ldb, t.j0, t.n, p0, kc, bp);
        for (index_t j = 0; j < t.n; j += NR) {
            const T* b_panel = bp + (j / NR) * NR * kc;
            const index_t n_here = std::min<index_t>(NR, t.n - j);
            for (index_t i = 0; i < t.m; i += MR) {
                const T* a_panel = ap + (i / MR) * MR * kc;
                micro_kernel<T, MR, NR, Cfg::VB>(kc, a_panel, b_panel, c + i * ldc + j, ldc,
                                                 std::min<index_t>(MR, t.m - i), n_here,
                                                 !first || pr.accumulate,
                                                 first && bias ? bias + j : nullptr);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Few rows (M ≤ kSmallM): row-vector products, B read in place
// ---------------------------------------------------------------------------
//
// Sampling with a KV cache multiplies one token's row at a time (M = 1).
// Packing a K×N slice of B for a single row would cost more than the product,
// so this path streams B once, as stored, for all M rows:
//   B is K×N:  C[i, j0:j1] += op(A)[i, p] · B[p, j0:j1]   for p = 0..K−1
//   B is N×K:  C[i, j]      = Σ_p op(A)[i, p] · B[j, p]   (contiguous dots)
// A task is a block of kSmallCols columns of C (all M rows).
constexpr index_t kSmallM = 4;
constexpr index_t kSmallCols = 512;

template <typename T>
NF_INLINE void compute_rows(const GemmProblem<T>& pr, const Tile& t, T* ap, T* /*unused*/) {
    const index_t m = pr.m, n = pr.n, k = pr.k;
    const T* a = pr.a + t.item * m * k;
    const T* b = pr.b + t.item * k * n;
    T* c = pr.c + t.item * m * n;

    // The M rows of op(A), contiguous: A itself, or gathered from A's columns.
    const T* rows = a;
    if (pr.trans_a) {
        for (index_t i = 0; i < m; ++i)
            for (index_t p = 0; p < k; ++p) ap[i * k + p] = a[p * m + i];  // A is K×M
        rows = ap;
    }

    if (!pr.trans_b) {
        init_rows(c + t.j0, n, m, t.n, pr.bias ? pr.bias + t.j0 : nullptr, pr.accumulate);
        // Four rows of B per sweep over the C row: a quarter of the C traffic.
        index_t p = 0;
        for (; p + 4 <= k; p += 4) {
            const T* NF_RESTRICT b0 = b + p * n + t.j0;
            const T* NF_RESTRICT b1 = b0 + n;
            const T* NF_RESTRICT b2 = b1 + n;
            const T* NF_RESTRICT b3 = b2 + n;
            for (index_t i = 0; i < m; ++i) {
                const T* ai = rows + i * k + p;
                const T a0 = ai[0], a1 = ai[1], a2 = ai[2], a3 = ai[3];
                T* NF_RESTRICT c_row = c + i * n + t.j0;
                for (index_t j = 0; j < t.n; ++j)
                    c_row[j] += (a0 * b0[j] + a1 * b1[j]) + (a2 * b2[j] + a3 * b3[j]);
            }
        }
        for (; p < k; ++p) {
            const T* NF_RESTRICT b_row = b + p * n + t.j0;
            for (index_t i = 0; i < m; ++i) {
                const T a_ip = rows[i * k + p];
                T* NF_RESTRICT c_row = c + i * n + t.j0;
                for (index_t j = 0; j < t.n; ++j) c_row[j] += a_ip * b_row[j];
            }
        }
    } else {
        for (index_t j = t.j0; j < t.j0 + t.n; ++j) {
            const T* b_row = b + j * k;  // row j of B = column j of op(B)
            const T add = pr.bias ? pr.bias[j] : T(0);
            for (index_t i = 0; i < m; ++i) {
                T& cij = c[i * n + j];
                cij = (pr.accumulate ? cij : T(0)) + (add + dot_lanes(rows + i * k, b_row, k));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Instruction-set variants (the same template, compiled three ways)
// ---------------------------------------------------------------------------

template <typename T>
using TileFn = void (*)(const GemmProblem<T>&, const Tile&, T*, T*);

template <typename T>
struct Kernel {
    index_t mr, nr, kc, mc, nc;
    TileFn<T> tile;  // packed, register-tiled path
    TileFn<T> rows;  // few-rows path
};

template <typename Cfg>
Kernel<typename Cfg::T> make_kernel(TileFn<typename Cfg::T> tile, TileFn<typename Cfg::T> rows) {
    return {Cfg::MR, Cfg::NR, Cfg::KC, Cfg::MC, Cfg::NC, tile, rows};
}

// Each wrapper instantiates the (always-inlined) template body inside a
// function compiled for one instruction set.
template <typename Cfg>
void tile_generic(const GemmProblem<typename Cfg::T>& p, const Tile& t, typename Cfg::T* ap,
                  typename Cfg::T* bp) {
    compute_tile<Cfg>(p, t, ap, bp);
}
template <typename T>
void rows_generic(const GemmProblem<T>& p, const Tile& t, T* ap, T* bp) {
    compute_rows(p, t, ap, bp);
}
#if NUMFORMER_X86_DISPATCH
template <typename Cfg>
NF_TARGET("avx2,fma")
void tile_avx2(const GemmProblem<typename Cfg::T>& p, const Tile& t, typename Cfg::T* ap,
               typename Cfg::T* bp) {
    compute_tile<Cfg>(p, t, ap, bp);
}
template <typename T>
NF_TARGET("avx2,fma")
void rows_avx2(const GemmProblem<T>& p, const Tile& t, T* ap, T* bp) {
    compute_rows(p, t, ap, bp);
}
template <typename Cfg>
NF_TARGET("avx512f,avx2,fma")
void tile_avx512(const GemmProblem<typename Cfg::T>& p, const Tile& t, typename Cfg::T* ap,
                 typename Cfg::T* bp) {
    compute_tile<Cfg>(p, t, ap, bp);
}
template <typename T>
NF_TARGET("avx512f,avx2,fma")
void rows_avx512(const GemmProblem<T>& p, const Tile& t, T* ap, T* bp) {
    compute_rows(p, t, ap, bp);
}
#endif

Kernel<float> kernel_for(Isa isa, float /*tag*/) {
#if NUMFORMER_X86_DISPATCH
    if (isa == Isa::avx512) return make_kernel<Avx512F32>(tile_avx512<Avx512F32>, rows_avx512<float>);
    if (isa == Isa::avx2) return make_kernel<Avx2F32>(tile_avx2<Avx2F32>, rows_avx2<float>);
#endif
    (void)isa;
    return make_kernel<GenericF32>(tile_generic<GenericF32>, rows_generic<float>);
}

Kernel<double> kernel_for(Isa isa, double /*tag*/) {
#if NUMFORMER_X86_DISPATCH
    if (isa == Isa::avx512) return make_kernel<Avx512F64>(tile_avx512<Avx512F64>, rows_avx512<double>);
    if (isa == Isa::avx2) return make_kernel<Avx2F64>(tile_avx2<Avx2F64>, rows_avx2<double>);
#endif
    (void)isa;
    return make_kernel<GenericF64>(tile_generic<GenericF64>, rows_generic<double>);
}

// 64-byte aligned scratch memory for the packed panels (one slab per thread).
template <typename T>
class AlignedBuffer {
public:
    explicit AlignedBuffer(index_t count)
        : data_(static_cast<T*>(::operator new(sizeof(T) * static_cast<size_t>(count),
                                               std::align_val_t{64}))) {}
    ~AlignedBuffer() { ::operator delete(data_, std::align_val_t{64}); }
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;
    T* data() const { return data_; }

private:
    T* data_;
};

// Below this many flops a product runs on one thread: waking a thread team
// costs microseconds, which is all a product this small takes.
constexpr double kParallelFlops = 1 << 20;

}  // namespace

template <typename T>
void gemm(const GemmProblem<T>& pr) {
    if (pr.batch <= 0 || pr.m <= 0 || pr.n <= 0) return;  // C is empty
    const Kernel<T> kern = kernel_for(active_isa(), T{});

    // Few rows: tasks are column blocks of all M rows; otherwise MC×NC tiles.
    const bool few_rows = pr.m <= kSmallM;
    const index_t tile_m = few_rows ? pr.m : kern.mc;
    const index_t tile_n = few_rows ? kSmallCols : kern.nc;
    const TileFn<T> run = few_rows ? kern.rows : kern.tile;

    const index_t tiles_m = ceil_div(pr.m, tile_m);
    const index_t tiles_n = ceil_div(pr.n, tile_n);
    const index_t tasks = pr.batch * tiles_m * tiles_n;

    const double flops = 2.0 * double(pr.batch) * double(pr.m) * double(pr.n) * double(pr.k);
    const int threads =
        flops < kParallelFlops ? 1 : int(std::min<index_t>(num_threads(), tasks));

    // Scratch per thread, sized for the largest tile; allocated before the
    // parallel region so that std::bad_alloc reaches Python as MemoryError.
    const index_t kc = std::max<index_t>(1, std::min<index_t>(kern.kc, pr.k));
    const index_t a_len = few_rows ? round_up(std::max<index_t>(1, pr.m * pr.k), 16)
                                   : round_up(round_up(std::min(pr.m, kern.mc), kern.mr) * kc, 16);
    const index_t b_len = few_rows ? 0 : round_up(round_up(std::min(pr.n, kern.nc), kern.nr) * kc, 16);
    const index_t slab = a_len + b_len;
    AlignedBuffer<T> scratch(slab * threads);

#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#if defined(_OPENMP)
        T* ap = scratch.data() + slab * omp_get_thread_num();
#else
        T* ap = scratch.data();
#endif
        T* bp = ap + a_len;
#pragma omp for schedule(dynamic, 1)
        for (index_t task = 0; task < tasks; ++task) {
            // task = (item · tiles_m + tm) · tiles_n + tn
            const index_t tn = task % tiles_n;
            const index_t tm = (task / tiles_n) % tiles_m;
            Tile t;
            t.item = task / (tiles_n * tiles_m);
            t.i0 = tm * tile_m;
            t.m = std::min(tile_m, pr.m - t.i0);
            t.j0 = tn * tile_n;
            t.n = std::min(tile_n, pr.n - t.j0);
            run(pr, t, ap, bp);
        }
    }
}

template void gemm<float>(const GemmProblem<float>&);
template void gemm<double>(const GemmProblem<double>&);

}  // namespace numformer::cpu
