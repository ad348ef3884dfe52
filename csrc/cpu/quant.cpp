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
// * M ≤ kInt8StreamRows = 64 (sampling: one row per sequence in the batch;
//   short prompts). At M = 1 the product is bound by reading q: K·N bytes
//   for 2·M·K·N flops. That is the whole point of int8 weights — a quarter
//   of float32's memory traffic — so q is streamed once and converted to
//   float in registers (for more rows the conversion is redone per group of
//   rows, from L2, which still beats the GEMM path below up to M ≈ 96):
//
//     task = a block of NB = 64 columns
//     for each pass over 4 vectors of those columns (AVX-512: all 64)
//       for each group of R rows:                  (the block stays in L2)
//         acc[R][4 vectors] = 0
//         for p in 0..K−1:
//           w[v]  = float(q[p, 4 vectors of columns])    sign-extend + convert
//           acc[i][v] += x[i, p] · w[v]                   FMA, x broadcast
//         y[i, pass] = acc ⊙ s[pass] + b[pass]
//
//   The vectors are each instruction set's own width (GCC/Clang vector
//   extensions, compiled once per instruction set, below) and R is chosen so
//   that accumulators and weights fit its registers: AVX-512 one pass of
//   16-float zmm with R = 4; AVX2 two passes of 8-float ymm with R = 2; the
//   generic build four passes of 4-float xmm. Threads take contiguous ranges of column
//   blocks; every output element is one thread's sum in a fixed order, so
//   results do not depend on the thread count.
//
//   Layout: in q's own (K, N) layout a block is one 64-byte line every N
//   bytes — one line per 4 KiB page at N ≥ 2048, which the hardware
//   prefetchers do not follow; even prefetching 64 rows ahead it ran at
//   ~40 % of the streaming rate. The packed layout (⌈N/64⌉, K, 64) stores
//   each block's rows back to back, so the same loop reads one sequential
//   stream: 2.2× faster at M = 1 (10.4 → 4.8 ms for GPT-2 124M's 48
//   matrices, ≈ 18 GB/s, this machine's single-core read rate). Both
//   layouts are accepted (numformer.ops.linear.pack_int8 packs).
//
// * Larger M (prefill, evaluation): the product is compute-bound and the
//   blocked float GEMM (gemm.cpp) is the fast code we already have. q is
//   converted to float once (exactly) into a scratch K×N buffer, the GEMM
//   forms x · float(q), and one pass applies ⊙ s + b. The conversion costs
//   K·N operations against the GEMM's 2·M·K·N, but it writes and reads
//   4·K·N bytes of memory, which is why this path starts only above
//   kInt8StreamRows (quant.h has the measured cut-over); for the M in the
//   hundreds of a prefill it is a few %. (Converting inside the GEMM's
//   B-packing step would save the scratch buffer but means a second
//   packing routine per kernel variant; the scratch is kept per thread and
//   reused, so there is no allocation per call.)
#include "cpu/quant.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/gemm.h"

#if NUMFORMER_X86_DISPATCH
#include <immintrin.h>
#endif

// Compile the code between NF_PUSH_TARGET(...) and NF_POP_TARGET for an extra
// instruction set — every function defined there, templates included (a
// function-level target attribute cannot be put on template instantiations,
// and intrinsics can only be inlined into functions of their own target).
#if NUMFORMER_X86_DISPATCH && defined(__clang__)
#define NF_PRAGMA(x) _Pragma(#x)
#define NF_PUSH_TARGET(isa) NF_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define NF_POP_TARGET _Pragma("clang attribute pop")
#elif NUMFORMER_X86_DISPATCH
#define NF_PRAGMA(x) _Pragma(#x)
#define NF_PUSH_TARGET(isa) _Pragma("GCC push_options") NF_PRAGMA(GCC target(isa))
#define NF_POP_TARGET _Pragma("GCC pop_options")
#endif

