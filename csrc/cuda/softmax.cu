// softmax.cu — row softmax forward/backward, one warp per row.
//
// Forward, for a row z_j = scale·x_j + mask_j (causal tail j ≥ visible is −inf):
//
//   y_j = exp(z_j − m) / s,   m = max_j z_j,   s = Σ_j exp(z_j − m)
//
// Each lane walks the columns j = lane, lane + 32, … (a warp reads 32
// consecutive floats per step: one 128-byte transaction) — or, when the row
// length is a multiple of 4 and the arrays are 16-byte aligned, float4
// chunks j = 4·lane, 4·lane + 128, … (512 bytes per warp step, a quarter of
// the load/store instructions) — and keeps an
// *online* pair (m, s): a new z either raises the maximum, rescaling the sum
// (s ← s·e^{m−z} + 1, m ← z), or adds e^{z−m}. The 32 pairs are merged by a
// warp butterfly with the same rule, (m, s) ⊕ (m', s') = (M, s·e^{m−M} +
// s'·e^{m'−M}), M = max(m, m'), after which every lane holds the row's (m, s).
// A second pass writes y (the re-read of the row hits L1/L2: per row the
// kernel moves one read and one write through DRAM).
//
// Special values, as numformer._cpu and softmax_reference: −inf logits give
// exactly 0; a row with no finite-or-+inf logit (fully masked) gives zeros;
// a row containing NaN or +inf gives NaN everywhere (+inf − +inf = NaN).
//
// Backward: dx_j = scale · y_j (dy_j − Σ_k dy_k y_k): one warp-reduced dot
// product per row, then one element-wise pass.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace numformer::cuda {

namespace {

constexpr int kSoftmaxWarps = 4;  // rows per block (one warp each)

// The additive-mask row of x's row r (see SoftmaxMask in kernels.h).
__device__ __forceinline__ const float* mask_row(const SoftmaxMask& mk, index_t r, index_t n) {
    if (mk.data == nullptr) return nullptr;
    index_t off = 0;
    for (int a = mk.ndim - 1; a >= 0; --a) {  // innermost leading axis first
        const index_t i = r % mk.lead_size[a];
        r /= mk.lead_size[a];
        off += i * mk.mask_stride[a];
    }
    (void)n;
    return mk.data + off;
}

// Merge the online pair (m2, s2) into (m, s). A side with no mass (s = 0,
// m = −inf) must not contribute e^{−inf − M} · 0 = NaN when M = −inf. A side
// with m = −inf and s = NaN (it saw a NaN logit and nothing above −inf) is
// not empty: its NaN must reach the row (it did not, when the test was on m).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    const float M = m2 > m ? m2 : m;
    const float a = (s == 0.0f) ? 0.0f : s * expf(m - M);
    const float b = (s2 == 0.0f) ? 0.0f : s2 * expf(m2 - M);
    m = M;
    s = a + b;
}

// The W = 4 (float4) or W = 1 logits z_{j0..j0+W} of a row; causal-hidden
// columns (j ≥ visible) are −inf.
template <int W>
__device__ __forceinline__ void load_logits(const float* xr, const float* mr, index_t j0, index_t visible,
                                            float scale, float (&z)[W]) {
    float xv[W], mv[W];
    if constexpr (W == 4) {
        const float4 a = *reinterpret_cast<const float4*>(xr + j0);
        xv[0] = a.x, xv[1] = a.y, xv[2] = a.z, xv[3] = a.w;
        const float4 b = mr ? *reinterpret_cast<const float4*>(mr + j0) : make_float4(0.f, 0.f, 0.f, 0.f);
        mv[0] = b.x, mv[1] = b.y, mv[2] = b.z, mv[3] = b.w;
    } else {
        xv[0] = xr[j0];
        mv[0] = mr ? mr[j0] : 0.0f;
    }
#pragma unroll
    for (int t = 0; t < W; ++t) z[t] = j0 + t < visible ? scale * xv[t] + mv[t] : -INFINITY;
}

