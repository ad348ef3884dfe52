// dispatch.h — compile one kernel body for each instruction set, and split a
// range of work across threads. Used by the fused kernels (fused.h).
//
// A kernel is a struct with `static NF_INLINE void run(args...)`. Calling
// `run_isa<K>(isa, args...)` runs the copy of K::run compiled for `isa`:
// the three `run_*` wrappers below carry the target attribute, and because
// K::run (and everything it calls, e.g. vexp) is force-inlined into them, the
// compiler vectorises the same source once per instruction set.
#pragma once

#include <algorithm>

#include "cpu/runtime.h"

namespace numformer::cpu {

template <class K, class... A>
void run_generic(A... a) {
    K::run(a...);
}
#if NUMFORMER_X86_DISPATCH
template <class K, class... A>
NF_TARGET("avx2,fma")
void run_avx2(A... a) {
    K::run(a...);
}
template <class K, class... A>
NF_TARGET("avx512f,avx2,fma")
void run_avx512(A... a) {
    K::run(a...);
}
#endif

template <class K, class... A>
void run_isa(Isa isa, A... a) {
#if NUMFORMER_X86_DISPATCH
    if (isa == Isa::avx512) return run_avx512<K>(a...);
    if (isa == Isa::avx2) return run_avx2<K>(a...);
#endif
    (void)isa;
    run_generic<K>(a...);
}

// Least work (elements touched) worth waking a second thread for: about a
// millisecond of one core at memory speed. Below it, forking costs more than
// it saves, and on a shared machine a parallel region waits for the slowest
// thread to be scheduled, which can take a whole time slice (we measured
// 12 ms for a LayerNorm that runs in 0.2 ms on one thread).
constexpr index_t kParallelWork = index_t(1) << 21;

// Call body(begin, end) on contiguous, disjoint pieces of [0, n), one per
// thread. `grain` is the least work worth a thread: n < 2·grain runs on the
// calling thread alone. Pieces are fixed by n and the thread count only, and
// every kernel using this computes each output element from one piece, so
// results never depend on the thread count.
template <class F>
void parallel_ranges(index_t n, index_t grain, F&& body) {
    if (n <= 0) return;
    const index_t by_work = std::max<index_t>(1, n / std::max<index_t>(grain, 1));
    const int threads = int(std::min<index_t>(num_threads(), by_work));
    if (threads <= 1) {
        body(index_t(0), n);
        return;
    }
    const index_t chunk = (n + threads - 1) / threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < threads; ++t) {
        const index_t b = std::min<index_t>(n, t * chunk);
        const index_t e = std::min<index_t>(n, b + chunk);
        if (b < e) body(b, e);
    }
}

}  // namespace numformer::cpu
