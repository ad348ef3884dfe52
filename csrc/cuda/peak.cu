// peak.cu — a kernel that does nothing but FMAs: the compute ceiling the
// benchmark compares the GEMM (and attention) against.
//
// Each thread keeps 8 independent accumulator chains (enough to cover the
// FMA latency) and runs `iters` rounds of 8 FMAs on them; the results are
// summed into out[] so the compiler cannot drop the loop. FLOPs counted:
// 2 per FMA, blocks · threads · iters · 8 FMAs.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace numformer::cuda {

namespace {

constexpr int kPeakThreads = 256;

__global__ void __launch_bounds__(kPeakThreads) fma_loop_kernel(float* out, int iters, float a, float b) {
    float acc[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[c] = float(threadIdx.x + c);
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[c] = acc[c] * a + b;  // one FMA per chain
    }
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < 8; ++c) s += acc[c];
    out[index_t(blockIdx.x) * blockDim.x + threadIdx.x] = s;
}

}  // namespace

double fma_loop(float* out, int blocks, int iters) {
    if (blocks <= 0 || iters <= 0) return 0.0;
    // a·x + b with a slightly below 1 keeps the values bounded (no inf/NaN slowdowns).
    launch("fma_loop", fma_loop_kernel, dim3(unsigned(blocks)), dim3(kPeakThreads), 0, nullptr, out, iters,
           0.999999f, 1e-6f);
    return 2.0 * 8.0 * double(blocks) * kPeakThreads * double(iters);
}

}  // namespace numformer::cuda
