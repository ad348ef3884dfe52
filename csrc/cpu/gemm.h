// gemm.h — batched matrix product C = op(A)·op(B) (+ bias), float and double.
//
//   op(A) is A (M×K) or, when trans_a, the transpose of A stored as K×M;
//   op(B) is B (K×N) or, when trans_b, the transpose of B stored as N×K.
//
// All arrays are dense and row-major (C-contiguous); a batch of `batch`
// matrices is stored back to back. Transposes are never materialised: the
// packing step reads A and B in whichever order they are stored.
#pragma once

#include "cpu/runtime.h"

namespace numformer::cpu {

template <typename T>
struct GemmProblem {
    index_t batch = 1;
    index_t m = 0, n = 0, k = 0;
    bool trans_a = false, trans_b = false;
    const T* a = nullptr;     // batch × (M×K, or K×M when trans_a)
    const T* b = nullptr;     // batch × (K×N, or N×K when trans_b)
    T* c = nullptr;           // batch × M×N
    const T* bias = nullptr;  // N values added to every row of C, or null
    // false: C  = op(A)·op(B) + bias     (C's old contents are ignored)
    // true:  C += op(A)·op(B) + bias     (gradient accumulation)
    bool accumulate = false;
};

// Products of at most this many rows skip packing and stream B as stored
// (gemm.cpp, "Few rows"); bindings expose it as _cpu.gemm_stream_rows.
constexpr index_t kGemmStreamRows = 16;

// C must not overlap A, B or bias (the bindings check this).
template <typename T>
void gemm(const GemmProblem<T>& problem);

extern template void gemm<float>(const GemmProblem<float>&);
extern template void gemm<double>(const GemmProblem<double>&);

}  // namespace numformer::cpu
