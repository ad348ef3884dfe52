// runtime.cpp — thread count, instruction-set choice and the build string.
#include "cpu/runtime.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <sstream>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace numformer::cpu {
namespace {

constexpr int kMaxThreads = 1024;

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

}  // namespace numformer::cpu
