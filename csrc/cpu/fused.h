// fused.h — the non-GEMM parts of a training step, one pass over memory each.
//
// float32 only (float64 runs on the NumPy reference in numformer.ops); all
// arrays dense and row-major. Each kernel's math, and the NumPy function it
// must agree with, is stated at its declaration. The bindings
// (bindings/bind_fused.cpp) validate every argument before calling in.
#pragma once

#include <cstdint>

#include "cpu/runtime.h"

namespace numformer::cpu {

// ---- LayerNorm over rows of length C (ops/layernorm.py) ---------------------
//   μ = mean(x),  σ² = mean((x − μ)²),  r = 1/√(σ² + ε)
//   out = γ ⊙ (x − μ) r + β;   saves μ and r per row (the backward recomputes x̂).
void layernorm_forward(const float* x, const float* gamma, const float* beta, float* out,
                       float* mean, float* rstd, index_t rows, index_t C, float eps);
//   g = γ ⊙ dout,  dx = r (g − mean(g) − x̂ mean(g ⊙ x̂))
//   dγ = Σ_rows dout ⊙ x̂,  dβ = Σ_rows dout   (overwritten, not accumulated)
void layernorm_backward(const float* dout, const float* x, const float* mean, const float* rstd,
                        const float* gamma, float* dx, float* dgamma, float* dbeta, index_t rows,
                        index_t C);

// ---- GELU, tanh form (ops/gelu.py, approximate="tanh") ----------------------
//   out = ½ x (1 + tanh u) = x σ(2u),  u = k (x + a x³)
void gelu_tanh_forward(const float* x, float* out, index_t n);
//   dx = dout (σ + 2 x σ (1 − σ) k (1 + 3a x²)),  σ = σ(2u)   (recomputed from x)
void gelu_tanh_backward(const float* dout, const float* x, float* dx, index_t n);

// ---- cross-entropy over rows of V logits (ops/cross_entropy.py) -------------
// Forward: lse[n] = logsumexp(z[n]) (one read of z), and the sum over rows
// with target ≠ ignore of lse[n] − z[n, y[n]], returned (in double).
// Targets must be ignore or in [0, V) (the bindings check).
double cross_entropy_forward(const float* z, const std::int64_t* y, float* lse, index_t rows,
                             index_t V, std::int64_t ignore);
// Backward: dz[n] = (softmax(z[n]) − onehot(y[n])) · scale, softmax from the
// saved lse; rows with target == ignore get 0.
void cross_entropy_backward(const float* z, const std::int64_t* y, const float* lse, float* dz,
                            index_t rows, index_t V, std::int64_t ignore, float scale);

// ---- embedding backward (ops/embedding.py) ----------------------------------
// dwte[ids[n]] += dout[n] for n in order (repeated ids accumulate), and
// dwpe[pos0 + t] += Σ_b dout[b, t]. dout: (B·T, C); ids in [0, V).
void embedding_backward(const float* dout, const std::int64_t* ids, float* dwte, float* dwpe,
                        index_t B, index_t T, index_t C, index_t V, index_t pos0);

// ---- optimizers on flat buffers (optim.py) ----------------------------------
// The same float32 operations, in the same order, as the NumPy AdamW/SGD
// (scalars rounded to float32 first, as NumPy does), so the results are
// bitwise equal to them. mask may be null (decay everywhere).
struct AdamWScalars {
    bool decay_on;    // lr ≠ 0 and wd ≠ 0 (else no decay term at all)
    float decay;      // lr·wd, times the mask
    float keep;       // 1 − lr·wd, used when mask is null
    float one_m_b1;   // 1 − β1
    float b2;         // β2
    float one_m_b2;   // 1 − β2
    float bc2_sqrt;   // √(1 − β2^t)
    float eps;        // ε
    float neg_step;   // −lr / (1 − β1^t)
};
void adamw_step(float* p, const float* g, float* m, float* v, const float* mask, index_t n,
                const AdamWScalars& s);

struct SgdScalars {
    float wd;          // weight decay λ (0: none)
    float momentum;    // μ (0: no buffer)
    bool nesterov;
    float neg_lr;      // −lr
    float neg_lr_mu;   // −lr·μ
};
void sgd_step(float* p, const float* g, float* buf, const float* mask, index_t n,
              const SgdScalars& s);

}  // namespace numformer::cpu
