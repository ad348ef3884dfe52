// quant.cpp — y = (x · q) ⊙ s + b with int8 weights q (K×N), float32 x (M×K).
//
// Why this is cheap to get right: q[p, j] → float is exact (|q| ≤ 127 needs
// 7 bits of a 24-bit significand), and the scale s[j] belongs to output
// column j, so
//     y[i, j] = Σ_p x[i, p] · (s[j] q[p, j]) + b[j] = s[j] · (Σ_p x[i, p] q[p, j]) + b[j].
// We accumulate Σ_p x·q in float32 (the same sum a float GEMM would form on
// the integer-valued matrix) and multiply by s[j] once per output element.
//
// Two regimes:
//
// * M ≤ kInt8StreamRows (sampling: one row per sequence in the batch). The
//   product is bound by reading q: K·N bytes for 2·M·K·N flops. That is the
//   whole point of int8 weights — a quarter of float32's memory traffic —
//   so q is streamed once, as stored, and converted to float in registers:
//
//     task = a block of NB = 64 columns (4 vectors of 16 floats)
//     for each group of up to 4 rows:               (the block stays in L2)
//       acc[4][4 vectors] = 0
//       for p in 0..K−1:
//         w[v]  = float(q[p, j0 + 16v : j0 + 16v + 16])   sign-extend + convert
//         acc[i][v] += x[i, p] · w[v]                     FMA, x broadcast
//       y[i, block] = acc ⊙ s[block] + b[block]
//
//   16 accumulators + 4 weight vectors fit the 32 zmm (AVX-512) registers;
//   the vectors are GCC/Clang vector extensions, compiled once per
//   instruction set (dispatch.h), so AVX2 splits each into two ymm and the
//   generic build into four xmm. Threads take contiguous ranges of column
//   blocks; every output element is one thread's sum in a fixed order, so
//   results do not depend on the thread count.
//
// * Larger M (prefill, evaluation): the product is compute-bound and the
//   blocked float GEMM (gemm.cpp) is the fast code we already have. q is
//   converted to float once (exactly) into a scratch K×N buffer, the GEMM
//   forms x · float(q), and one pass applies ⊙ s + b. The conversion costs
//   K·N operations against the GEMM's 2·M·K·N, < 4 % for M > 8 and nothing
//   for the M in the hundreds of a prefill. (Converting inside the GEMM's
//   B-packing step would save the scratch buffer but means a second
//   packing routine per kernel variant; the scratch is kept per thread and
//   reused, so there is no allocation per call.)
#include "cpu/quant.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/gemm.h"

namespace numformer::cpu {
namespace {

constexpr int kLanes = 16;              // floats per vector (64 bytes)
constexpr int kNV = 4;                  // vectors per column block
constexpr index_t kNB = kLanes * kNV;   // 64 columns per block
constexpr int kMR = 4;                  // rows per register tile
// Prefetch q this many rows ahead (one 64-byte line per row of a block; the
// rows are N bytes apart, a stride the hardware prefetcher may not follow far
// enough ahead at a large N).
constexpr index_t kPrefetchRows = 16;
// Least bytes of q worth a thread (see dispatch.h: waking a thread costs).
constexpr index_t kStreamGrainBytes = index_t(1) << 18;

#if defined(__GNUC__) || defined(__clang__)
typedef float VF __attribute__((vector_size(64)));        // 16 × float
typedef std::int8_t VB __attribute__((vector_size(16)));  // 16 × int8

// Rows [i0, i0 + MR) × one column block starting at j0 with `cols` valid
// columns (cols == kNB unless Edge). Edge blocks copy each row's valid bytes
// into a zero-padded buffer so the vector code is the same.
template <int MR, bool Edge>
NF_INLINE void stream_tile(const float* NF_RESTRICT x, const std::int8_t* NF_RESTRICT q,
                           const float* NF_RESTRICT s, const float* NF_RESTRICT b,
                           float* NF_RESTRICT y, index_t K, index_t N, index_t i0, index_t j0,
                           index_t cols) {
    VF acc[MR][kNV];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[i][v] = VF{};

    const float* xr = x + i0 * K;
    const std::int8_t* qc = q + j0;
    alignas(64) std::int8_t pad[kNB] = {};
    for (index_t p = 0; p < K; ++p) {
        const std::int8_t* row = qc + p * N;  // q[p, j0 : j0 + 64]
        if (!Edge && p + kPrefetchRows < K) __builtin_prefetch(row + kPrefetchRows * N, 0, 0);
        if (Edge) {
            std::memcpy(pad, row, size_t(cols));
            row = pad;
        }
        VF w[kNV];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) {
            VB raw;
            std::memcpy(&raw, row + v * kLanes, sizeof(raw));
            w[v] = __builtin_convertvector(raw, VF);  // exact: |q| ≤ 127
        }
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
            const float a = xr[i * K + p];
#pragma GCC unroll 4
            for (int v = 0; v < kNV; ++v) acc[i][v] += w[v] * a;  // FMA on AVX2/AVX-512
        }
    }

