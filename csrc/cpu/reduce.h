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

// Σ_j a_r[j] · b_j for four rows a_0..a_3 at once, so that b is read once
// for all four (the LM head at batch > 1 while decoding). Each result is
// summed in exactly dot_lanes's order, so it is bitwise equal to it.
template <typename T>
NF_INLINE void dot4_lanes(const T* NF_RESTRICT a0, const T* NF_RESTRICT a1, const T* NF_RESTRICT a2,
                          const T* NF_RESTRICT a3, const T* NF_RESTRICT b, index_t n, T out[4]) {
    T l0[kLanes] = {}, l1[kLanes] = {}, l2[kLanes] = {}, l3[kLanes] = {};
    index_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) {
            const T bj = b[j + l];
            l0[l] += a0[j + l] * bj;
            l1[l] += a1[j + l] * bj;
            l2[l] += a2[j + l] * bj;
            l3[l] += a3[j + l] * bj;
        }
    T t0 = T(0), t1 = T(0), t2 = T(0), t3 = T(0);
    for (; j < n; ++j) {
        t0 += a0[j] * b[j];
        t1 += a1[j] * b[j];
        t2 += a2[j] * b[j];
        t3 += a3[j] * b[j];
    }
    for (int l = 0; l < kLanes; ++l) {
        t0 += l0[l];
        t1 += l1[l];
        t2 += l2[l];
        t3 += l3[l];
    }
    out[0] = t0, out[1] = t1, out[2] = t2, out[3] = t3;
}

// Σ_j a_j · b_r[j] for one row a and four rows b_0..b_3: four independent
// memory streams instead of one (the LM head while decoding one sequence
// reads 154 MB of B rows; more streams in flight keep more of the memory
// bandwidth busy). Each result is summed in dot_lanes's order: bitwise equal.
// (It is dot4_lanes with the roles swapped, but calling that instead broke
// the bitwise row independence of the few-rows GEMM at K = 15: the compiler
// contracted the tail's multiply-adds into FMAs differently in the two
// inlined copies. Keep the operand order of dot_lanes.)
template <typename T>
NF_INLINE void dot_lanes_b4(const T* NF_RESTRICT a, const T* NF_RESTRICT b0, const T* NF_RESTRICT b1,
                            const T* NF_RESTRICT b2, const T* NF_RESTRICT b3, index_t n, T out[4]) {
    T l0[kLanes] = {}, l1[kLanes] = {}, l2[kLanes] = {}, l3[kLanes] = {};
    index_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) {
            const T aj = a[j + l];
            l0[l] += aj * b0[j + l];
            l1[l] += aj * b1[j + l];
            l2[l] += aj * b2[j + l];
            l3[l] += aj * b3[j + l];
        }
    T t0 = T(0), t1 = T(0), t2 = T(0), t3 = T(0);
    for (; j < n; ++j) {
        t0 += a[j] * b0[j];
        t1 += a[j] * b1[j];
        t2 += a[j] * b2[j];
        t3 += a[j] * b3[j];
    }
    for (int l = 0; l < kLanes; ++l) {
        t0 += l0[l];
        t1 += l1[l];
        t2 += l2[l];
        t3 += l3[l];
    }
    out[0] = t0, out[1] = t1, out[2] = t2, out[3] = t3;
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
