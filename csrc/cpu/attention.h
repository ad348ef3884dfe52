// attention.h — flash-style scaled dot-product attention, forward and
// backward, float and double.
//
// For one (batch b, head h), with Q: (Tq, D), K, V: (Tk, D), s = scale:
//
//   S = s · Q Kᵀ + M        (Tq, Tk); M_ij = 0 if query i may see key j, else −inf
//   P = softmax_rows(S)     L_i = log Σ_j exp(S_ij)   (the log-sum-exp)
//   O = P V                 (Tq, D)
//
// Masks: causal — query i sees key j only if j ≤ i + (Tk − Tq) (queries
// lined up at the end of the keys, as with a KV cache); key padding —
// key_mask[b, j] == 0 hides key j of batch row b for every query.
// A query that sees no key gets O_i = 0 and L_i = −inf (and zero gradients).
//
// The Tq×Tk matrices are never stored: the kernel walks tiles of queries
// against tiles of keys and keeps only per-query running statistics (the
// online softmax, see attention.cpp). The backward recomputes P from L.
//
// Layout: each of q, k, v, out, dout is a 4-D tensor (B, H, T, D) whose last
// axis is contiguous; the other three axes may have any element strides
// (views from a head split, slices of a KV cache). Results (out, lse, dq,
// dk, dv) are written dense and row-major.
#pragma once

#include <cstdint>

#include "cpu/runtime.h"

namespace numformer::cpu {

// A (B, H, T, D) tensor with a unit-stride last axis; strides are in elements.
template <typename T>
struct Tensor4 {
    const T* data = nullptr;
    index_t sb = 0, sh = 0, st = 0;
    const T* head(index_t b, index_t h) const { return data + b * sb + h * sh; }
};

template <typename T>
struct AttentionProblem {
    index_t batch = 0, heads = 0, tq = 0, tk = 0, dim = 0;
    T scale = T(1);
    bool causal = false;
    const std::uint8_t* key_mask = nullptr;  // (batch, tk) dense, nonzero = visible; or null
    Tensor4<T> q, k, v;
};

// out: (B, H, Tq, D) dense; lse: (B, H, Tq) dense.
template <typename T>
void attention_forward(const AttentionProblem<T>& p, T* out, T* lse);

// o, dout: (B, H, Tq, D) strided like q; lse: (B, H, Tq) dense (from the
// forward). dq: (B, H, Tq, D), dk, dv: (B, H, Tk, D) dense outputs.
template <typename T>
void attention_backward(const AttentionProblem<T>& p, const Tensor4<T>& o, const Tensor4<T>& dout,
                        const T* lse, T* dq, T* dk, T* dv);

extern template void attention_forward<float>(const AttentionProblem<float>&, float*, float*);
extern template void attention_forward<double>(const AttentionProblem<double>&, double*, double*);
extern template void attention_backward<float>(const AttentionProblem<float>&, const Tensor4<float>&,
                                               const Tensor4<float>&, const float*, float*, float*,
                                               float*);
extern template void attention_backward<double>(const AttentionProblem<double>&,
                                                const Tensor4<double>&, const Tensor4<double>&,
                                                const double*, double*, double*, double*);

}  // namespace numformer::cpu
