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

// Σ_j a_r[j] · b_r[j] for four pairs of rows, r = 0..3, in one sweep. Each
// result is summed in exactly dot_lanes's order and with the same operand
// order (a·b), so it is bitwise equal to dot_lanes(a_r, b_r, n): the
// compiler contracts the tail's multiply-adds into FMAs the same way. (A
// copy with the operands swapped once broke the bitwise row independence
// of the few-rows GEMM at K = 15.) Rows may repeat: see the two uses below.
template <typename T>
NF_INLINE void dot_lanes_x4(const T* a0, const T* a1, const T* a2, const T* a3, const T* b0,
                            const T* b1, const T* b2, const T* b3, index_t n, T out[4]) {
    T l0[kLanes] = {}, l1[kLanes] = {}, l2[kLanes] = {}, l3[kLanes] = {};
    index_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) {
            l0[l] += a0[j + l] * b0[j + l];
            l1[l] += a1[j + l] * b1[j + l];
            l2[l] += a2[j + l] * b2[j + l];
            l3[l] += a3[j + l] * b3[j + l];
        }
    T t0 = T(0), t1 = T(0), t2 = T(0), t3 = T(0);
    for (; j < n; ++j) {
        t0 += a0[j] * b0[j];
        t1 += a1[j] * b1[j];
        t2 += a2[j] * b2[j];
        t3 += a3[j] * b3[j];
    }
    for (int l = 0; l < kLanes; ++l) {
        t0 += l0[l];
        t1 += l1[l];
        t2 += l2[l];
        t3 += l3[l];
    }
    out[0] = t0, out[1] = t1, out[2] = t2, out[3] = t3;
}

// Σ_j a_r[j] · b_j for four rows a_0..a_3 at once, so that b is read once
// for all four (the LM head at batch > 1 while decoding).
template <typename T>
NF_INLINE void dot4_lanes(const T* a0, const T* a1, const T* a2, const T* a3, const T* b, index_t n,
                          T out[4]) {
    dot_lanes_x4(a0, a1, a2, a3, b, b, b, b, n, out);
}

// Σ_j a_j · b_r[j] for one row a and four rows b_0..b_3: four independent
// memory streams instead of one (the LM head while decoding one sequence
// reads 154 MB of B rows; more streams in flight keep more of the memory
// bandwidth busy).
template <typename T>
NF_INLINE void dot_lanes_b4(const T* a, const T* b0, const T* b1, const T* b2, const T* b3, index_t n,
                            T out[4]) {
    dot_lanes_x4(a, a, a, a, b0, b1, b2, b3, n, out);
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