namespace numformer::cpu {
namespace {

constexpr index_t kNB = kInt8PackCols;  // columns per block (64: one cache line of q per row)
// Prefetch q this many rows ahead. A block reads one 64-byte line per row of
// q, N bytes apart: with N ≥ 2048 that is one line per 4 KiB page, which the
// hardware stream prefetchers do not follow. 64 rows ahead measured 8–10 %
// faster than 16 (CPU time, M = 1, GPT-2 124M shapes, loaded machine).
constexpr index_t kPrefetchRows = 64;
// Least bytes of q worth a thread (see dispatch.h: waking a thread costs).
constexpr index_t kStreamGrainBytes = index_t(1) << 18;

// ---------------------------------------------------------------------------
// The streaming kernel, once per instruction set
// ---------------------------------------------------------------------------
// quant_stream.inc holds the loops; each namespace below supplies the
// vector type VF, its shape constants and loadv(p): int8 at p → floats, exact. (GCC 12
// scalarises __builtin_convertvector(int8×16 → float×16) into 16 vcvtsi2ss —
// the first version ran at 0.4 GB/s — so the widening is written per ISA.)

#if defined(__GNUC__) || defined(__clang__)
// GCC 12 warns about its own _mm512_cvtepi8_epi32 (an "uninitialized"
// undefined-vector placeholder) and that a 64-byte vector returned from the
// (always inlined) baseline loadv would have another ABI; neither applies.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"
namespace generic {  // SSE2 on x86-64, NEON on aarch64: 16-byte vectors
typedef float VF __attribute__((vector_size(16)));
constexpr int kVL = 4, kVN = 4, kRows = 2;
// A plain loop; the SLP vectoriser turns it into sign-extending unpacks.
NF_INLINE VF loadv(const std::int8_t* p) {
    float t[kVL];
    for (int j = 0; j < kVL; ++j) t[j] = float(p[j]);
    VF v;
    std::memcpy(&v, t, sizeof(v));
    return v;
}
#include "cpu/quant_stream.inc"
}  // namespace generic

#if NUMFORMER_X86_DISPATCH
NF_PUSH_TARGET("avx2,fma")
namespace avx2 {
typedef float VF __attribute__((vector_size(32)));  // one ymm
constexpr int kVL = 8, kVN = 4, kRows = 2;
// 8 bytes → 8 int32 → 8 floats: vpmovsxbd + vcvtdq2ps.
NF_INLINE VF loadv(const std::int8_t* p) {
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    VF v;
    std::memcpy(&v, &f, sizeof(f));
    return v;
}
#include "cpu/quant_stream.inc"
}  // namespace avx2
NF_POP_TARGET

NF_PUSH_TARGET("avx512f,avx2,fma")
namespace avx512 {
typedef float VF __attribute__((vector_size(64)));  // one zmm
constexpr int kVL = 16, kVN = 4, kRows = 4;
// 16 bytes → 16 int32 → 16 floats: vpmovsxbd + vcvtdq2ps.
NF_INLINE VF loadv(const std::int8_t* p) {
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    VF v;
    std::memcpy(&v, &f, sizeof(f));
    return v;
}
#include "cpu/quant_stream.inc"
}  // namespace avx512
NF_POP_TARGET
#endif
#pragma GCC diagnostic pop
#else
namespace generic {
// Without vector extensions: the same product on scalars.
inline void stream_blocks(const float* x, const std::int8_t* q, bool packed, const float* s, const float* b,
                          float* y, index_t M, index_t K, index_t N, index_t blk0, index_t blk1) {
    for (index_t i = 0; i < M; ++i)
        for (index_t j = blk0 * kNB; j < std::min(N, blk1 * kNB); ++j) {
            float acc = 0.0f;
            for (index_t p = 0; p < K; ++p)
                acc += x[i * K + p] * float(packed ? q[((j / kNB) * K + p) * kNB + j % kNB] : q[p * N + j]);
            y[i * N + j] = acc * s[j] + (b != nullptr ? b[j] : 0.0f);
        }
}
}  // namespace generic
#endif

using StreamFn = void (*)(const float*, const std::int8_t*, bool, const float*, const float*, float*, index_t,
                          index_t, index_t, index_t, index_t);

StreamFn stream_for(Isa isa) {
    return NF_PICK_ISA(isa, generic::stream_blocks, avx2::stream_blocks, avx512::stream_blocks);
}

// float(q) for elements [i0, i1) of a (K, N) q: exact, vectorised by the compiler.
struct Int8ToFloat {
    static NF_INLINE void run(const std::int8_t* q, float* out, index_t i0, index_t i1) {
        const std::int8_t* NF_RESTRICT src = q;
        float* NF_RESTRICT dst = out;
        for (index_t i = i0; i < i1; ++i) dst[i] = float(src[i]);
    }
};

// The same from the packed layout, for rows [p0, p1) of q.
struct PackedToFloat {
    static NF_INLINE void run(const std::int8_t* q, float* out, index_t K, index_t N, index_t p0,
                              index_t p1) {
        for (index_t p = p0; p < p1; ++p)
            for (index_t j0 = 0; j0 < N; j0 += kNB) {
                const std::int8_t* NF_RESTRICT src = q + ((j0 / kNB) * K + p) * kNB;
                float* NF_RESTRICT dst = out + p * N + j0;
                const index_t cols = std::min(kNB, N - j0);
                for (index_t j = 0; j < cols; ++j) dst[j] = float(src[j]);
            }
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

void matmul_int8(const float* x, const std::int8_t* q, bool packed, const float* scale, const float* bias,
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
        const StreamFn stream = stream_for(isa);
        parallel_ranges(blocks, grain, [&](index_t b0, index_t b1) {
            stream(x, q, packed, scale, bias, y, M, K, N, b0, b1);
        });
        return;
    }
    // Compute-bound: exact float copy of q, the blocked GEMM, then ⊙ s + b.
    static thread_local std::vector<float> scratch;
    const index_t kn = K * N;
    if (index_t(scratch.size()) < kn) scratch.resize(size_t(kn));
    float* qf = scratch.data();
    if (packed)
        parallel_ranges(K, std::max<index_t>(1, kParallelWork / N), [&](index_t p0, index_t p1) {
            run_isa<PackedToFloat>(isa, q, qf, K, N, p0, p1);
        });
    else
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
