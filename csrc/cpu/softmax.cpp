// softmax.cpp — row-wise softmax forward/backward (math in softmax.h).
//
// Per row the forward makes four short passes, all over data that is in L1/L2
// for realistic row lengths (a 50257-float row is 200 KB):
//   1. m   = max_j s·x_j             (read x)
//   2. y_j = exp(s·x_j − m)          (read x, write y)
//   3. Σ   = Σ_j y_j                 (read y)
//   4. y_j = y_j · (1/Σ)             (read y, write y)
// Passes 2 and 4 are plain element-wise loops the compiler vectorises (vexp
// is branch-free); the reductions 1 and 3 keep kLanes independent partial
// results so that they vectorise too without reassociating a single sum.
// Rows are independent and are split across threads in contiguous chunks, so
// the result does not depend on the thread count.
#include "cpu/softmax.h"

#include <algorithm>
#include <limits>

#include "cpu/reduce.h"
#include "cpu/vexp.h"

namespace numformer::cpu {
namespace {

// max_j s·x_j. NaN never wins a `>` comparison, so it is skipped here; it
// still poisons the row through the sum (exp(NaN) = NaN) in pass 3.
template <typename T>
NF_INLINE T row_max(const T* NF_RESTRICT x, index_t n, T s) {
    const T neg_inf = -std::numeric_limits<T>::infinity();
    T lane[kLanes];
    for (int l = 0; l < kLanes; ++l) lane[l] = neg_inf;
    index_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) {
            const T t = s * x[j + l];
            lane[l] = t > lane[l] ? t : lane[l];
        }
    T m = neg_inf;
    for (; j < n; ++j) {
        const T t = s * x[j];
        m = t > m ? t : m;
    }
    for (int l = 0; l < kLanes; ++l) m = lane[l] > m ? lane[l] : m;
    return m;
}

template <typename T>
NF_INLINE void forward_rows(const T* x, T* y, index_t r0, index_t r1, index_t n, T s) {
    for (index_t r = r0; r < r1; ++r) {
        const T* NF_RESTRICT xr = x + r * n;
        T* NF_RESTRICT yr = y + r * n;
        const T m = row_max(xr, n, s);
        if (m == -std::numeric_limits<T>::infinity()) {
            // No entry above −inf: the row is all −inf (→ zeros, it has no
            // probability mass) unless some s·x_j is NaN (→ NaN, as always).
            bool has_nan = false;
            for (index_t j = 0; j < n; ++j) has_nan |= (s * xr[j]) != (s * xr[j]);
            const T fill = has_nan ? std::numeric_limits<T>::quiet_NaN() : T(0);
            for (index_t j = 0; j < n; ++j) yr[j] = fill;
            continue;
        }
        for (index_t j = 0; j < n; ++j) yr[j] = vexp(s * xr[j] - m);  // each ≤ 1 (one is ≈ 1)
        const T inv_sum = T(1) / sum_lanes(yr, n);          // sum ≥ 1: no 0/0
        for (index_t j = 0; j < n; ++j) yr[j] *= inv_sum;
    }
}

template <typename T>
NF_INLINE void backward_rows(const T* dy, const T* y, T* dx, index_t r0, index_t r1, index_t n) {
    for (index_t r = r0; r < r1; ++r) {
        const T* NF_RESTRICT dyr = dy + r * n;
        const T* NF_RESTRICT yr = y + r * n;
        T* NF_RESTRICT dxr = dx + r * n;
        const T dot = dot_lanes(dyr, yr, n);  // Σ_i dy_i y_i
        for (index_t j = 0; j < n; ++j) dxr[j] = yr[j] * (dyr[j] - dot);
    }
}

// ---- instruction-set variants ----------------------------------------------

template <typename T>
using ForwardFn = void (*)(const T*, T*, index_t, index_t, index_t, T);
template <typename T>
using BackwardFn = void (*)(const T*, const T*, T*, index_t, index_t, index_t);

template <typename T>
void forward_generic(const T* x, T* y, index_t r0, index_t r1, index_t n, T s) {
    forward_rows(x, y, r0, r1, n, s);
}
template <typename T>
void backward_generic(const T* dy, const T* y, T* dx, index_t r0, index_t r1, index_t n) {
    backward_rows(dy, y, dx, r0, r1, n);
}
#if NUMFORMER_X86_DISPATCH
template <typename T>
NF_TARGET("avx2,fma")
void forward_avx2(const T* x, T* y, index_t r0, index_t r1, index_t n, T s) {
    forward_rows(x, y, r0, r1, n, s);
}
template <typename T>
NF_TARGET("avx2,fma")
void backward_avx2(const T* dy, const T* y, T* dx, index_t r0, index_t r1, index_t n) {
    backward_rows(dy, y, dx, r0, r1, n);
}
template <typename T>
NF_TARGET("avx512f,avx2,fma")
void forward_avx512(const T* x, T* y, index_t r0, index_t r1, index_t n, T s) {
    forward_rows(x, y, r0, r1, n, s);
}
template <typename T>
NF_TARGET("avx512f,avx2,fma")
void backward_avx512(const T* dy, const T* y, T* dx, index_t r0, index_t r1, index_t n) {
    backward_rows(dy, y, dx, r0, r1, n);
}
#endif

template <typename T>
ForwardFn<T> forward_for(Isa isa) {
#if NUMFORMER_X86_DISPATCH
    if (isa == Isa::avx512) return forward_avx512<T>;
    if (isa == Isa::avx2) return forward_avx2<T>;
#endif
    (void)isa;
    return forward_generic<T>;
}

template <typename T>
BackwardFn<T> backward_for(Isa isa) {
#if NUMFORMER_X86_DISPATCH
    if (isa == Isa::avx512) return backward_avx512<T>;
    if (isa == Isa::avx2) return backward_avx2<T>;
#endif
    (void)isa;
    return backward_generic<T>;
}

// Rows split into one contiguous chunk per thread; below ~32k elements the
// whole call takes a few microseconds and runs on one thread.
constexpr index_t kParallelElements = 1 << 15;

int threads_for(index_t rows, index_t n) {
    if (rows * n < kParallelElements) return 1;
    return int(std::min<index_t>(num_threads(), rows));
}

}  // namespace

template <typename T>
void softmax_forward(const T* x, T* y, index_t rows, index_t n, T scale) {
    if (rows <= 0 || n <= 0) return;
    const ForwardFn<T> fn = forward_for<T>(active_isa());
    const int threads = threads_for(rows, n);
    const index_t chunk = (rows + threads - 1) / threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int t = 0; t < threads; ++t) {
        const index_t r0 = std::min<index_t>(rows, t * chunk);
        fn(x, y, r0, std::min<index_t>(rows, r0 + chunk), n, scale);
    }
}

template <typename T>
void softmax_backward(const T* dy, const T* y, T* dx, index_t rows, index_t n) {
    if (rows <= 0 || n <= 0) return;
    const BackwardFn<T> fn = backward_for<T>(active_isa());
    const int threads = threads_for(rows, n);
    const index_t chunk = (rows + threads - 1) / threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int t = 0; t < threads; ++t) {
        const index_t r0 = std::min<index_t>(rows, t * chunk);
        fn(dy, y, dx, r0, std::min<index_t>(rows, r0 + chunk), n);
    }
}

template void softmax_forward<float>(const float*, float*, index_t, index_t, float);
template void softmax_forward<double>(const double*, double*, index_t, index_t, double);
template void softmax_backward<float>(const float*, const float*, float*, index_t, index_t);
template void softmax_backward<double>(const double*, const double*, double*, index_t, index_t);

}  // namespace numformer::cpu
