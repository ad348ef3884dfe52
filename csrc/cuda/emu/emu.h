// emu.h — run CUDA kernel source on the CPU, for testing kernel *logic*.
//
// Our machines have nvcc but no GPU. The kernels in csrc/cuda/*.cu are
// written so that this header, included instead of the CUDA runtime when the
// compiler is not nvcc, turns them into ordinary C++ that runs a launch
// faithfully enough to check the arithmetic, the indexing, the tile edges and
// the synchronisation structure:
//
//  * every thread of a block is a real OS thread (std::thread), so threads
//    interleave as the scheduler likes and a missing barrier can show up as
//    a wrong answer; with set_schedule("forward"/"reverse") they instead run
//    one at a time in thread order, switching only at barriers, so a missing
//    barrier shows up deterministically (see emu.cpp, Turns);
//  * __syncthreads() is a barrier over the block's live threads;
//  * a warp is 32 consecutive threads (linear thread index / 32); warp
//    shuffles and votes are a barrier over the warp's live lanes plus an
//    exchange buffer, so every lane sees the value its partner had *at the
//    call*, as on the hardware;
//  * dynamic shared memory (NF_DYNAMIC_SHARED) is a fresh per-block buffer
//    filled with 0xFF bytes (NaN as float, −1 as int), so a read of shared
//    memory that no thread wrote shows up as NaN in the result;
//  * blocks run one after another; static `__shared__` variables are plain
//    statics (one copy, valid because one block runs at a time, but not
//    poisoned between blocks — the kernels use dynamic shared memory);
//  * launch configurations are checked against the CUDA limits (≤ 1024
//    threads per block, grid y/z ≤ 65535, ≤ 227 KiB shared memory).
//
// Misuse that would hang or be undefined on a GPU becomes an error of the
// launch (a C++ exception → Python RuntimeError): lanes of a warp making
// different numbers of warp-collective calls, threads of a block making
// different numbers of __syncthreads() calls, a partial-warp mask, a
// barrier that never completes (deadlock, after a timeout).
//
// What this cannot catch: timing, occupancy, bank conflicts, coalescing, the
// weak memory model beyond barrier/shuffle ordering (code that relies on
// implicit warp-synchronous execution may still happen to work), tensor-core
// or PTX-specific instructions, and device-specific float results (expf
// here is the host libm's, not the GPU's). See docs/kernels.md.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>

// ---- the CUDA vocabulary ----------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned x, y, z;
};
struct float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// Device math that host libm lacks or names differently.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

namespace nf_emu {

class Barrier;
struct Warp;
struct Block;

// Everything a thread of a launch knows about itself; set by the launcher.
struct ThreadCtx {
    uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
    dim3 block_dim, grid_dim;
    Block* block = nullptr;
    Warp* warp = nullptr;
    unsigned lane = 0;            // 0..31 within the warp
    unsigned linear = 0;          // thread index within the block
    std::uint64_t syncs = 0;      // __syncthreads() calls so far
    std::uint64_t collectives = 0;  // warp shuffles/votes/__syncwarp so far
};
inline thread_local ThreadCtx tls;

// Raise a launch error from inside a kernel thread (unwinds that thread).
[[noreturn]] void fail(const std::string& what);

void syncthreads();
void syncwarp(unsigned mask);
// Exchange one 8-byte value per lane: returns the value `src_lane` put in.
std::uint64_t exchange(unsigned mask, std::uint64_t mine, unsigned src_lane, const char* op);
// Ballot: bit i set when lane i's predicate is true.
unsigned ballot(unsigned mask, bool pred, const char* op);
void* dynamic_shared();
// How a block's threads are run: "threads" (default; all at once, the OS
// interleaves them), "forward" / "reverse" (one at a time in thread order,
// switching only at barriers: a missing barrier shows up deterministically).
// The default comes from NUMFORMER_EMU_SCHEDULE. Returns the previous one.
std::string set_schedule(const std::string& name);
int schedule();
std::mutex& atomic_mutex();

// Run `body` as a launch: grid × block threads, `smem` bytes of dynamic shared
// memory per block. Throws std::runtime_error on a bad configuration or any
// error raised inside the kernel.
void run_launch(const char* name, dim3 grid, dim3 block, std::size_t smem,
                const std::function<void()>& body);

template <typename T>
inline std::uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of an 8-byte-or-smaller value");
    std::uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T>
inline T from_bits(std::uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}

}  // namespace nf_emu

#define threadIdx (::nf_emu::tls.thread_idx)
#define blockIdx (::nf_emu::tls.block_idx)
#define blockDim (::nf_emu::tls.block_dim)
#define gridDim (::nf_emu::tls.grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { nf_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { nf_emu::syncwarp(mask); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    if (width != 32) nf_emu::fail("__shfl_sync: only width 32 is emulated");
    return nf_emu::from_bits<T>(nf_emu::exchange(mask, nf_emu::to_bits(v), unsigned(src) & 31u, "__shfl_sync"));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    if (width != 32) nf_emu::fail("__shfl_xor_sync: only width 32 is emulated");
    const unsigned src = (nf_emu::tls.lane ^ unsigned(lane_mask)) & 31u;
    return nf_emu::from_bits<T>(nf_emu::exchange(mask, nf_emu::to_bits(v), src, "__shfl_xor_sync"));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    if (width != 32) nf_emu::fail("__shfl_down_sync: only width 32 is emulated");
    // Lanes whose source would be past the warp keep their own value.
    const unsigned src = nf_emu::tls.lane + delta < 32 ? nf_emu::tls.lane + delta : nf_emu::tls.lane;
    return nf_emu::from_bits<T>(nf_emu::exchange(mask, nf_emu::to_bits(v), src, "__shfl_down_sync"));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    if (width != 32) nf_emu::fail("__shfl_up_sync: only width 32 is emulated");
    const unsigned src = nf_emu::tls.lane >= delta ? nf_emu::tls.lane - delta : nf_emu::tls.lane;
    return nf_emu::from_bits<T>(nf_emu::exchange(mask, nf_emu::to_bits(v), src, "__shfl_up_sync"));
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return nf_emu::ballot(mask, pred != 0, "__ballot_sync"); }
inline int __any_sync(unsigned mask, int pred) { return nf_emu::ballot(mask, pred != 0, "__any_sync") != 0; }
inline int __all_sync(unsigned mask, int pred) {
    return nf_emu::ballot(mask, pred != 0, "__all_sync") == mask;  // mask = the whole warp (checked)
}

// Atomics: one process-wide lock (correct, not fast).
template <typename T>
inline T atomicAdd(T* p, T v) {
    std::lock_guard<std::mutex> lock(nf_emu::atomic_mutex());
    const T old = *p;
    *p = old + v;
    return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
    std::lock_guard<std::mutex> lock(nf_emu::atomic_mutex());
    const T old = *p;
    *p = old < v ? v : old;
    return old;
}
