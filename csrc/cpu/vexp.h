// vexp.h — an exp() that compilers can vectorise, for softmax.
//
// std::exp is an opaque library call, so a loop around it stays scalar. This
// version is plain arithmetic and bit operations, which the auto-vectoriser
// turns into SIMD code on every instruction set.
//
// Method (x ≤ 0 in softmax, since we exponentiate x − max):
//   n = round(x / ln 2)            so  x = n·ln 2 + r,  |r| ≤ ln2 / 2
//   e^x = 2^n · e^r
//   e^r  ≈ Σ_{i=0..D} r^i / i!     Taylor, Horner form; the truncation error
//                                  |r|^(D+1)/(D+1)! is 5e-9 for D=7 (float)
//                                  and 4e-18 for D=13 (double): below 1 ulp
//   2^n  built directly in the exponent bits.
// r = x − n·ln2 uses ln 2 split in a high part (few mantissa bits, so n·hi is
// exact) and a low part (Cody–Waite), which keeps r accurate to ~1 ulp.
// Rounding to an integer uses the "add 1.5·2^p" trick: after kd = z + 1.5·2^p
// the low mantissa bits of kd hold n, so no float→int conversion (which does
// not vectorise for double before AVX-512) is needed.
//
// Domain and special values (all branch-free selects):
//   x < lowest_normal_arg (incl. −inf)  → 0  (results that would be subnormal
//                                             are flushed to 0; < 1.2e-38 in
//                                             float, 2.2e-308 in double)
//   x > max_arg                         → e^max_arg (softmax never passes x > 0)
//   NaN                                 → NaN
// Never compile this with -ffast-math: it would fold (z + shift) − shift to z.
// Accuracy: within ~2 ulp of the correctly rounded e^x on [lowest, max_arg].
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/runtime.h"

#if NUMFORMER_X86_DISPATCH
#include <immintrin.h>
#endif

namespace numformer::cpu {

template <typename T>
struct ExpTraits;

template <>
struct ExpTraits<float> {
    using Bits = std::uint32_t;
    static constexpr int kMantissaBits = 23;
    static constexpr float kLog2e = 1.44269504088896341f;
    static constexpr float kLn2Hi = 0.693145751953125f;      // 0x3f317200: 15 significant bits
    static constexpr float kLn2Lo = 1.428606765330187e-06f;  // ln 2 − kLn2Hi
    static constexpr float kShift = 12582912.0f;             // 1.5·2^23
    static constexpr float kLowest = -87.33f;                // e^x < FLT_MIN below this
    static constexpr float kMaxArg = 88.0f;                  // 2^127 is the largest 2^n
    static constexpr int kDegree = 7;
};

template <>
struct ExpTraits<double> {
    using Bits = std::uint64_t;
    static constexpr int kMantissaBits = 52;
    static constexpr double kLog2e = 1.4426950408889634074;
    static constexpr double kLn2Hi = 6.93147180369123816490e-01;  // 0x3fe62e42fee00000
    static constexpr double kLn2Lo = 1.90821492927058770002e-10;  // ln 2 − kLn2Hi
    static constexpr double kShift = 6755399441055744.0;          // 1.5·2^52
    static constexpr double kLowest = -708.39;                    // e^x < DBL_MIN below this
    static constexpr double kMaxArg = 709.0;                      // 2^1023 is the largest 2^n
    static constexpr int kDegree = 13;
};

// 1/0!, 1/1!, …, 1/D! evaluated at compile time (each rounded once).
template <typename T, int D>
struct InvFactorials {
    T value[D + 1];
    constexpr InvFactorials() : value() {
        T factorial = T(1);
        for (int i = 0; i <= D; ++i) {
            if (i > 1) factorial *= T(i);
            value[i] = T(1) / factorial;
        }
    }
};

template <typename T>
NF_INLINE T vexp(T x) {
    using Tr = ExpTraits<T>;
    using Bits = typename Tr::Bits;

    const T xc = x > Tr::kMaxArg ? Tr::kMaxArg : x;  // NaN compares false: stays NaN
    const T kd = xc * Tr::kLog2e + Tr::kShift;        // low bits of kd = n
    const T n = kd - Tr::kShift;                      // n as a floating-point integer
    const T r = (xc - n * Tr::kLn2Hi) - n * Tr::kLn2Lo;

    // e^r by Horner: ((c_D·r + c_{D-1})·r + …)·r + c_0 with c_i = 1/i!,
    // one multiply-add per step.
    constexpr InvFactorials<T, Tr::kDegree> c{};
    T p = c.value[Tr::kDegree];
#pragma GCC unroll 16
    for (int i = Tr::kDegree - 1; i >= 0; --i) p = p * r + c.value[i];

    // 2^n: n sits in the low bits of kd; shifting it into the exponent field
    // and adding the bits of 1.0 (the exponent bias) gives the bits of 2^n.
    Bits kbits, one_bits;
    std::memcpy(&kbits, &kd, sizeof(T));
    const T one = T(1);
    std::memcpy(&one_bits, &one, sizeof(T));
    const Bits scale_bits = (kbits << Tr::kMantissaBits) + one_bits;
    T scale;
    std::memcpy(&scale, &scale_bits, sizeof(T));

    // Computed unconditionally, then selected: a multiply under a condition
    // would keep the loop from being vectorised (without AVX-512 masks).
    const T e = p * scale;
    return x < Tr::kLowest ? T(0) : e;
}

#if NUMFORMER_X86_DISPATCH
// e^x for x ≤ 0 (or −inf), 8 float lanes, written with intrinsics for the
// AVX2 loops that need exp inside other work (softmax rows, the attention
// tile): the method of vexp, with vroundps for n and 2^n built in the
// exponent bits: for n ∈ [−126, 127], (n + 127) << 23 are the bits of 2^n.
// Below kLowest (n < −126, −inf included) those bits are meaningless, and
// the compare masks the lane to 0 — the flush of vexp. The compare is
// "x < kLowest", false for NaN, so NaN stays NaN as in vexp. (No clamp at
// kMaxArg: callers pass x ≤ 0.)
NF_TARGET("avx2,fma")
NF_INLINE __m256 exp_avx2(__m256 x) {
    using Tr = ExpTraits<float>;
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(Tr::kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(Tr::kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(Tr::kLn2Lo), r);
    constexpr InvFactorials<float, Tr::kDegree> c{};
    __m256 p = _mm256_set1_ps(c.value[Tr::kDegree]);
#pragma GCC unroll 8
    for (int i = Tr::kDegree - 1; i >= 0; --i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c.value[i]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(Tr::kLowest), _CMP_LT_OQ), e);
}
#endif

}  // namespace numformer::cpu
