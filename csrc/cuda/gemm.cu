// gemm.cu — float32 GEMM, C = op(A)·op(B) (+ bias) (+ C), shared-memory tiles
// and 8×8 register blocking.
//
// A block of 256 threads computes a 128×128 tile of C. The K dimension is
// walked in slices of BK = 8:
//
//   for each k-slice:                    (two shared buffers, one barrier per slice)
//     stage the *next* A slice (128×8) and B slice (8×128) in registers
//     every thread: 8 k-steps of an 8×8 outer product from shared memory
//     store the staged slices into the other shared buffer; __syncthreads
//
// Per k-step a thread reads 8 values of op(A) and 8 of op(B) from shared
// memory (four float4 loads) and does 64 FMAs: 4 FMAs per shared load, which
// is what lets a scalar-FP32 kernel approach the FMA peak (one value per FMA
// would be bound by shared-memory bandwidth). The 64 accumulators live in
// registers for the whole K loop.
//
// Thread (tx, ty) of the 16×16 grid owns rows {4ty..4ty+3, 64+4ty..64+4ty+3}
// and columns {4tx..4tx+3, 64+4tx..64+4tx+3} of the tile: two 4-wide groups
// 64 apart rather than 8 consecutive, so that the float4 reads of B by the
// 16 threads of a half-warp are 16 consecutive 16-byte words (conflict-free),
// where 8-wide groups would put them 32 bytes apart (2-way conflicts); the
// reads of A are broadcasts (two distinct ty per warp).
//
// Shared layout: As[k][m] holds op(A) *transposed* (k-major) and Bs[k][n]
// op(B), so in both the 8 values a thread needs at step k are contiguous.
// The three forms the backward needs are the four (trans_a, trans_b)
// template instances; only the loads differ:
//
//   op(A)=A  (A is M×K, contiguous along k): a thread loads 4 k-values of one
//            row (one float4) and scatters them into 4 rows of As;
//   op(A)=Aᵀ (A is K×M, contiguous along m): 4 m-values of one k-row go to
//            one row of As directly;
//   op(B)=B  (B is K×N, contiguous along n): 4 n-values → one row of Bs;
//   op(B)=Bᵀ (B is N×K, contiguous along k): 4 k-values → 4 rows of Bs.
//
// Loads are float4 when the operand's row stride and base are 16-byte
// aligned; otherwise, and at the edges of the matrices, element by element
// with a bounds check (out-of-range elements are 0, which adds nothing).
// The stores of C are bounds-checked, so any M, N, K ≥ 0 works.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace numformer::cuda {

