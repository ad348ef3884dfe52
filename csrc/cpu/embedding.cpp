// embedding.cpp — the backward of a token + position embedding lookup.
//
//   dwte[ids[n]] += dout[n]          (n = 0 … B·T−1: a scatter-add)
//   dwpe[pos0 + t] += Σ_b dout[b, t]
//
// Scatter-adds race when two threads add into the same row. Instead of
// atomics, each thread *owns* a contiguous range of vocabulary rows: it scans
// all ids (B·T of them: cheap) and adds only the rows it owns, in order of n.
// So every dwte row is summed in the same order whatever the thread count,
// repeated ids accumulate, and the result is deterministic. The work is
// B·T·C adds; only the touched rows of dwte are read and written, so adding
// straight into the model's gradient buffer costs ~B·T rows, not V rows.
// dwpe: threads take ranges of t, summing the batch in order b = 0, 1, ….
#include "cpu/dispatch.h"
#include "cpu/fused.h"

namespace numformer::cpu {
namespace {

struct ScatterRows {
    static NF_INLINE void run(const float* dout, const std::int64_t* ids, float* dwte,
                              index_t N, index_t C, index_t v0, index_t v1) {
        for (index_t n = 0; n < N; ++n) {
            const std::int64_t id = ids[n];
            if (id < v0 || id >= v1) continue;
            float* NF_RESTRICT dst = dwte + id * C;
            const float* NF_RESTRICT src = dout + n * C;
            for (index_t c = 0; c < C; ++c) dst[c] += src[c];
        }
    }
};

struct PositionRows {
    static NF_INLINE void run(const float* dout, float* dwpe, index_t B, index_t T, index_t C,
                              index_t pos0, index_t t0, index_t t1) {
        for (index_t t = t0; t < t1; ++t) {
            float* NF_RESTRICT dst = dwpe + (pos0 + t) * C;
            for (index_t b = 0; b < B; ++b) {
                const float* NF_RESTRICT src = dout + (b * T + t) * C;
                for (index_t c = 0; c < C; ++c) dst[c] += src[c];
            }
        }
    }
};

}  // namespace

void embedding_backward(const float* dout, const std::int64_t* ids, float* dwte, float* dwpe,
                        index_t B, index_t T, index_t C, index_t V, index_t pos0) {
    if (B <= 0 || T <= 0 || C <= 0) return;
    const index_t N = B * T;
    const Isa isa = active_isa();
    // Grain: split the vocabulary only when there are enough rows to add.
    const index_t grain = N * C >= kParallelWork ? std::max<index_t>(1, V / num_threads()) : V;
    parallel_ranges(V, grain, [&](index_t v0, index_t v1) {
        run_isa<ScatterRows>(isa, dout, ids, dwte, N, C, v0, v1);
    });
    if (dwpe != nullptr) {
        parallel_ranges(T, std::max<index_t>(1, kParallelWork / (B * C)), [&](index_t t0, index_t t1) {
            run_isa<PositionRows>(isa, dout, dwpe, B, T, C, pos0, t0, t1);
        });
    }
}

}  // namespace numformer::cpu
