// layernorm.cpp — LayerNorm forward/backward over rows (math in fused.h).
//
// A row of C = 768 floats is 3 KB and stays in L1, so each kernel reads a
// row from memory once and then makes short passes over it in cache:
//   forward:  Σx → μ;  Σ(x−μ)² → r;  out = (x−μ)·r·γ + β        (read x, write out)
//   backward: Σg, Σg·x̂ (x̂ recomputed from x, μ, r);  dx;  dγ/dβ partials
// The two-pass variance (Σ(x−μ)² after μ) avoids the cancellation of
// E[x²] − μ², which matters when |μ| ≫ σ.
//
// dγ and dβ are sums over rows. To make them independent of the thread
// count, rows are grouped in fixed blocks of kBlockRows; each block sums its
// rows into its own partial vector, and the partials are added in block order.
#include <cmath>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/fused.h"
#include "cpu/reduce.h"

namespace numformer::cpu {
namespace {

constexpr index_t kBlockRows = 32;

struct LayerNormForwardRows {
    static NF_INLINE void run(const float* x, const float* gamma, const float* beta, float* out,
                              float* mean, float* rstd, index_t r0, index_t r1, index_t C,
                              float eps) {
        const float inv_c = 1.0f / float(C);
        for (index_t r = r0; r < r1; ++r) {
            const float* NF_RESTRICT xr = x + r * C;
            float* NF_RESTRICT yr = out + r * C;
            const float mu = sum_lanes(xr, C) / float(C);
            float lane[kLanes] = {};
            index_t j = 0;
            for (; j + kLanes <= C; j += kLanes)
                for (int l = 0; l < kLanes; ++l) {
                    const float d = xr[j + l] - mu;
                    lane[l] += d * d;
                }
            float ss = 0.0f;
            for (; j < C; ++j) ss += (xr[j] - mu) * (xr[j] - mu);
            for (int l = 0; l < kLanes; ++l) ss += lane[l];
            const float rs = 1.0f / std::sqrt(ss * inv_c + eps);
            for (index_t c = 0; c < C; ++c) yr[c] = (xr[c] - mu) * rs * gamma[c] + beta[c];
            mean[r] = mu;
            rstd[r] = rs;
        }
    }
};

// Rows [b·kBlockRows, …) of blocks [b0, b1); block b writes partial[b·2C …]:
// C values of Σ dout·x̂ then C values of Σ dout.
struct LayerNormBackwardBlocks {
    static NF_INLINE void run(const float* dout, const float* x, const float* mean,
                              const float* rstd, const float* gamma, float* dx, float* partial,
                              index_t b0, index_t b1, index_t rows, index_t C) {
        const float inv_c = 1.0f / float(C);
        for (index_t b = b0; b < b1; ++b) {
            float* NF_RESTRICT pg = partial + b * 2 * C;  // Σ dout ⊙ x̂ over the block
            float* NF_RESTRICT pb = pg + C;               // Σ dout over the block
            for (index_t c = 0; c < 2 * C; ++c) pg[c] = 0.0f;
            const index_t end = std::min(rows, (b + 1) * kBlockRows);
            for (index_t r = b * kBlockRows; r < end; ++r) {
                const float* NF_RESTRICT dr = dout + r * C;
                const float* NF_RESTRICT xr = x + r * C;
                float* NF_RESTRICT dxr = dx + r * C;
                const float mu = mean[r], rs = rstd[r];
                // Σ g and Σ g·x̂ with g = γ ⊙ dout, x̂ = (x − μ) r
                float lg[kLanes] = {}, lgx[kLanes] = {};
                index_t j = 0;
                for (; j + kLanes <= C; j += kLanes)
                    for (int l = 0; l < kLanes; ++l) {
                        const float g = gamma[j + l] * dr[j + l];
                        lg[l] += g;
                        lgx[l] += g * ((xr[j + l] - mu) * rs);
                    }
                float sg = 0.0f, sgx = 0.0f;
                for (; j < C; ++j) {
                    const float g = gamma[j] * dr[j];
                    sg += g;
                    sgx += g * ((xr[j] - mu) * rs);
                }
                for (int l = 0; l < kLanes; ++l) {
                    sg += lg[l];
                    sgx += lgx[l];
                }
                const float mg = sg * inv_c, mgx = sgx * inv_c;
                for (index_t c = 0; c < C; ++c) {
                    const float xh = (xr[c] - mu) * rs;
                    dxr[c] = rs * (gamma[c] * dr[c] - mg - xh * mgx);
                    pg[c] += dr[c] * xh;
                    pb[c] += dr[c];
                }
            }
        }
    }
};

}  // namespace

void layernorm_forward(const float* x, const float* gamma, const float* beta, float* out,
                       float* mean, float* rstd, index_t rows, index_t C, float eps) {
    if (rows <= 0 || C <= 0) return;
    const Isa isa = active_isa();
    parallel_ranges(rows, std::max<index_t>(1, kParallelWork / C), [&](index_t r0, index_t r1) {
        run_isa<LayerNormForwardRows>(isa, x, gamma, beta, out, mean, rstd, r0, r1, C, eps);
    });
}

void layernorm_backward(const float* dout, const float* x, const float* mean, const float* rstd,
                        const float* gamma, float* dx, float* dgamma, float* dbeta, index_t rows,
                        index_t C) {
    if (C <= 0) return;
    for (index_t c = 0; c < C; ++c) dgamma[c] = dbeta[c] = 0.0f;
    if (rows <= 0) return;
    const index_t blocks = (rows + kBlockRows - 1) / kBlockRows;
    std::vector<float> partial(size_t(blocks * 2 * C));
    float* pp = partial.data();
    const Isa isa = active_isa();
    parallel_ranges(blocks, std::max<index_t>(1, kParallelWork / (kBlockRows * C)),
                    [&](index_t b0, index_t b1) {
                        run_isa<LayerNormBackwardBlocks>(isa, dout, x, mean, rstd, gamma, dx, pp,
                                                         b0, b1, rows, C);
                    });
    // Add the block partials in block order (C·blocks adds: negligible).
    for (index_t b = 0; b < blocks; ++b) {
        const float* pg = pp + b * 2 * C;
        for (index_t c = 0; c < C; ++c) {
            dgamma[c] += pg[c];
            dbeta[c] += pg[C + c];
        }
    }
}

}  // namespace numformer::cpu
