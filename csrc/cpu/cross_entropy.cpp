// cross_entropy.cpp — softmax cross-entropy over long rows (V = 50257 for GPT-2).
//
// Forward, per row: lse = m + log Σ_j e^{z_j − m} with an *online* maximum,
// so the row is read from memory once. The row is walked in chunks of
// kChunk floats (2 KB, in L1): the chunk's maximum c is found first; if it
// exceeds the running maximum m, the running sum is rescaled by e^{m − c}
// and m = c; then the chunk's Σ e^{z_j − m} (vexp, kLanes float partial sums
// over ≤ kChunk/kLanes terms each) is added to the running sum, held in
// double. The float partial sums are short, the long sum is double: the
// relative error of Σ is a few float ulps, whatever V.
//   The loss per counted row is lse − z[y]; the total is summed in double in
// row order after the parallel part, so it does not depend on threads.
//
// Backward, per row: dz_j = (e^{z_j − lse} − [j = y]) · scale — one read of
// z, one write of dz (vexp). Rows whose target is ignore_index are zero.
//
// Special values (as the NumPy reference): a chunk whose maximum is −inf
// adds nothing; a row that is entirely −inf has lse = −inf (its loss is NaN
// and its softmax is taken as 0, so its gradient is −scale at the target);
// NaN or +inf in a row makes its lse NaN.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/fused.h"
#include "cpu/reduce.h"
#include "cpu/vexp.h"

namespace numformer::cpu {
namespace {

constexpr index_t kChunk = 512;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

NF_INLINE float chunk_max(const float* NF_RESTRICT z, index_t n) {
    float lane[kLanes];
    for (int l = 0; l < kLanes; ++l) lane[l] = kNegInf;
    index_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) lane[l] = z[j + l] > lane[l] ? z[j + l] : lane[l];
    float m = kNegInf;
    for (; j < n; ++j) m = z[j] > m ? z[j] : m;
    for (int l = 0; l < kLanes; ++l) m = lane[l] > m ? lane[l] : m;
    return m;
}

// Σ_j e^{z_j − m} over one chunk: the exponentials go to a small buffer
// first (a plain element-wise loop, which vectorises like softmax's), then
// are summed with kLanes partial sums.
NF_INLINE float chunk_sum_exp(const float* NF_RESTRICT z, index_t n, float m) {
    alignas(64) float e[kChunk];
    for (index_t j = 0; j < n; ++j) e[j] = vexp(z[j] - m);
    return sum_lanes(e, n);
}

struct XentForwardRows {
    static NF_INLINE void run(const float* z, float* lse, index_t r0, index_t r1, index_t V) {
        for (index_t r = r0; r < r1; ++r) {
            const float* zr = z + r * V;
            float m = kNegInf;
            double s = 0.0;
            bool poisoned = false;  // +inf or NaN seen: the lse is NaN, as in the reference
            for (index_t j0 = 0; j0 < V; j0 += kChunk) {
                const index_t n = std::min(kChunk, V - j0);
                const float c = chunk_max(zr + j0, n);
                if (c == kNegInf) {  // all −inf adds nothing; NaNs (skipped by max) poison
                    for (index_t j = 0; j < n; ++j) poisoned |= zr[j0 + j] != zr[j0 + j];
                    continue;
                }
                if (c == std::numeric_limits<float>::infinity()) poisoned = true;
                if (c > m) {
                    s *= std::exp(double(m) - double(c));  // m = −inf: s is 0 and stays 0
                    m = c;
                }
                s += double(chunk_sum_exp(zr + j0, n, m));
            }
            float out = m + float(std::log(s));  // m = −inf: −inf + log 0 = −inf
            if (poisoned) out = std::numeric_limits<float>::quiet_NaN();
            lse[r] = out;
        }
    }
};

struct XentBackwardRows {
    static NF_INLINE void run(const float* z, const std::int64_t* y, const float* lse, float* dz,
                              index_t r0, index_t r1, index_t V, std::int64_t ignore,
                              float scale) {
        for (index_t r = r0; r < r1; ++r) {
            const float* NF_RESTRICT zr = z + r * V;
            float* NF_RESTRICT dr = dz + r * V;
            if (y[r] == ignore) {
                for (index_t j = 0; j < V; ++j) dr[j] = 0.0f;
                continue;
            }
            const float l = lse[r];
            if (l == kNegInf) {  // an all −inf row: no probability mass anywhere
                for (index_t j = 0; j < V; ++j) dr[j] = 0.0f;
            } else {
                for (index_t j = 0; j < V; ++j) dr[j] = vexp(zr[j] - l) * scale;
            }
            dr[y[r]] -= scale;
        }
    }
};

}  // namespace

double cross_entropy_forward(const float* z, const std::int64_t* y, float* lse, index_t rows,
                             index_t V, std::int64_t ignore) {
    if (rows <= 0) return 0.0;
    const Isa isa = active_isa();
    parallel_ranges(rows, std::max<index_t>(1, kParallelWork / std::max<index_t>(V, 1)),
                    [&](index_t r0, index_t r1) { run_isa<XentForwardRows>(isa, z, lse, r0, r1, V); });
    double total = 0.0;
    for (index_t r = 0; r < rows; ++r)
        if (y[r] != ignore) total += double(lse[r]) - double(z[r * V + y[r]]);
    return total;
}

void cross_entropy_backward(const float* z, const std::int64_t* y, const float* lse, float* dz,
                            index_t rows, index_t V, std::int64_t ignore, float scale) {
    if (rows <= 0 || V <= 0) return;
    const Isa isa = active_isa();
    parallel_ranges(rows, std::max<index_t>(1, kParallelWork / V), [&](index_t r0, index_t r1) {
        run_isa<XentBackwardRows>(isa, z, y, lse, dz, r0, r1, V, ignore, scale);
    });
}

}  // namespace numformer::cpu