    if (!Edge) {
        VF sv[kNV], bv[kNV];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) {
            std::memcpy(&sv[v], s + j0 + v * kLanes, sizeof(VF));
            bv[v] = VF{};
            if (b != nullptr) std::memcpy(&bv[v], b + j0 + v * kLanes, sizeof(VF));
        }
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
            for (int v = 0; v < kNV; ++v) {
                const VF out = acc[i][v] * sv[v] + bv[v];
                std::memcpy(y + (i0 + i) * N + j0 + v * kLanes, &out, sizeof(VF));
            }
    } else {
        float tile[MR][kNB];
        std::memcpy(tile, acc, sizeof(tile));
        for (int i = 0; i < MR; ++i)
            for (index_t j = 0; j < cols; ++j)
                y[(i0 + i) * N + j0 + j] = tile[i][j] * s[j0 + j] + (b != nullptr ? b[j0 + j] : 0.0f);
    }
}
#else
// Without vector extensions: the same loops on scalars.
template <int MR, bool Edge>
inline void stream_tile(const float* x, const std::int8_t* q, const float* s, const float* b,
                        float* y, index_t K, index_t N, index_t i0, index_t j0, index_t cols) {
    for (int i = 0; i < MR; ++i)
        for (index_t j = 0; j < cols; ++j) {
            float acc = 0.0f;
            for (index_t p = 0; p < K; ++p) acc += x[(i0 + i) * K + p] * float(q[p * N + j0 + j]);
            y[(i0 + i) * N + j0 + j] = acc * s[j0 + j] + (b != nullptr ? b[j0 + j] : 0.0f);
        }
}
#endif

template <bool Edge>
NF_INLINE void stream_block(const float* x, const std::int8_t* q, const float* s, const float* b,
                            float* y, index_t M, index_t K, index_t N, index_t j0, index_t cols) {
    index_t i = 0;
    for (; i + kMR <= M; i += kMR) stream_tile<kMR, Edge>(x, q, s, b, y, K, N, i, j0, cols);
    switch (M - i) {  // the remaining 1–3 rows get their own (smaller) register tile
        case 3: stream_tile<3, Edge>(x, q, s, b, y, K, N, i, j0, cols); break;
        case 2: stream_tile<2, Edge>(x, q, s, b, y, K, N, i, j0, cols); break;
        case 1: stream_tile<1, Edge>(x, q, s, b, y, K, N, i, j0, cols); break;
        default: break;
    }
}

// Column blocks [blk0, blk1) of the streaming product, compiled per ISA.
struct StreamBlocks {
    static NF_INLINE void run(const float* x, const std::int8_t* q, const float* s, const float* b,
                              float* y, index_t M, index_t K, index_t N, index_t blk0, index_t blk1) {
        for (index_t blk = blk0; blk < blk1; ++blk) {
            const index_t j0 = blk * kNB;
            const index_t cols = std::min(kNB, N - j0);
            if (cols == kNB)
                stream_block<false>(x, q, s, b, y, M, K, N, j0, cols);
            else
                stream_block<true>(x, q, s, b, y, M, K, N, j0, cols);
        }
    }
};

// float(q) for rows [r0, r1) of q: exact, vectorised by the compiler.
struct Int8ToFloat {
    static NF_INLINE void run(const std::int8_t* q, float* out, index_t i0, index_t i1) {
        const std::int8_t* NF_RESTRICT src = q;
        float* NF_RESTRICT dst = out;
        for (index_t i = i0; i < i1; ++i) dst[i] = float(src[i]);
    }
};

// y[i, :] = y[i, :] ⊙ s + b for rows [i0, i1).
struct ScaleBias {
    static NF_INLINE void run(float* y, const float* s, const float* b, index_t N, index_t i0,
                              index_t i1) {
        const float* NF_RESTRICT sv = s;
        for (index_t i = i0; i < i1; ++i) {
            float* NF_RESTRICT row = y + i * N;
            if (b != nullptr) {
                const float* NF_RESTRICT bv = b;
                for (index_t j = 0; j < N; ++j) row[j] = row[j] * sv[j] + bv[j];
            } else {
                for (index_t j = 0; j < N; ++j) row[j] = row[j] * sv[j];
            }
        }
    }
};

}  // namespace

void matmul_int8(const float* x, const std::int8_t* q, const float* scale, const float* bias,
                 float* y, index_t M, index_t K, index_t N) {
    if (M == 0 || N == 0) return;
    const Isa isa = active_isa();
    if (K == 0) {  // empty sum: y = b (or 0)
        for (index_t i = 0; i < M; ++i)
            for (index_t j = 0; j < N; ++j) y[i * N + j] = bias != nullptr ? bias[j] : 0.0f;
        return;
    }
    if (M <= kInt8StreamRows) {
        const index_t blocks = (N + kNB - 1) / kNB;
        const index_t grain = std::max<index_t>(1, kStreamGrainBytes / (K * kNB));
        parallel_ranges(blocks, grain, [&](index_t b0, index_t b1) {
            run_isa<StreamBlocks>(isa, x, q, scale, bias, y, M, K, N, b0, b1);
        });
        return;
    }
    // Compute-bound: exact float copy of q, the blocked GEMM, then ⊙ s + b.
    static thread_local std::vector<float> scratch;
    const index_t kn = K * N;
    if (index_t(scratch.size()) < kn) scratch.resize(size_t(kn));
    float* qf = scratch.data();
    parallel_ranges(kn, kParallelWork, [&](index_t i0, index_t i1) {
        run_isa<Int8ToFloat>(isa, q, qf, i0, i1);
    });
    GemmProblem<float> pr;
    pr.m = M;
    pr.n = N;
    pr.k = K;
    pr.a = x;
    pr.b = qf;
    pr.c = y;
    gemm(pr);
    parallel_ranges(M, std::max<index_t>(1, kParallelWork / N), [&](index_t i0, index_t i1) {
        run_isa<ScaleBias>(isa, y, scale, bias, N, i0, i1);
    });
}

}  // namespace numformer::cpu