namespace {

constexpr int BM = 128, BN = 128, BK = 8;
constexpr int kGemmThreads = 256;
constexpr int AS_STRIDE = BM + 4;  // +4 floats: the transposing stores of A no longer 2-way conflict
constexpr int BS_STRIDE = BN + 4;

// Read 4 consecutive floats p[0..3] of a row whose valid length from p is
// `avail` (< 4 at the edge); `vec`: p is 16-byte aligned.
__device__ __forceinline__ float4 load4(const float* p, int avail, bool vec) {
    if (vec && avail >= 4) return *reinterpret_cast<const float4*>(p);
    float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
    if (avail > 0) r.x = p[0];
    if (avail > 1) r.y = p[1];
    if (avail > 2) r.z = p[2];
    if (avail > 3) r.w = p[3];
    return r;
}

template <bool TRANS_A, bool TRANS_B>
__global__ void __launch_bounds__(kGemmThreads, 2)  // ≤ 128 registers: two blocks per SM
gemm_kernel(GemmArgs g, bool vec_a, bool vec_b, bool vec_c) {
    NF_DYNAMIC_SHARED(float, smem);
    float* As = smem;                          // [2][BK][AS_STRIDE]
    float* Bs = smem + 2 * BK * AS_STRIDE;     // [2][BK][BS_STRIDE]

    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int M = g.m, N = g.n, K = g.k;
    const float* A = g.a + index_t(blockIdx.z) * g.stride_a;
    const float* B = g.b + index_t(blockIdx.z) * g.stride_b;
    float* C = g.c + index_t(blockIdx.z) * g.stride_c;
    const index_t lda = TRANS_A ? M : K;  // row strides of A and B as stored
    const index_t ldb = TRANS_B ? K : N;

    // Which 4 elements this thread stages per slice (256 threads × 4 = 1024 = 128×8).
    //  contiguous along k (A, or Bᵀ): row = tid / 2 of the tile, k = 4·(tid % 2)
    //  contiguous along m or n (Aᵀ, or B): k = tid / 32, column = 4·(tid % 32)
    const int a_row = TRANS_A ? tid / 32 : tid / 2;
    const int a_col = TRANS_A ? 4 * (tid % 32) : 4 * (tid % 2);
    const int b_row = TRANS_B ? tid / 2 : tid / 32;
    const int b_col = TRANS_B ? 4 * (tid % 2) : 4 * (tid % 32);

    // Global loads of slice k0 into registers.
    auto load_a = [&](int k0) -> float4 {
        if (!TRANS_A) {  // A[m][k], m = m0 + a_row, k = k0 + a_col
            const int m = m0 + a_row, k = k0 + a_col;
            return m < M ? load4(A + index_t(m) * lda + k, K - k, vec_a) : make_float4(0.f, 0.f, 0.f, 0.f);
        } else {         // A[k][m], k = k0 + a_row, m = m0 + a_col
            const int k = k0 + a_row, m = m0 + a_col;
            return k < K ? load4(A + index_t(k) * lda + m, M - m, vec_a) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    auto load_b = [&](int k0) -> float4 {
        if (!TRANS_B) {  // B[k][n]
            const int k = k0 + b_row, n = n0 + b_col;
            return k < K ? load4(B + index_t(k) * ldb + n, N - n, vec_b) : make_float4(0.f, 0.f, 0.f, 0.f);
        } else {         // B[n][k]
            const int n = n0 + b_row, k = k0 + b_col;
            return n < N ? load4(B + index_t(n) * ldb + k, K - k, vec_b) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    // Registers → shared buffer `buf`, always as [k][m] / [k][n].
    auto store_a = [&](int buf, float4 v) {
        float* as = As + buf * BK * AS_STRIDE;
        if (!TRANS_A) {  // 4 k-values of row a_row
            as[(a_col + 0) * AS_STRIDE + a_row] = v.x;
            as[(a_col + 1) * AS_STRIDE + a_row] = v.y;
            as[(a_col + 2) * AS_STRIDE + a_row] = v.z;
            as[(a_col + 3) * AS_STRIDE + a_row] = v.w;
        } else {
            *reinterpret_cast<float4*>(as + a_row * AS_STRIDE + a_col) = v;
        }
    };
    auto store_b = [&](int buf, float4 v) {
        float* bs = Bs + buf * BK * BS_STRIDE;
        if (!TRANS_B) {
            *reinterpret_cast<float4*>(bs + b_row * BS_STRIDE + b_col) = v;
        } else {         // 4 k-values of column b_row
            bs[(b_col + 0) * BS_STRIDE + b_row] = v.x;
            bs[(b_col + 1) * BS_STRIDE + b_row] = v.y;
            bs[(b_col + 2) * BS_STRIDE + b_row] = v.z;
            bs[(b_col + 3) * BS_STRIDE + b_row] = v.w;
        }
    };

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    const int slices = ceil_div(K, BK);
    if (slices > 0) {
        store_a(0, load_a(0));
        store_b(0, load_b(0));
    }
    __syncthreads();

    for (int s = 0; s < slices; ++s) {
        const int cur = s % 2;
        const bool more = s + 1 < slices;
        // Issue the next slice's global loads now; they complete while we compute.
        float4 next_a = make_float4(0.f, 0.f, 0.f, 0.f), next_b = next_a;
        if (more) {
            next_a = load_a((s + 1) * BK);
            next_b = load_b((s + 1) * BK);
        }
        const float* as = As + cur * BK * AS_STRIDE;
        const float* bs = Bs + cur * BK * BS_STRIDE;
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            // This thread's 8 values of op(A)[·][k] and op(B)[k][·] (rows/columns
            // 4t..4t+3 and 64+4t..64+4t+3).
            const float4 a_lo = *reinterpret_cast<const float4*>(as + kk * AS_STRIDE + 4 * ty);
            const float4 a_hi = *reinterpret_cast<const float4*>(as + kk * AS_STRIDE + 64 + 4 * ty);
            const float4 b_lo = *reinterpret_cast<const float4*>(bs + kk * BS_STRIDE + 4 * tx);
            const float4 b_hi = *reinterpret_cast<const float4*>(bs + kk * BS_STRIDE + 64 + 4 * tx);
            const float a[8] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
            const float b[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];  // C[i][j] += op(A)[i][k]·op(B)[k][j]
        }
        // The other buffer was last read in slice s − 1, which every thread
        // finished before the barrier that ended it: safe to overwrite.
        if (more) {
            store_a(cur ^ 1, next_a);
            store_b(cur ^ 1, next_b);
        }
        __syncthreads();
    }

    // Epilogue: C = acc (+ bias) (+ old C), only inside the matrix. Each of
    // the thread's two 4-column groups is one float4 store (and load of bias
    // / old C) when it lies inside the matrix and C is 16-byte aligned.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int m = m0 + (i < 4 ? 4 * ty + i : 64 + 4 * ty + (i - 4));
        if (m >= M) continue;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int n = n0 + 64 * half + 4 * tx;  // first of this group's 4 columns
            float* c = C + index_t(m) * N + n;
            const float* a = &acc[i][4 * half];
            if (vec_c && n + 3 < N) {
                float4 v = make_float4(a[0], a[1], a[2], a[3]);
                if (g.bias) {
                    const float4 b = *reinterpret_cast<const float4*>(g.bias + n);
                    v.x += b.x, v.y += b.y, v.z += b.z, v.w += b.w;
                }
                if (g.accumulate) {
                    const float4 o = *reinterpret_cast<const float4*>(c);
                    v.x += o.x, v.y += o.y, v.z += o.z, v.w += o.w;
                }
                *reinterpret_cast<float4*>(c) = v;
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    if (n + j >= N) break;
                    float v = a[j];
                    if (g.bias) v += g.bias[n + j];
                    if (g.accumulate) v += c[j];
                    c[j] = v;
                }
            }
        }
    }
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

}  // namespace

void gemm(const GemmArgs& g) {
    if (g.m <= 0 || g.n <= 0 || g.batch <= 0) return;
    if (g.batch > 65535) throw CudaError("gemm: batch > 65535");
    if (ceil_div(g.m, BM) > 65535) throw CudaError("gemm: M too large for one launch");
    // float4 loads need every row start (and every batch start) 16-byte aligned.
    const index_t lda = g.trans_a ? g.m : g.k, ldb = g.trans_b ? g.k : g.n;
    const bool vec_a = aligned16(g.a) && lda % 4 == 0 && g.stride_a % 4 == 0;
    const bool vec_b = aligned16(g.b) && ldb % 4 == 0 && g.stride_b % 4 == 0;
    const bool vec_c = aligned16(g.c) && g.n % 4 == 0 && g.stride_c % 4 == 0 && (!g.bias || aligned16(g.bias));
    const dim3 grid(unsigned(ceil_div(g.n, BN)), unsigned(ceil_div(g.m, BM)), unsigned(g.batch));
    const std::size_t smem = sizeof(float) * 2 * BK * (AS_STRIDE + BS_STRIDE);
    if (!g.trans_a && !g.trans_b)
        launch("gemm", gemm_kernel<false, false>, grid, dim3(kGemmThreads), smem, nullptr, g, vec_a, vec_b, vec_c);
    else if (!g.trans_a && g.trans_b)
        launch("gemm", gemm_kernel<false, true>, grid, dim3(kGemmThreads), smem, nullptr, g, vec_a, vec_b, vec_c);
    else if (g.trans_a && !g.trans_b)
        launch("gemm", gemm_kernel<true, false>, grid, dim3(kGemmThreads), smem, nullptr, g, vec_a, vec_b, vec_c);
    else
        launch("gemm", gemm_kernel<true, true>, grid, dim3(kGemmThreads), smem, nullptr, g, vec_a, vec_b, vec_c);
}

}  // namespace numformer::cuda
