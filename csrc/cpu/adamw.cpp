// adamw.cpp — AdamW and SGD updates over flat float32 buffers, in one pass.
//
// NumPy's AdamW (optim.py) makes ~14 passes over P-element buffers; this
// makes one: per element it reads p, g, m, v (and the decay mask) and writes
// p, m, v. At P = 124M that is 2.5 GB read + 1.5 GB written instead of
// ~14 × 1 GB.
//
// Bitwise agreement with NumPy: every operation below is the one optim.py
// performs, in its order, on float32 values with the scalars rounded to
// float32 first (NumPy 2 casts a Python float operand to the array's dtype).
// IEEE +, −, ×, ÷ and √ are correctly rounded on both sides, so the results
// are identical — provided the compiler does not contract a·b + c into one
// FMA (which rounds once instead of twice). CMakeLists.txt therefore builds
// this file with -ffp-contract=off; nothing here is reassociated.
#include "cpu/dispatch.h"
#include "cpu/fused.h"

#include <cmath>

namespace numformer::cpu {
namespace {

// The decay variants are template parameters so that each inner loop is
// branch-free and vectorises.
template <bool kDecay, bool kMask>
NF_INLINE void adamw_range(float* NF_RESTRICT p, const float* NF_RESTRICT g,
                           float* NF_RESTRICT m, float* NF_RESTRICT v,
                           const float* NF_RESTRICT mask, const AdamWScalars& s, index_t i0,
                           index_t i1) {
    for (index_t i = i0; i < i1; ++i) {
        float pi = p[i];
        if (kDecay) {
            if (kMask)
                pi = pi - (mask[i] * s.decay) * pi;            // p -= (mask·lr·wd)·p
            else
                pi = pi * s.keep;                              // p *= 1 − lr·wd
        }
        const float gi = g[i];
        const float mi = m[i] + (gi - m[i]) * s.one_m_b1;      // m += (1−β1)(g − m)
        const float vi = v[i] * s.b2 + (gi * gi) * s.one_m_b2; // v = β2 v + (1−β2) g²
        const float denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
        p[i] = pi + (mi / denom) * s.neg_step;                 // p −= lr/bc1 · m / (√v/√bc2 + ε)
        m[i] = mi;
        v[i] = vi;
    }
}

struct AdamWRange {
    static NF_INLINE void run(float* p, const float* g, float* m, float* v, const float* mask,
                              AdamWScalars s, index_t i0, index_t i1) {
        if (!s.decay_on)
            adamw_range<false, false>(p, g, m, v, mask, s, i0, i1);
        else if (mask == nullptr)
            adamw_range<true, false>(p, g, m, v, mask, s, i0, i1);
        else
            adamw_range<true, true>(p, g, m, v, mask, s, i0, i1);
    }
};

struct SgdRange {
    static NF_INLINE void run(float* p_, const float* g_, float* buf_, const float* mask_,
                              SgdScalars s, index_t i0, index_t i1) {
        float* NF_RESTRICT p = p_;
        const float* NF_RESTRICT g = g_;
        float* NF_RESTRICT buf = buf_;
        const float* NF_RESTRICT mask = mask_;
        for (index_t i = i0; i < i1; ++i) {
            float d;                                     // d = g + wd·mask·p
            if (s.wd != 0.0f)
                d = (mask != nullptr ? (mask[i] * s.wd) * p[i] : p[i] * s.wd) + g[i];
            else
                d = g[i];
            if (buf == nullptr) {
                p[i] = p[i] + d * s.neg_lr;
                continue;
            }
            const float b = buf[i] * s.momentum + d;     // b = μ b + d
            buf[i] = b;
            if (s.nesterov)                              // p -= lr (d + μ b), in two steps
                p[i] = (p[i] + d * s.neg_lr) + b * s.neg_lr_mu;
            else
                p[i] = p[i] + b * s.neg_lr;
        }
    }
};

constexpr index_t kGrain = kParallelWork;

}  // namespace

void adamw_step(float* p, const float* g, float* m, float* v, const float* mask, index_t n,
                const AdamWScalars& s) {
    const Isa isa = active_isa();
    parallel_ranges(n, kGrain, [&](index_t i0, index_t i1) {
        run_isa<AdamWRange>(isa, p, g, m, v, mask, s, i0, i1);
    });
}

void sgd_step(float* p, const float* g, float* buf, const float* mask, index_t n,
              const SgdScalars& s) {
    const Isa isa = active_isa();
    parallel_ranges(n, kGrain, [&](index_t i0, index_t i1) {
        run_isa<SgdRange>(isa, p, g, buf, mask, s, i0, i1);
    });
}

}  // namespace numformer::cpu