template <int W>
__global__ void __launch_bounds__(32 * kSoftmaxWarps)
softmax_forward_kernel(const float* __restrict__ x, float* __restrict__ y, index_t rows, index_t n,
                       float scale, SoftmaxMask mask, bool causal, index_t tq) {
    const int lane = threadIdx.x % 32;
    const index_t warp_global = index_t(blockIdx.x) * kSoftmaxWarps + threadIdx.x / 32;
    const index_t warp_stride = index_t(gridDim.x) * kSoftmaxWarps;
    // Every lane of a warp takes the same rows, so the shuffles below are
    // executed by all 32 lanes together.
    for (index_t r = warp_global; r < rows; r += warp_stride) {
        const float* xr = x + r * n;
        float* yr = y + r * n;
        const float* mr = mask_row(mask, r, n);
        // Keys j < visible may be seen; with causal masking query i = r mod tq
        // sees j ≤ i + n − tq (queries aligned with the last keys).
        index_t visible = n;
        if (causal) {
            const index_t i = r % tq;
            visible = i + n - tq + 1;
            visible = visible < 0 ? 0 : (visible > n ? n : visible);
        }

        // Pass 1: online max and sum over this lane's columns.
        float m = -INFINITY, s = 0.0f;
        for (index_t j0 = W * lane; j0 < visible; j0 += 32 * W) {
            float zs[W];
            load_logits<W>(xr, mr, j0, visible, scale, zs);
#pragma unroll
            for (int t = 0; t < W; ++t) {
                const float z = zs[t];
                if (z > m) {          // new maximum: rescale what we have (e^{−inf} = 0 on the first)
                    s = s * expf(m - z) + 1.0f;
                    m = z;
                } else if (z != -INFINITY) {  // −inf adds nothing (and −inf − −inf would be NaN)
                    s += expf(z - m);  // NaN z (never "> m") makes s NaN: the row becomes NaN
                }
            }
        }
        for (int offset = 16; offset > 0; offset >>= 1) {
            const float m2 = __shfl_xor_sync(kFullMask, m, offset);
            const float s2 = __shfl_xor_sync(kFullMask, s, offset);
            merge(m, s, m2, s2);
        }
        // A +inf logit: e^{z−m} would give NaN for it and 0 elsewhere; the
        // definition (exp(x − max) with max = +inf) makes the whole row NaN.
        if (m == INFINITY) s = NAN;

        // Pass 2: write y. Fully masked (m = −inf, s = 0): zeros. (m = −inf
        // with s = NaN — NaN logits, the rest −inf — goes on and writes NaN.)
        const float inv_s = 1.0f / s;
        const bool empty = m == -INFINITY && s == 0.0f;
        for (index_t j0 = W * lane; j0 < n; j0 += 32 * W) {
            float out[W];
            if (empty) {
#pragma unroll
                for (int t = 0; t < W; ++t) out[t] = 0.0f;
            } else {
                float zs[W];
#pragma unroll
                for (int t = 0; t < W; ++t) zs[t] = -INFINITY;
                if (j0 < visible) load_logits<W>(xr, mr, j0, visible, scale, zs);
#pragma unroll
                for (int t = 0; t < W; ++t)  // causal tail: 0, or NaN when the row is NaN (as the reference)
                    out[t] = j0 + t < visible ? expf(zs[t] - m) * inv_s : 0.0f * inv_s;
            }
            if constexpr (W == 4) *reinterpret_cast<float4*>(yr + j0) = make_float4(out[0], out[1], out[2], out[3]);
            else yr[j0] = out[0];
        }
    }
}

__global__ void __launch_bounds__(32 * kSoftmaxWarps)
softmax_backward_kernel(const float* __restrict__ dy, const float* __restrict__ y, float* __restrict__ dx,
                        index_t rows, index_t n, float scale) {
    const int lane = threadIdx.x % 32;
    const index_t warp_global = index_t(blockIdx.x) * kSoftmaxWarps + threadIdx.x / 32;
    const index_t warp_stride = index_t(gridDim.x) * kSoftmaxWarps;
    for (index_t r = warp_global; r < rows; r += warp_stride) {
        const float* dyr = dy + r * n;
        const float* yr = y + r * n;
        float dot = 0.0f;  // Σ_k dy_k y_k, this lane's share
        for (index_t j = lane; j < n; j += 32) dot += dyr[j] * yr[j];
        dot = warp_sum(dot);
        float* dxr = dx + r * n;
        for (index_t j = lane; j < n; j += 32) dxr[j] = scale * yr[j] * (dyr[j] - dot);
    }
}

// Enough blocks to fill any current GPU several times over; more rows are
// handled by the warps' grid-stride loops.
unsigned softmax_grid(index_t rows) {
    const index_t blocks = (rows + kSoftmaxWarps - 1) / kSoftmaxWarps;
    return unsigned(blocks < 65535 ? blocks : 65535);
}

}  // namespace

void softmax_forward(const float* x, float* y, index_t rows, index_t n, float scale,
                     const SoftmaxMask& mask, bool causal, index_t tq) {
    if (rows == 0 || n == 0) return;
    if (causal && tq <= 0) throw CudaError("softmax_forward: causal needs tq > 0");
    // float4 path: every row (and mask row) starts 16-byte aligned.
    auto aligned = [](const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; };
    bool vec = n % 4 == 0 && aligned(x) && aligned(y) && (mask.data == nullptr || aligned(mask.data));
    for (int a = 0; a < mask.ndim; ++a) vec = vec && mask.mask_stride[a] % 4 == 0;
    const dim3 grid(softmax_grid(rows)), block(32 * kSoftmaxWarps);
    if (vec)
        launch("softmax_forward", softmax_forward_kernel<4>, grid, block, 0, nullptr, x, y, rows, n, scale, mask,
               causal, tq);
    else
        launch("softmax_forward", softmax_forward_kernel<1>, grid, block, 0, nullptr, x, y, rows, n, scale, mask,
               causal, tq);
}

void softmax_backward(const float* dy, const float* y, float* dx, index_t rows, index_t n, float scale) {
    if (rows == 0 || n == 0) return;
    launch("softmax_backward", softmax_backward_kernel, dim3(softmax_grid(rows)), dim3(32 * kSoftmaxWarps), 0,
           nullptr, dy, y, dx, rows, n, scale);
}

}  // namespace numformer::cuda
