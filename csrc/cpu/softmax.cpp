// softmax.cpp — row-wise softmax forward/backward (math in softmax.h).
//
// Memory: each row is read once from memory and its output written once;
// the passes below re-read the row from L1/L2 (a 1024-float row is 4 KiB, a
// 50257-float row 200 KiB — both stay in the 1 MiB L2 with its output).
// So the cost is the arithmetic over cached data, chiefly exp:
//   1. m   = max_{j<lim} z_j,  z_j = s·x_j (+ mask_j)   (read x [, mask])
//   2. y_j = exp(z_j − m), Σ += y_j                      (read x [, mask], write y)
//   3. y_j *= 1/Σ;  y_j = 0 for j ≥ lim (causal)         (read/write y)
// z is recomputed in pass 2 (one FMA) rather than stored: cheaper than an
// extra write + read. A one-pass "online" max/sum would save pass 1 but
// needs exp twice per element (once against the running max, once more for
// the output); with the row in cache, the extra exp costs more than the pass.
//
// The AVX-512 and AVX2 float paths are written with intrinsics (a vectorised
// exp, masked loads/stores for row tails); the other paths are plain loops
// over vexp that the compiler vectorises.
// Rows are independent and are split across threads in contiguous chunks, so
// the result does not depend on the thread count.
#include "cpu/softmax.h"

#include <algorithm>
#include <limits>

#include "cpu/reduce.h"
#include "cpu/vexp.h"

#if NUMFORMER_X86_DISPATCH
#include <immintrin.h>
#endif

namespace numformer::cpu {
namespace {

// Mask row and causal limit for row r: keys [0, lim) are visible.
template <typename T>
NF_INLINE const T* mask_row(const SoftmaxMask<T>& mk, index_t r, index_t n) {
    if (mk.add == nullptr) return nullptr;
    index_t off = 0;
    for (int d = mk.lead_ndim - 1; d >= 0; --d) {
        const index_t size = mk.lead_shape[d];
        off += (r % size) * mk.row_stride[d];
        r /= size;
    }
    return mk.add + off * n;
}

template <typename T>
NF_INLINE index_t visible_keys(const SoftmaxMask<T>& mk, index_t r, index_t n) {
    if (mk.causal_tq <= 0) return n;
    const index_t i = r % mk.causal_tq;  // query index within its (Tq, Tk) block
    return std::clamp<index_t>(i + n - mk.causal_tq + 1, 0, n);
}

// ---- portable rows (AVX2 / generic / double) ----------------------------

template <typename T>
NF_INLINE void forward_rows(const T* x, T* y, index_t r0, index_t r1, index_t n, T s,
                            const SoftmaxMask<T>& mk) {
    const T neg_inf = -std::numeric_limits<T>::infinity();
    for (index_t r = r0; r < r1; ++r) {
        const T* NF_RESTRICT xr = x + r * n;
        const T* NF_RESTRICT mr = mask_row(mk, r, n);
        T* NF_RESTRICT yr = y + r * n;
        const index_t lim = visible_keys(mk, r, n);
        // z_j = s·x_j + mask_j, written to y (pass 1 also finds the max; NaN
        // never wins a `>`, it poisons the row through the sum instead).
        T lane[kLanes];
        for (int l = 0; l < kLanes; ++l) lane[l] = neg_inf;
        index_t j = 0;
        for (; j + kLanes <= lim; j += kLanes)
            for (int l = 0; l < kLanes; ++l) {
                const T z = mr ? s * xr[j + l] + mr[j + l] : s * xr[j + l];
                yr[j + l] = z;
                lane[l] = z > lane[l] ? z : lane[l];
            }
        T m = neg_inf;
        for (; j < lim; ++j) {
            const T z = mr ? s * xr[j] + mr[j] : s * xr[j];
            yr[j] = z;
            m = z > m ? z : m;
        }
        for (int l = 0; l < kLanes; ++l) m = lane[l] > m ? lane[l] : m;
        for (j = lim; j < n; ++j) yr[j] = T(0);
        if (m == neg_inf) {
            // No entry above −inf: zeros (no probability mass) unless some
            // z_j is NaN (→ NaN, as always).
            bool has_nan = false;
            for (j = 0; j < lim; ++j) has_nan |= yr[j] != yr[j];
            const T fill = has_nan ? std::numeric_limits<T>::quiet_NaN() : T(0);
            for (j = 0; j < n; ++j) yr[j] = fill;
            continue;
        }
        for (j = 0; j < lim; ++j) yr[j] = vexp(yr[j] - m);  // each ≤ 1 (one is ≈ 1)
        const T sum = sum_lanes(yr, lim);                    // ≥ 1: no 0/0 (or NaN)
        if (sum != sum) {  // NaN or +inf in the row: all NaN, causal tail included
            for (j = 0; j < n; ++j) yr[j] = std::numeric_limits<T>::quiet_NaN();
            continue;
        }
        const T inv_sum = T(1) / sum;
        for (j = 0; j < lim; ++j) yr[j] *= inv_sum;
    }
}

template <typename T>
NF_INLINE void backward_rows(const T* dy, const T* y, T* dx, index_t r0, index_t r1, index_t n,
                             T s) {
    for (index_t r = r0; r < r1; ++r) {
        const T* NF_RESTRICT dyr = dy + r * n;
        const T* NF_RESTRICT yr = y + r * n;
        T* NF_RESTRICT dxr = dx + r * n;
        const T dot = dot_lanes(dyr, yr, n);  // Σ_i dy_i y_i
        if (s == T(1))
            for (index_t j = 0; j < n; ++j) dxr[j] = yr[j] * (dyr[j] - dot);
        else
            for (index_t j = 0; j < n; ++j) dxr[j] = s * (yr[j] * (dyr[j] - dot));
    }
}

// ---- AVX-512 float rows ----------------------------------------------------
#if NUMFORMER_X86_DISPATCH

// e^x for x ≤ 0 (or −inf), 16 lanes: the same method and accuracy as vexp
// (n = round(x·log2 e), r = x − n·ln2 in two parts, degree-7 Taylor for e^r),
// with vscalefps computing p·2^n in one instruction. Arguments below
// kLowest (e^x < FLT_MIN), −inf included, give 0: the same flush as vexp.
NF_TARGET("avx512f,avx2,fma")
NF_INLINE __m512 exp_avx512(__m512 x) {
    using Tr = ExpTraits<float>;
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(Tr::kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(Tr::kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(Tr::kLn2Lo), r);
    constexpr InvFactorials<float, Tr::kDegree> c{};
    __m512 p = _mm512_set1_ps(c.value[Tr::kDegree]);
#pragma GCC unroll 8
    for (int i = Tr::kDegree - 1; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c.value[i]));
    const __m512 e = _mm512_scalef_ps(p, n);
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(Tr::kLowest), _CMP_GE_OQ), e);
}

