// layers.cu — the rest of a GPT-2 forward on the device: token + position
// embedding, LayerNorm, GELU (tanh form) and the head split/merge around
// attention. With matmul and attention (gemm.cu, attention.cu) they let a
// model keep its weights and activations in device memory from the token
// ids to the logits (numformer.cuda_model.DeviceGPT2). Each is the formula
// of the NumPy reference in numformer/ops and of numformer._cpu's kernel:
//
//   embedding  x[r, :] = wte[ids[r], :] + wpe[pos0 + r mod T, :]       r = b·T + t
//   LayerNorm  y = (x − μ) · ρ · γ + β,  μ = mean_c x,  ρ = 1/√(mean_c (x − μ)² + ε)
//   GELU       y = x · σ(2u) = ½ x (1 + tanh u),  u = √(2/π) (x + 0.044715 x³)
//   split      qkv (B·T, 3C) → q, k, v (B, H, T, D):  q[b,h,t,d] = qkv[b·T + t, h·D + d],
//              k and v the same from columns C + … and 2C + …
//   merge      o (B, H, T, D) → y (B·T, C):  y[b·T + t, h·D + d] = o[b,h,t,d]
//   append     the split with k, v written into a KV cache (B, H, Tmax, D) at rows pos0 + t
//
// The element-wise kernels use a grid-stride loop over the elements of
// their output (consecutive threads, consecutive addresses: coalesced).
// LayerNorm is one warp per row, in three sweeps of the row (Σx, then
// Σ(x − μ)², then y): the variance is taken around the mean, as the
// reference does, not as E[x²] − μ², which cancels for rows with a large mean.
// GELU uses σ(2u) = 1/(1 + e^{−2u}), which has no cancellation near x → −∞
// (where 1 + tanh u → 0) and saturates correctly: e^{−2u} → inf gives 0,
// → 0 gives 1.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace numformer::cuda {

namespace {

constexpr int kThreads = 256;       // element-wise kernels: threads per block
constexpr int kMaxBlocks = 4096;    // … and at most this many blocks (grid-stride beyond)
constexpr int kRowWarps = 4;        // LayerNorm: rows (warps) per block

int elementwise_blocks(index_t n) {
    const index_t blocks = (n + kThreads - 1) / kThreads;
    return int(blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks);
}

__global__ void embedding_kernel(const std::int32_t* ids, const float* wte, const float* wpe, float* x,
                                 index_t rows, int T, int C, int pos0) {
    const index_t n = rows * C;
    for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x) {
        const index_t r = i / C;
        const int c = int(i - r * C);
        const int t = int(r % T);
        x[i] = wte[index_t(ids[r]) * C + c] + wpe[index_t(pos0 + t) * C + c];
    }
}

__global__ void layernorm_kernel(const float* x, const float* gamma, const float* beta, float* y, index_t rows,
                                 int C, float eps) {
    const int lane = threadIdx.x % 32;
    const index_t r = index_t(blockIdx.x) * kRowWarps + threadIdx.x / 32;
    if (r >= rows) return;  // a whole warp leaves together: no collective is split
    const float* xr = x + r * C;
    float* yr = y + r * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) s += xr[c];
    const float mu = warp_sum(s) / float(C);
    float ss = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float d = xr[c] - mu;
        ss += d * d;
    }
    const float rho = rsqrtf(warp_sum(ss) / float(C) + eps);
    for (int c = lane; c < C; c += 32) yr[c] = (xr[c] - mu) * rho * gamma[c] + beta[c];
}

__global__ void gelu_tanh_kernel(const float* x, float* y, index_t n) {
    const float k = 0.7978845608028654f, a = 0.044715f;  // √(2/π), the cubic's coefficient
    for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x) {
        const float v = x[i];
        const float u = k * (v + a * v * v * v);
        y[i] = v / (1.0f + expf(-2.0f * u));
    }
}

// k and v go to rows pos0 + t of (B, H, kv_len, D) arrays: kv_len = T and
// pos0 = 0 for a plain split, a cache's length and fill for an append.
__global__ void split_heads_kernel(const float* qkv, float* q, float* k, float* v, int B, int T, int H, int D,
                                   int kv_len, int pos0) {
    const int C = H * D;
    const index_t n = index_t(B) * T * 3 * C;
    for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x) {
        const index_t r = i / (3 * C);         // row b·T + t of qkv
        const int j = int(i - r * 3 * C);      // column: which·C + h·D + d
        const int which = j / C, h = (j % C) / D, d = j % D;
        const index_t b = r / T, t = r % T;
        if (which == 0)
            q[((b * H + h) * T + t) * D + d] = qkv[i];
        else
            (which == 1 ? k : v)[((b * H + h) * kv_len + pos0 + t) * D + d] = qkv[i];
    }
}

__global__ void merge_heads_kernel(const float* o, float* y, int B, int T, int H, int D) {
    const int C = H * D;
    const index_t n = index_t(B) * T * C;
    for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x) {
        const index_t r = i / C;
        const int c = int(i - r * C), h = c / D, d = c % D;
        const index_t b = r / T, t = r % T;
        y[i] = o[((b * H + h) * T + t) * D + d];
    }
}

}  // namespace

void embedding_forward(const std::int32_t* ids, const float* wte, const float* wpe, float* x, index_t rows, int T,
                       int C, int pos0) {
    if (rows == 0 || C == 0) return;
    launch("embedding_forward", embedding_kernel, dim3(elementwise_blocks(rows * C)), dim3(kThreads), 0, nullptr,
           ids, wte, wpe, x, rows, T, C, pos0);
}

void layernorm_forward(const float* x, const float* gamma, const float* beta, float* y, index_t rows, int C,
                       float eps) {
    if (rows == 0 || C == 0) return;
    const index_t blocks = (rows + kRowWarps - 1) / kRowWarps;
    launch("layernorm_forward", layernorm_kernel, dim3(unsigned(blocks)), dim3(32 * kRowWarps), 0, nullptr, x,
           gamma, beta, y, rows, C, eps);
}

void gelu_tanh_forward(const float* x, float* y, index_t n) {
    if (n == 0) return;
    launch("gelu_tanh_forward", gelu_tanh_kernel, dim3(elementwise_blocks(n)), dim3(kThreads), 0, nullptr, x, y, n);
}

void split_heads_to_cache(const float* qkv, float* q, float* k_cache, float* v_cache, int B, int T, int H, int D,
                          int cache_len, int pos0) {
    const index_t n = index_t(B) * T * 3 * H * D;
    if (n == 0) return;
    launch("split_heads_to_cache", split_heads_kernel, dim3(elementwise_blocks(n)), dim3(kThreads), 0, nullptr, qkv,
           q, k_cache, v_cache, B, T, H, D, cache_len, pos0);
}

// A plain split is the append to "caches" of exactly T rows, from row 0.
void split_heads(const float* qkv, float* q, float* k, float* v, int B, int T, int H, int D) {
    split_heads_to_cache(qkv, q, k, v, B, T, H, D, T, 0);
}

void merge_heads(const float* o, float* y, int B, int T, int H, int D) {
    const index_t n = index_t(B) * T * H * D;
    if (n == 0) return;
    launch("merge_heads", merge_heads_kernel, dim3(elementwise_blocks(n)), dim3(kThreads), 0, nullptr, o, y, B, T,
           H, D);
}

}  // namespace numformer::cuda
