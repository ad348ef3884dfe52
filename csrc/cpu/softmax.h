// softmax.h — softmax over the last axis and its backward, float and double.
//
// The input is viewed as `rows` rows of length `n` (row-major, contiguous).
//
// Forward, per row:  y_j = exp(s·x_j − m) / Σ_k exp(s·x_k − m),  m = max_k s·x_k
//   (s = scale; subtracting the max keeps every exponent ≤ 0, so nothing
//   overflows whatever the magnitude of x.)
// Special values, per row:
//   −inf entries          → 0
//   every entry −inf      → all 0 (the row has no mass; we do not divide 0/0)
//   any NaN, or any +inf  → all NaN (+inf − +inf is NaN; NaN propagates)
//
// Backward, per row (y = softmax(x), dy = ∂L/∂y):
//   ∂L/∂x_j = Σ_i dy_i ∂y_i/∂x_j = Σ_i dy_i y_i (δ_ij − y_j)
//           = y_j (dy_j − Σ_i dy_i y_i)
// (for softmax(s·x) multiply by s; the bindings' softmax_backward is the
// plain form, which is what the callers need.)
#pragma once

#include "cpu/runtime.h"

namespace numformer::cpu {

template <typename T>
void softmax_forward(const T* x, T* y, index_t rows, index_t n, T scale);

template <typename T>
void softmax_backward(const T* dy, const T* y, T* dx, index_t rows, index_t n);

extern template void softmax_forward<float>(const float*, float*, index_t, index_t, float);
extern template void softmax_forward<double>(const double*, double*, index_t, index_t, double);
extern template void softmax_backward<float>(const float*, const float*, float*, index_t, index_t);
extern template void softmax_backward<double>(const double*, const double*, double*, index_t,
                                              index_t);

}  // namespace numformer::cpu