NF_TARGET("avx512f,avx2,fma")
NF_INLINE __mmask16 tail_mask(index_t left) {
    return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

NF_TARGET("avx512f,avx2,fma")
void forward_avx512_f32(const float* x, float* y, index_t r0, index_t r1, index_t n, float s,
                        const SoftmaxMask<float>& mk) {
    const __m512 vs = _mm512_set1_ps(s);
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (index_t r = r0; r < r1; ++r) {
        const float* xr = x + r * n;
        const float* mr = mask_row(mk, r, n);
        float* yr = y + r * n;
        const index_t lim = visible_keys(mk, r, n);

        // Pass 1: max of z over the visible keys, and whether any z is NaN.
        __m512 vmax = _mm512_set1_ps(neg_inf);
        __mmask16 nan_seen = 0;
        for (index_t j = 0; j < lim; j += 16) {
            const __mmask16 k = tail_mask(lim - j);
            __m512 z = _mm512_mul_ps(vs, _mm512_maskz_loadu_ps(k, xr + j));
            if (mr) z = _mm512_add_ps(z, _mm512_maskz_loadu_ps(k, mr + j));
            vmax = _mm512_mask_max_ps(vmax, k, vmax, z);
            nan_seen |= _mm512_mask_cmp_ps_mask(k, z, z, _CMP_UNORD_Q);
        }
        const float m = _mm512_reduce_max_ps(vmax);
        if (nan_seen != 0 || m == std::numeric_limits<float>::infinity() || m == neg_inf) {
            // NaN / +inf anywhere: all NaN. Everything −inf (or no visible
            // key): all zeros — the row carries no probability mass.
            const __m512 fill = _mm512_set1_ps(m == neg_inf && nan_seen == 0
                                                   ? 0.0f
                                                   : std::numeric_limits<float>::quiet_NaN());
            for (index_t j = 0; j < n; j += 16) _mm512_mask_storeu_ps(yr + j, tail_mask(n - j), fill);
            continue;
        }

        // Pass 2: y = exp(z − m), summed lane-wise.
        const __m512 vm = _mm512_set1_ps(m);
        __m512 vsum0 = _mm512_setzero_ps(), vsum1 = _mm512_setzero_ps();
        index_t j = 0;
        for (; j + 32 <= lim; j += 32) {  // two vectors per step: two exp chains in flight
            __m512 z0 = _mm512_mul_ps(vs, _mm512_loadu_ps(xr + j));
            __m512 z1 = _mm512_mul_ps(vs, _mm512_loadu_ps(xr + j + 16));
            if (mr) {
                z0 = _mm512_add_ps(z0, _mm512_loadu_ps(mr + j));
                z1 = _mm512_add_ps(z1, _mm512_loadu_ps(mr + j + 16));
            }
            const __m512 e0 = exp_avx512(_mm512_sub_ps(z0, vm));
            const __m512 e1 = exp_avx512(_mm512_sub_ps(z1, vm));
            _mm512_storeu_ps(yr + j, e0);
            _mm512_storeu_ps(yr + j + 16, e1);
            vsum0 = _mm512_add_ps(vsum0, e0);
            vsum1 = _mm512_add_ps(vsum1, e1);
        }
        for (; j < lim; j += 16) {
            const __mmask16 k = tail_mask(lim - j);
            __m512 z = _mm512_mul_ps(vs, _mm512_maskz_loadu_ps(k, xr + j));
            if (mr) z = _mm512_add_ps(z, _mm512_maskz_loadu_ps(k, mr + j));
            const __m512 e = _mm512_maskz_mov_ps(k, exp_avx512(_mm512_sub_ps(z, vm)));
            _mm512_mask_storeu_ps(yr + j, k, e);
            vsum0 = _mm512_add_ps(vsum0, e);
        }
        // Σ ≥ 1 (the maximum contributes e^0 = 1): no division by 0.
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_add_ps(vsum0, vsum1)));

        // Pass 3: normalise; keys beyond the causal limit are 0.
        for (j = 0; j + 16 <= lim; j += 16) _mm512_storeu_ps(yr + j, _mm512_mul_ps(_mm512_loadu_ps(yr + j), inv));
        if (j < lim) {
            const __mmask16 k = tail_mask(lim - j);
            _mm512_mask_storeu_ps(yr + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, yr + j), inv));
        }
        for (j = lim; j < n; ++j) yr[j] = 0.0f;
    }
}
#endif

