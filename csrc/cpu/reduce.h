// reduce.h — sums and dot products that vectorise without -ffast-math.
//
// A plain `for (j) s += a[j] * b[j]` cannot be vectorised by the compiler:
// doing so reorders the additions, which IEEE arithmetic forbids. Keeping
// kLanes independent partial sums makes the reordering explicit (lane l adds
// elements l, l+kLanes, …), so the loop body is kLanes independent
// multiply-adds that map onto SIMD registers. The result is deterministic
// for a given n (no dependence on threads or instruction set beyond FMA use).
#pragma once

#include "cpu/runtime.h"

namespace numformer::cpu {

constexpr int kLanes = 16;

// Σ_j a_j · b_j
template <typename T>
NF_INLINE T dot_lanes(const T* NF_RESTRICT a, const T* NF_RESTRICT b, index_t n) {
    T lane[kLanes] = {};
    index_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) lane[l] += a[j + l] * b[j + l];
    T total = T(0);
    for (; j < n; ++j) total += a[j] * b[j];
    for (int l = 0; l < kLanes; ++l) total += lane[l];
    return total;
}

// Σ_j a_j
template <typename T>
NF_INLINE T sum_lanes(const T* NF_RESTRICT a, index_t n) {
    T lane[kLanes] = {};
    index_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) lane[l] += a[j + l];
    T total = T(0);
    for (; j < n; ++j) total += a[j];
    for (int l = 0; l < kLanes; ++l) total += lane[l];
    return total;
}

}  // namespace numformer::cpu
