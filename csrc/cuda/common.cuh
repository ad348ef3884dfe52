// common.cuh — what every CUDA kernel file includes.
//
// The kernel sources are compiled twice:
//  * by nvcc (files csrc/cuda/*.cu → numformer._cuda), where this header
//    pulls in the CUDA runtime and `launch` is a real <<<grid, block>>> launch
//    followed by cudaGetLastError();
//  * by the host C++ compiler for the CPU emulator (csrc/cuda/emu/ →
//    numformer._cuda_emu), where emu/emu.h supplies __global__, threadIdx,
//    __syncthreads, warp shuffles, … and `launch` runs every thread of every
//    block on the CPU.
// Kernels therefore stick to what emu.h models: full-warp collectives,
// __syncthreads, dynamic shared memory through NF_DYNAMIC_SHARED, atomicAdd.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define NF_EMULATED 0
// `extern __shared__` memory sized by the launch; 16-byte aligned so float4
// accesses into it are legal.
#define NF_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) unsigned char nf_smem_raw_[]; \
    type* name = reinterpret_cast<type*>(nf_smem_raw_)
#else
#include "cuda/emu/emu.h"
#define NF_EMULATED 1
#define NF_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::nf_emu::dynamic_shared())
#endif

namespace numformer::cuda {

using index_t = std::int64_t;

// Every failed CUDA call and every failed launch becomes this exception; the
// bindings turn it into a Python RuntimeError.
struct CudaError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ inline int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ inline int imax(int a, int b) { return a > b ? a : b; }

// Warp-wide sum / max by a butterfly: after log2(32) = 5 xor-shuffles every
// lane holds the result (no broadcast needed afterwards).
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    // fmaxf would drop a NaN; this keeps the larger (and never NaN from −inf).
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float o = __shfl_xor_sync(kFullMask, v, offset);
        v = o > v ? o : v;
    }
    return v;
}

#if defined(__CUDACC__)
inline void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        throw CudaError(std::string(what) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
    }
}

// Launch `kernel` and turn a launch failure (bad configuration, no device,
// too much shared memory, …) into a CudaError. Errors that happen while the
// kernel runs surface at the next synchronising call (the bindings' copy-out).
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem,
            cudaStream_t stream, Args... args) {
    if (smem > 48 * 1024) {
        // Beyond 48 KiB a kernel must opt in to the larger dynamic shared memory.
        check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), name);
    }
    kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
    check(cudaGetLastError(), name);
}
#else
using cudaStream_t = void*;
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem,
            cudaStream_t /*stream*/, Args... args) {
    nf_emu::run_launch(name, grid, block, smem, [&] { kernel(static_cast<Params>(args)...); });
}
#endif

}  // namespace numformer::cuda