// ---- AVX2 float rows ---------------------------------------------------------
#if NUMFORMER_X86_DISPATCH

// Lanes [0, left) of 8 (all when left ≥ 8), as a vmaskmovps mask.
NF_TARGET("avx2,fma")
NF_INLINE __m256i lanes_below(index_t left) {
    const int l = left >= 8 ? 8 : int(left);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(l), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// z = s·x (+ mask) for the 8 keys at j: all of them, or the lanes in k
// (absent lanes read as 0).
NF_TARGET("avx2,fma")
NF_INLINE __m256 logits8(const float* xr, const float* mr, index_t j, __m256 vs) {
    const __m256 z = _mm256_mul_ps(vs, _mm256_loadu_ps(xr + j));
    return mr ? _mm256_add_ps(z, _mm256_loadu_ps(mr + j)) : z;
}
NF_TARGET("avx2,fma")
NF_INLINE __m256 logits8(const float* xr, const float* mr, index_t j, __m256 vs, __m256i k) {
    const __m256 z = _mm256_mul_ps(vs, _mm256_maskload_ps(xr + j, k));
    return mr ? _mm256_add_ps(z, _mm256_maskload_ps(mr + j, k)) : z;
}

// The AVX-512 row loop (forward_avx512_f32) with 8-lane vectors and
// vmaskmovps tails. (The portable loop compiled for AVX2 made 4 passes with an
// auto-vectorised exp and ran at 2.9-3.1× torch.softmax; this is the same
// 3 passes as AVX-512, pass 2 with two exp chains in flight.)
NF_TARGET("avx2,fma")
void forward_avx2_f32(const float* x, float* y, index_t r0, index_t r1, index_t n, float s,
                      const SoftmaxMask<float>& mk) {
    const __m256 vs = _mm256_set1_ps(s);
    const float neg_inf = -std::numeric_limits<float>::infinity();
    const __m256 vneg_inf = _mm256_set1_ps(neg_inf);
    for (index_t r = r0; r < r1; ++r) {
        const float* xr = x + r * n;
        const float* mr = mask_row(mk, r, n);
        float* yr = y + r * n;
        const index_t lim = visible_keys(mk, r, n);

        // Pass 1: max of z over the visible keys, and whether any z is NaN.
        // (Whole vectors with plain loads, two chains; vmaskmovps only for the
        // tail: a masked load on every vector made long rows 30 % slower.)
        __m256 vmax0 = vneg_inf, vmax1 = vneg_inf, nan_seen = _mm256_setzero_ps();
        index_t j1 = 0;
        for (; j1 + 16 <= lim; j1 += 16) {
            const __m256 z0 = logits8(xr, mr, j1, vs), z1 = logits8(xr, mr, j1 + 8, vs);
            vmax0 = _mm256_max_ps(vmax0, z0);
            vmax1 = _mm256_max_ps(vmax1, z1);
            nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(z0, z1, _CMP_UNORD_Q));  // either is NaN
        }
        for (; j1 < lim; j1 += 8) {
            const __m256i k = lanes_below(lim - j1);
            const __m256 z = _mm256_blendv_ps(vneg_inf, logits8(xr, mr, j1, vs, k),
                                              _mm256_castsi256_ps(k));  // absent lanes: −inf
            vmax0 = _mm256_max_ps(vmax0, z);
            nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(z, z, _CMP_UNORD_Q));
        }
        const __m256 vmax = _mm256_max_ps(vmax0, vmax1);
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, vmax);
        float m = neg_inf;
        for (float v : lanes) m = v > m ? v : m;
        const bool has_nan = _mm256_movemask_ps(nan_seen) != 0;
        if (has_nan || m == std::numeric_limits<float>::infinity() || m == neg_inf) {
            // NaN / +inf anywhere: all NaN. Everything −inf (or no visible
            // key): all zeros — the row carries no probability mass.
            const float fill = m == neg_inf && !has_nan ? 0.0f : std::numeric_limits<float>::quiet_NaN();
            for (index_t j = 0; j < n; ++j) yr[j] = fill;
            continue;
        }

        // Pass 2: y = exp(z − m), summed lane-wise.
        const __m256 vm = _mm256_set1_ps(m);
        __m256 vsum0 = _mm256_setzero_ps(), vsum1 = _mm256_setzero_ps();
        index_t j = 0;
        for (; j + 16 <= lim; j += 16) {  // two vectors per step: two exp chains in flight
            const __m256 e0 = exp_avx2(_mm256_sub_ps(logits8(xr, mr, j, vs), vm));
            const __m256 e1 = exp_avx2(_mm256_sub_ps(logits8(xr, mr, j + 8, vs), vm));
            _mm256_storeu_ps(yr + j, e0);
            _mm256_storeu_ps(yr + j + 8, e1);
            vsum0 = _mm256_add_ps(vsum0, e0);
            vsum1 = _mm256_add_ps(vsum1, e1);
        }
        for (; j < lim; j += 8) {
            const __m256i k = lanes_below(lim - j);
            const __m256 e = _mm256_and_ps(exp_avx2(_mm256_sub_ps(logits8(xr, mr, j, vs, k), vm)),
                                           _mm256_castsi256_ps(k));
            _mm256_maskstore_ps(yr + j, k, e);
            vsum0 = _mm256_add_ps(vsum0, e);
        }
        alignas(32) float part[8];
        _mm256_store_ps(part, _mm256_add_ps(vsum0, vsum1));
        float sum = 0.0f;
        for (float v : part) sum += v;
        // Σ ≥ 1 (the maximum contributes e^0 = 1): no division by 0.
        const __m256 inv = _mm256_set1_ps(1.0f / sum);

        // Pass 3: normalise; keys beyond the causal limit are 0.
        for (j = 0; j + 8 <= lim; j += 8) _mm256_storeu_ps(yr + j, _mm256_mul_ps(_mm256_loadu_ps(yr + j), inv));
        if (j < lim) {
            const __m256i k = lanes_below(lim - j);
            _mm256_maskstore_ps(yr + j, k, _mm256_mul_ps(_mm256_maskload_ps(yr + j, k), inv));
        }
        for (j = lim; j < n; ++j) yr[j] = 0.0f;
    }
}
#endif

