// runtime.cpp — thread count, instruction-set choice and the build string.
#include "cpu/runtime.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace numformer::cpu {
namespace {

// Parse a positive decimal integer; anything else (empty, "abc", "0", "4x")
// is rejected so that a typo does not silently mean "one thread".
bool parse_positive_int(const char* text, int* out) {
    if (text == nullptr || *text == '\0') return false;
    errno = 0;
    char* end = nullptr;
    const long value = std::strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < 1) return false;
    *out = static_cast<int>(std::min<long>(value, kMaxThreads));
    return true;
}

int default_threads() {
#if defined(_OPENMP)
    return std::max(1, omp_get_max_threads());
#else
    return 1;
#endif
}

bool cpu_has(Isa isa) {
    switch (isa) {
        case Isa::generic:
            return true;
#if NUMFORMER_X86_DISPATCH
        case Isa::avx2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case Isa::avx512:
            // libgcc/compiler-rt only report avx512f when the OS saves the
            // zmm state (XCR0), so this is safe to trust.
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#endif
        default:
            return false;
    }
}

Isa best_isa() {
    if (cpu_has(Isa::avx512)) return Isa::avx512;
    if (cpu_has(Isa::avx2)) return Isa::avx2;
    return Isa::generic;
}

// Settings are read from the environment once, on first use.
struct Settings {
    std::atomic<int> threads{1};
    std::atomic<int> isa{0};
    std::string warnings;

    Settings() {
        int n = default_threads();
        const char* env_threads = std::getenv("NUMFORMER_NUM_THREADS");
        if (env_threads != nullptr && *env_threads != '\0') {
            int parsed = 0;
            if (parse_positive_int(env_threads, &parsed)) {
                n = parsed;
            } else {
                warnings += std::string("ignoring NUMFORMER_NUM_THREADS='") + env_threads +
                            "': expected a positive integer; using " + std::to_string(n) +
                            " threads. ";
            }
        }
        threads.store(n);

        Isa isa_choice = best_isa();
        const char* env_isa = std::getenv("NUMFORMER_ISA");
        if (env_isa != nullptr && *env_isa != '\0') {
            Isa wanted;
            if (!isa_from_name(env_isa, &wanted)) {
                warnings += std::string("ignoring NUMFORMER_ISA='") + env_isa +
                            "': expected generic, avx2 or avx512. ";
            } else if (!cpu_has(wanted)) {
                warnings += std::string("ignoring NUMFORMER_ISA='") + env_isa +
                            "': this CPU (or build) cannot run it. ";
            } else {
                isa_choice = wanted;
            }
        }
        isa.store(static_cast<int>(isa_choice));
    }
};

Settings& settings() {
    static Settings s;  // thread-safe initialisation (C++11 magic statics)
    return s;
}

}  // namespace

int num_threads() { return settings().threads.load(std::memory_order_relaxed); }

void set_num_threads(int n) {
    settings().threads.store(std::clamp(n, 1, kMaxThreads), std::memory_order_relaxed);
}

bool have_openmp() {
#if defined(_OPENMP)
    return true;
#else
    return false;
#endif
}

std::string env_warnings() { return settings().warnings; }

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::avx2: return "avx2";
        case Isa::avx512: return "avx512";
        default: return "generic";
    }
}

bool isa_from_name(const std::string& name, Isa* out) {
    for (Isa isa : {Isa::generic, Isa::avx2, Isa::avx512}) {
        if (name == isa_name(isa)) {
            *out = isa;
            return true;
        }
    }
    return false;
}

std::vector<Isa> supported_isas() {
    std::vector<Isa> isas;
    for (Isa isa : {Isa::generic, Isa::avx2, Isa::avx512})
        if (cpu_has(isa)) isas.push_back(isa);
    return isas;
}

Isa active_isa() { return static_cast<Isa>(settings().isa.load(std::memory_order_relaxed)); }

bool set_active_isa(Isa isa) {
    if (!cpu_has(isa)) return false;
    settings().isa.store(static_cast<int>(isa), std::memory_order_relaxed);
    return true;
}

std::string build_info() {
    std::ostringstream s;
    s << "compiler: ";
#if defined(__clang__)
    s << "Clang " << __clang_major__ << "." << __clang_minor__ << "." << __clang_patchlevel__;
#elif defined(__GNUC__)
    s << "GCC " << __GNUC__ << "." << __GNUC_MINOR__ << "." << __GNUC_PATCHLEVEL__;
#elif defined(_MSC_VER)
    s << "MSVC " << _MSC_VER;
#else
    s << "unknown";
#endif
    s << "; C++ " << __cplusplus;
#if defined(_OPENMP)
    s << "; OpenMP: yes (" << _OPENMP << ")";
#else
    s << "; OpenMP: no (single-threaded)";
#endif
    s << "; SIMD: ";
#if NUMFORMER_X86_DISPATCH
    s << "runtime dispatch over avx512 / avx2+fma / generic";
#else
    s << "generic (compiler auto-vectorisation)";
#endif
    s << ", supported here:";
    for (Isa isa : supported_isas()) s << " " << isa_name(isa);
    s << ", active: " << isa_name(active_isa());
#if defined(NUMFORMER_BUILD_NATIVE) && NUMFORMER_BUILD_NATIVE
    s << "; -march=native: yes (not portable)";
#else
    s << "; -march=native: no";
#endif
#if defined(NUMFORMER_BUILD_SANITIZE) && NUMFORMER_BUILD_SANITIZE
    s << "; sanitizers: address,undefined";
#endif
    s << "; threads: " << num_threads();
    return s.str();
}

