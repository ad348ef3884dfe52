// softmax.h — softmax over the last axis and its backward, float and double.
//
// The input is viewed as `rows` rows of length `n` (row-major, contiguous).
//
// Forward, per row:  z_j = s·x_j + mask_j          (mask: optional, additive)
//                    y_j = exp(z_j − m) / Σ_k exp(z_k − m),  m = max_k z_k
//   (s = scale; subtracting the max keeps every exponent ≤ 0, so nothing
//   overflows whatever the magnitude of x.) With `causal`, row r is query
//   i = r mod Tq of a (Tq, Tk = n) block and sees keys j ≤ i + Tk − Tq only
//   (the last query sees every key; Tq ≠ Tk is cross/cached attention); the
//   others are treated as z_j = −inf.
// Special values, per row:
//   z_j = −inf            → y_j = 0
//   every z_j −inf        → all 0 (the row has no mass; we do not divide 0/0)
//   any NaN, or any +inf  → all NaN (+inf − +inf is NaN; NaN propagates)
//
// Backward, per row (y = softmax(s·x + mask), dy = ∂L/∂y):
//   ∂L/∂z_j = Σ_i dy_i ∂y_i/∂z_j = Σ_i dy_i y_i (δ_ij − y_j)
//           = y_j (dy_j − Σ_i dy_i y_i),     ∂L/∂x_j = s · ∂L/∂z_j
// The mask is a constant and masked entries have y_j = 0, so the backward
// needs only y (and s).
#pragma once

#include "cpu/runtime.h"

namespace numformer::cpu {

// Optional mask for softmax_forward. The additive mask broadcasts against
// x's leading axes: row r = (r_0, …, r_{L-1}) of x (its index in x.shape[:-1])
// uses mask row Σ_d r_d · row_stride[d] (row_stride[d] = 0 where the mask
// has size 1 on that axis, i.e. it is broadcast).
constexpr int kSoftmaxMaxLead = 8;

template <typename T>
struct SoftmaxMask {
    const T* add = nullptr;  // additive mask rows of length n, or null
    int lead_ndim = 0;       // number of leading axes of x (≤ kSoftmaxMaxLead)
    index_t lead_shape[kSoftmaxMaxLead] = {};
    index_t row_stride[kSoftmaxMaxLead] = {};
    index_t causal_tq = 0;  // > 0: causal over (Tq = causal_tq, Tk = n) blocks
};

template <typename T>
void softmax_forward(const T* x, T* y, index_t rows, index_t n, T scale,
                     const SoftmaxMask<T>& mask = SoftmaxMask<T>{});

// dx = scale · y ⊙ (dy − Σ dy⊙y) per row.
template <typename T>
void softmax_backward(const T* dy, const T* y, T* dx, index_t rows, index_t n, T scale = T(1));

extern template void softmax_forward<float>(const float*, float*, index_t, index_t, float,
                                            const SoftmaxMask<float>&);
extern template void softmax_forward<double>(const double*, double*, index_t, index_t, double,
                                             const SoftmaxMask<double>&);
extern template void softmax_backward<float>(const float*, const float*, float*, index_t, index_t,
                                             float);
extern template void softmax_backward<double>(const double*, const double*, double*, index_t,
                                              index_t, double);

}  // namespace numformer::cpu