// ---- instruction-set variants ----------------------------------------------

template <typename T>
using ForwardFn = void (*)(const T*, T*, index_t, index_t, index_t, T, const SoftmaxMask<T>&);
template <typename T>
using BackwardFn = void (*)(const T*, const T*, T*, index_t, index_t, index_t, T);

template <typename T>
void forward_generic(const T* x, T* y, index_t r0, index_t r1, index_t n, T s,
                     const SoftmaxMask<T>& mk) {
    forward_rows(x, y, r0, r1, n, s, mk);
}
template <typename T>
void backward_generic(const T* dy, const T* y, T* dx, index_t r0, index_t r1, index_t n, T s) {
    backward_rows(dy, y, dx, r0, r1, n, s);
}
#if NUMFORMER_X86_DISPATCH
template <typename T>
NF_TARGET("avx2,fma")
void forward_avx2(const T* x, T* y, index_t r0, index_t r1, index_t n, T s,
                  const SoftmaxMask<T>& mk) {
    forward_rows(x, y, r0, r1, n, s, mk);
}
template <typename T>
NF_TARGET("avx2,fma")
void backward_avx2(const T* dy, const T* y, T* dx, index_t r0, index_t r1, index_t n, T s) {
    backward_rows(dy, y, dx, r0, r1, n, s);
}
template <typename T>
NF_TARGET("avx512f,avx2,fma")
void forward_avx512(const T* x, T* y, index_t r0, index_t r1, index_t n, T s,
                    const SoftmaxMask<T>& mk) {
    forward_rows(x, y, r0, r1, n, s, mk);
}
template <typename T>
NF_TARGET("avx512f,avx2,fma")
void backward_avx512(const T* dy, const T* y, T* dx, index_t r0, index_t r1, index_t n, T s) {
    backward_rows(dy, y, dx, r0, r1, n, s);
}
#endif

