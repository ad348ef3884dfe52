// gelu.cpp — GELU (tanh form) forward/backward, element-wise.
//
// With u = k (x + a x³), k = √(2/π), a = 0.044715:
//   ½ (1 + tanh u) = 1 / (1 + e^{−2u}) = σ(2u)
// so   gelu(x) = x σ,          σ = 1 / (1 + e),  e = e^{−2u}
// and  gelu'(x) = σ + x σ'(2u)·2u' = σ + 2 x σ(1 − σ) k (1 + 3a x²),  1 − σ = e σ.
// Writing everything through σ avoids the cancellation in 1 + tanh u for
// very negative x (where tanh u ≈ −1), so this is at least as accurate as the
// NumPy formula. e comes from vexp (vectorisable; vexp clamps its argument at
// 88, so e ≤ e^88 and 1 + e never overflows; e underflows to 0 for large x,
// giving σ = 1 and gelu(x) = x). The backward recomputes e from x instead
// of reading a saved tanh: one exp per element is cheaper than a pass over
// memory. Elements are independent; threads take contiguous pieces.
// Where vexp's clamp bites (−2u > 88, x < −9.8) σ(2u) < e^−88 is taken as
// 0, as tanh u = −1 makes it in the NumPy formula: gelu(x) = x · 0 and
// gelu'(x) = 0 there (the true values are below 1e-37). That also gives
// non-finite x what the reference gives (docs/kernels.md): gelu(+inf) = +inf,
// gelu(−inf) = −inf · 0 = NaN, gelu'(±inf) = NaN (inf · 0), and an infinite
// dout times a gelu' that is 0 is NaN — with σ = e^−88 they were −inf, finite.
#include "cpu/dispatch.h"
#include "cpu/fused.h"
#include "cpu/vexp.h"

namespace numformer::cpu {
namespace {

constexpr float kK = 0.7978845608028654f;  // √(2/π)
constexpr float kA = 0.044715f;
constexpr float kExpMax = ExpTraits<float>::kMaxArg;  // vexp clamps its argument here

struct GeluForward {
    static NF_INLINE void run(const float* x, float* out, index_t i0, index_t i1) {
        const float* NF_RESTRICT xs = x;
        float* NF_RESTRICT ys = out;
        for (index_t i = i0; i < i1; ++i) {
            const float xi = xs[i];
            const float u = kK * (xi + kA * (xi * xi * xi));
            const float t = -2.0f * u;
            const float e = vexp(t);
            ys[i] = t > kExpMax ? xi * 0.0f : xi / (1.0f + e);  // σ = 0 past the clamp
        }
    }
};

struct GeluBackward {
    static NF_INLINE void run(const float* dout, const float* x, float* dx, index_t i0,
                              index_t i1) {
        const float* NF_RESTRICT ds = dout;
        const float* NF_RESTRICT xs = x;
        float* NF_RESTRICT gs = dx;
        for (index_t i = i0; i < i1; ++i) {
            const float xi = xs[i];
            const float x2 = xi * xi;
            const float u = kK * (xi + kA * (x2 * xi));
            const float t = -2.0f * u;
            const float e = vexp(t);
            const float s = t > kExpMax ? 0.0f : 1.0f / (1.0f + e);  // σ(2u)
            const float local = s + 2.0f * xi * s * (e * s) * kK * (1.0f + 3.0f * kA * x2);
            gs[i] = ds[i] * local;
        }
    }
};

constexpr index_t kGrain = kParallelWork;

}  // namespace

void gelu_tanh_forward(const float* x, float* out, index_t n) {
    const Isa isa = active_isa();
    parallel_ranges(n, kGrain, [&](index_t i0, index_t i1) { run_isa<GeluForward>(isa, x, out, i0, i1); });
}

void gelu_tanh_backward(const float* dout, const float* x, float* dx, index_t n) {
    const Isa isa = active_isa();
    parallel_ranges(n, kGrain, [&](index_t i0, index_t i1) {
        run_isa<GeluBackward>(isa, dout, x, dx, i0, i1);
    });
}

}  // namespace numformer::cpu