// ---------------------------------------------------------------------------
// Machine ceilings
// ---------------------------------------------------------------------------
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

// kChains independent accumulators, each updated acc = acc·x + y (one FMA
// with -ffp-contract=fast on FMA targets). An FMA has latency 4 and up to two
// issue per cycle, so at least 8 chains are needed to keep the units busy; 12
// leaves headroom and still fits the 16 registers of AVX2. x < 1 and y > 0
// make every chain converge to y/(1−x): no overflow, no subnormals.
template <typename F, int VB>
NF_INLINE F fma_chains(std::int64_t iters) {
#if defined(__GNUC__) || defined(__clang__)
    // (F is a template parameter so that the vector attribute is applied at
    // instantiation, when VB is known.)
    typedef F V __attribute__((vector_size(VB)));
    constexpr int kChains = 12;
    V acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = V{} + 0.001f * float(i);
    const V x = V{} + 0.9999f, y = V{} + 1e-4f;
    for (std::int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
        for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * x + y;
        // (Without -ffast-math the compiler may not reassociate the
        // recurrence, and the result is used, so the loop stays as written.)
    }
    float sum = 0.0f;
    for (int i = 0; i < kChains; ++i)
        for (int l = 0; l < VB / 4; ++l) sum += acc[i][l];
    return sum;
#else
    float acc = 0.0f;
    for (std::int64_t it = 0; it < iters * 12 * (VB / 4); ++it) acc = acc * 0.9999f + 1e-4f;
    return acc;
#endif
}

template <int VB>
double fma_flops_per_iter() {
    return 2.0 * 12 * (VB / 4);
}

using ChainFn = float (*)(std::int64_t);
float chains_generic(std::int64_t n) { return fma_chains<float, 16>(n); }
#if NUMFORMER_X86_DISPATCH
NF_TARGET("avx2,fma") float chains_avx2(std::int64_t n) { return fma_chains<float, 32>(n); }
NF_TARGET("avx512f,avx2,fma") float chains_avx512(std::int64_t n) { return fma_chains<float, 64>(n); }
#endif

std::atomic<float> g_sink{0.0f};  // results land here so the loops are not dead code

}  // namespace

double measure_fma_peak(double seconds, int threads) {
    ChainFn fn = chains_generic;
    double per_iter = fma_flops_per_iter<16>();
#if NUMFORMER_X86_DISPATCH
    if (active_isa() == Isa::avx512) {
        fn = chains_avx512;
        per_iter = fma_flops_per_iter<64>();
    } else if (active_isa() == Isa::avx2) {
        fn = chains_avx2;
        per_iter = fma_flops_per_iter<32>();
    }
#endif
    threads = std::max(1, threads);
    seconds = std::max(1e-3, seconds);
    double total_flops = 0.0, longest = 0.0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(+ : total_flops) \
    reduction(max : longest)
    {
        fn(1 << 14);  // warm up (wakes the vector units to full clock)
        const std::int64_t chunk = 1 << 16;
        std::int64_t done = 0;
        const Clock::time_point t0 = Clock::now();
        double elapsed = 0.0;
        float sink = 0.0f;
        do {
            sink += fn(chunk);
            done += chunk;
            elapsed = seconds_since(t0);
        } while (elapsed < seconds);
        g_sink.store(sink, std::memory_order_relaxed);
        total_flops += double(done) * per_iter;
        longest = elapsed;
    }
    return total_flops / longest / 1e9;
}

double measure_copy_bandwidth(std::int64_t nbytes, int threads) {
    threads = std::max(1, threads);
    nbytes = std::max<std::int64_t>(nbytes, 1 << 20) & ~std::int64_t(63);
    char* src = static_cast<char*>(::operator new(size_t(nbytes), std::align_val_t{64}));
    char* dst = static_cast<char*>(::operator new(size_t(nbytes), std::align_val_t{64}));
    double best = 1e300;
    // Each thread copies the same contiguous share every time (first touch
    // in the fill places its pages near it on NUMA machines).
    const int reps = 6;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#if defined(_OPENMP)
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int tid = 0, nt = 1;
#endif
        const std::int64_t lo = (nbytes / 64 * tid / nt) * 64, hi = (nbytes / 64 * (tid + 1) / nt) * 64;
        std::memset(src + lo, 1, size_t(hi - lo));
        std::memset(dst + lo, 0, size_t(hi - lo));
        for (int r = 0; r < reps; ++r) {
#pragma omp barrier
            Clock::time_point t0;
#pragma omp master
            t0 = Clock::now();
            std::memcpy(dst + lo, src + lo, size_t(hi - lo));
#pragma omp barrier
#pragma omp master
            best = std::min(best, seconds_since(t0));
        }
    }
    ::operator delete(src, std::align_val_t{64});
    ::operator delete(dst, std::align_val_t{64});
    return 2.0 * double(nbytes) / best / 1e9;
}

}  // namespace numformer::cpu