ForwardFn<float> forward_for(Isa isa, float /*tag*/) {
    return NF_PICK_ISA(isa, forward_generic<float>, forward_avx2_f32, forward_avx512_f32);
}

ForwardFn<double> forward_for(Isa isa, double /*tag*/) {
    return NF_PICK_ISA(isa, forward_generic<double>, forward_avx2<double>, forward_avx512<double>);
}

template <typename T>
BackwardFn<T> backward_for(Isa isa) {
    return NF_PICK_ISA(isa, backward_generic<T>, backward_avx2<T>, backward_avx512<T>);
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
void softmax_forward(const T* x, T* y, index_t rows, index_t n, T scale,
                     const SoftmaxMask<T>& mask) {
    if (rows <= 0 || n <= 0) return;
    const ForwardFn<T> fn = forward_for(active_isa(), T{});
    const int threads = threads_for(rows, n);
    const index_t chunk = (rows + threads - 1) / threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int t = 0; t < threads; ++t) {
        const index_t r0 = std::min<index_t>(rows, t * chunk);
        fn(x, y, r0, std::min<index_t>(rows, r0 + chunk), n, scale, mask);
    }
}

template <typename T>
void softmax_backward(const T* dy, const T* y, T* dx, index_t rows, index_t n, T scale) {
    if (rows <= 0 || n <= 0) return;
    const BackwardFn<T> fn = backward_for<T>(active_isa());
    const int threads = threads_for(rows, n);
    const index_t chunk = (rows + threads - 1) / threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int t = 0; t < threads; ++t) {
        const index_t r0 = std::min<index_t>(rows, t * chunk);
        fn(dy, y, dx, r0, std::min<index_t>(rows, r0 + chunk), n, scale);
    }
}

template void softmax_forward<float>(const float*, float*, index_t, index_t, float,
                                     const SoftmaxMask<float>&);
template void softmax_forward<double>(const double*, double*, index_t, index_t, double,
                                      const SoftmaxMask<double>&);
template void softmax_backward<float>(const float*, const float*, float*, index_t, index_t, float);
template void softmax_backward<double>(const double*, const double*, double*, index_t, index_t,
                                       double);

}  // namespace numformer::cpu
