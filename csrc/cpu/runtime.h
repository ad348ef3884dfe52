// runtime.h — what the kernels need to know about the machine they run on:
// how many threads to use, which instruction set to run, how we were built.
//
// Threads: NUMFORMER_NUM_THREADS (a positive integer) if set, else OpenMP's
// default (OMP_NUM_THREADS, else every core we may run on). Without OpenMP
// the kernels run on one thread.
//
// Instruction set: the distributable build is compiled for baseline x86-64
// (or the compiler's default elsewhere); the hot loops are compiled a second
// and third time for AVX2+FMA and AVX-512 via function target attributes and
// the best one the CPU supports is chosen at run time. NUMFORMER_ISA
// (generic | avx2 | avx512) lowers the choice, e.g. to test a code path.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

// Mark a function to be compiled for an extra instruction set. Only GCC and
// Clang on x86 get multi-ISA code; everywhere else there is one generic path.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define NUMFORMER_X86_DISPATCH 1
#define NF_TARGET(isa) __attribute__((target(isa)))
#else
#define NUMFORMER_X86_DISPATCH 0
#define NF_TARGET(isa)
#endif

// Force inlining so that a template body is compiled with the instruction set
// of the NF_TARGET function that instantiates it (GCC/Clang compile inlined
// code with the caller's target; an out-of-line copy would be baseline only).
#if defined(__GNUC__) || defined(__clang__)
#define NF_INLINE inline __attribute__((always_inline))
#define NF_RESTRICT __restrict__
#else
#define NF_INLINE inline
#define NF_RESTRICT
#endif

namespace numformer::cpu {

using index_t = std::int64_t;

// ---- threads --------------------------------------------------------------
inline constexpr int kMaxThreads = 1024;  // more is refused or capped (OpenMP aborts on 2**31)
int num_threads();            // threads a kernel may use (>= 1)
void set_num_threads(int n);  // n >= 1; n is capped at kMaxThreads
bool have_openmp();
// A message if NUMFORMER_NUM_THREADS / NUMFORMER_ISA held something we could
// not use (the bindings turn it into a Python warning); empty otherwise.
std::string env_warnings();

// ---- instruction set ------------------------------------------------------
enum class Isa { generic = 0, avx2 = 1, avx512 = 2 };

// The copy of a kernel compiled for `isa`, given its generic, AVX2 and
// AVX-512 copies. A macro, not a function, so that a build without x86
// dispatch never names the AVX copies (they are not compiled there).
#if NUMFORMER_X86_DISPATCH
#define NF_PICK_ISA(isa, generic_fn, avx2_fn, avx512_fn) \
    ((isa) == Isa::avx512 ? (avx512_fn) : (isa) == Isa::avx2 ? (avx2_fn) : (generic_fn))
#else
// (both arms name the generic copy: the condition only marks `isa` as used,
// and a conditional gives the template-id a type where a comma would not)
#define NF_PICK_ISA(isa, generic_fn, avx2_fn, avx512_fn) ((isa) == Isa::generic ? (generic_fn) : (generic_fn))
#endif

const char* isa_name(Isa isa);
bool isa_from_name(const std::string& name, Isa* out);
std::vector<Isa> supported_isas();  // what this CPU (and build) can run
Isa active_isa();                    // what the kernels use now
bool set_active_isa(Isa isa);        // false if the CPU cannot run it

// ---- build ----------------------------------------------------------------
std::string build_info();

// ---- machine ceilings (for the benchmarks' roofline) ------------------------
// GFLOP/s of a loop of independent FMAs on the widest vectors of the active
// instruction set, run for about `seconds` on `threads` threads (2 flops per
// lane per FMA). This is the practical peak the GEMM is measured against.
double measure_fma_peak(double seconds, int threads);
// GB/s of copying `nbytes` from one buffer to another (bytes read + bytes
// written, i.e. 2·nbytes per copy), best of several copies, on `threads`
// threads each copying a contiguous share.
double measure_copy_bandwidth(std::int64_t nbytes, int threads);

}  // namespace numformer::cpu
