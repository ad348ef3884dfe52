// quant.h — matrix product with int8 weights (weight-only quantization).
//
//   y[i, j] = s[j] · Σ_p x[i, p] · q[p, j]  (+ b[j])
//
// x: M×K float32, q: K×N int8 (Hugging Face Conv1D layout: one output
// channel per column), s: N float32 scales, b: N float32 or null, y: M×N.
// This is x · dequant(q) + b with dequant(q)[p, j] = s[j]·q[p, j]: the scale
// is per column, so it factors out of the sum over p and is applied once per
// output element. All arrays dense and row-major; y must not overlap the
// inputs (the bindings check). The NumPy reference is
// numformer.ops.linear.int8_matmul_reference.
#pragma once

#include <cstdint>

#include "cpu/runtime.h"

namespace numformer::cpu {

// packed: q is stored as (⌈N/64⌉, K, 64) — column block b (columns 64b …
// 64b+63, the last one zero-padded) as K contiguous rows of 64 bytes — so
// that the M ≤ 8 path reads it sequentially (see quant.cpp). Otherwise (K, N).
void matmul_int8(const float* x, const std::int8_t* q, bool packed, const float* scale, const float* bias,
                 float* y, index_t M, index_t K, index_t N);

// Columns per block of the packed layout.
constexpr index_t kInt8PackCols = 64;

// Products with at most this many rows stream q (see quant.cpp); larger ones
// convert q to float once and run the blocked float GEMM. The cost of
// streaming grows with M (each group of rows converts q again, from L2),
// that of the GEMM path starts with a K×N float copy of q: they cross at
// M ≈ 96 for GPT-2 124M's matrices (measured on AVX2, 2 threads; at M = 64
// streaming was 1.2-1.4× faster, at M = 16 2.4-3.6×).
constexpr index_t kInt8StreamRows = 64;

}  // namespace numformer::cpu
