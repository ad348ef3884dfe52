// kernels.h — host entry points of the CUDA kernels (plain C++, no CUDA types),
// shared by the real module (numformer._cuda: pointers are device memory) and
// the CPU emulator (numformer._cuda_emu: pointers are host memory).
//
// All tensors are float32, dense and row-major. The functions validate
// nothing beyond what a launch needs: the bindings check shapes and dtypes
// first. Failures throw numformer::cuda::CudaError (→ Python RuntimeError).
#pragma once

#include <cstdint>

namespace numformer::cuda {

using index_t = std::int64_t;

// ---- softmax over the last axis -------------------------------------------
// x, y: (rows, n). Row r of x is element (i_0, …, i_{L-1}) of x's leading
// axes (sizes lead_size[0..L), outermost first); its additive mask row
// starts at mask + Σ_a i_a · mask_stride[a] (stride 0 = broadcast axis).
struct SoftmaxMask {
    const float* data = nullptr;  // null: no additive mask
    int ndim = 0;                  // L ≤ 8
    index_t lead_size[8] = {};
    index_t mask_stride[8] = {};
};
// y = softmax(scale·x + mask), causal: query i = r mod tq sees keys j ≤ i + n − tq.
void softmax_forward(const float* x, float* y, index_t rows, index_t n, float scale,
                     const SoftmaxMask& mask, bool causal, index_t tq);
// dx = scale · y ⊙ (dy − Σ_j dy_j y_j)
void softmax_backward(const float* dy, const float* y, float* dx, index_t rows, index_t n, float scale);

// ---- GEMM ------------------------------------------------------------------
// For each batch z < batch: C_z = op(A_z) · op(B_z) (+ bias) (+ C_z if accumulate),
// op(A) is M×K (A stored M×K, or K×M when trans_a), op(B) is K×N (stored
// K×N, or N×K when trans_b). Batch strides in elements (0 = shared operand).
struct GemmArgs {
    const float* a = nullptr;
    const float* b = nullptr;
    float* c = nullptr;
    const float* bias = nullptr;  // (N,) or null
    int m = 0, n = 0, k = 0, batch = 1;
    bool trans_a = false, trans_b = false, accumulate = false;
    index_t stride_a = 0, stride_b = 0, stride_c = 0;
};
void gemm(const GemmArgs& g);

// ---- attention -------------------------------------------------------------
// q: (B, H, Tq, D), k, v: (B, H, Tk, D), dense. key_mask: (B, Tk) bytes,
// nonzero = visible, or null. causal: query i sees key j iff j ≤ i + Tk − Tq.
// 1 ≤ D ≤ 128.
struct AttentionArgs {
    int batch = 0, heads = 0, tq = 0, tk = 0, dim = 0;
    float scale = 1.0f;
    bool causal = false;
    const std::uint8_t* key_mask = nullptr;
    const float* q = nullptr;
    const float* k = nullptr;
    const float* v = nullptr;
    // Elements from one (b, h) of K and V to the next: 0 means Tk·D (dense).
    // A KV cache (B, H, Tmax, D) read up to Tk = its length has Tmax·D.
    // (Forward only: the backward writes dense dK, dV.)
    index_t kv_head_stride = 0;
};
constexpr int kAttentionMaxDim = 128;
// out: (B, H, Tq, D); lse: (B, H, Tq) log-sum-exp of each score row (−inf
// for a query that sees no key, whose out row is 0).
void attention_forward(const AttentionArgs& p, float* out, float* lse);
// dq: like q, dk, dv: like k. scratch: B·H·Tq floats (D_i = rowsum(dO ∘ O)).
void attention_backward(const AttentionArgs& p, const float* out, const float* dout, const float* lse,
                        float* dq, float* dk, float* dv, float* scratch);

// ---- the other layers of a GPT-2 forward (layers.cu) -------------------------
// Rows r = b·T + t. ids: (rows,) in [0, V) — the bindings check the range.
// x = wte[ids] + wpe[pos0 + r mod T]: (rows, C).
void embedding_forward(const std::int32_t* ids, const float* wte, const float* wpe, float* x, index_t rows, int T,
                       int C, int pos0);
// y = LayerNorm(x) over rows of C: (x − μ)/√(σ² + eps) · gamma + beta.
void layernorm_forward(const float* x, const float* gamma, const float* beta, float* y, index_t rows, int C,
                       float eps);
// y = ½ x (1 + tanh(√(2/π)(x + 0.044715 x³))), n elements.
void gelu_tanh_forward(const float* x, float* y, index_t n);
// qkv (B·T, 3·H·D) → q, k, v (B, H, T, D); and back: o (B, H, T, D) → y (B·T, H·D).
void split_heads(const float* qkv, float* q, float* k, float* v, int B, int T, int H, int D);
// The same, with k and v written into caches (B, H, cache_len, D) at positions pos0 … pos0 + T − 1.
void split_heads_to_cache(const float* qkv, float* q, float* k_cache, float* v_cache, int B, int T, int H, int D,
                          int cache_len, int pos0);
void merge_heads(const float* o, float* y, int B, int T, int H, int D);

// ---- ceilings ---------------------------------------------------------------
// A pure-FMA kernel over `blocks` blocks of 256 threads writing out[blocks·256];
// returns the FLOPs it performs (the caller times it).
double fma_loop(float* out, int blocks, int iters);

}  // namespace numformer::cuda
