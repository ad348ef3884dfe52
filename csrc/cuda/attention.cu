// attention.cu — FlashAttention-2-style forward and backward, float32.
//
// For one (batch b, head h), Q: (Tq, D), K, V: (Tk, D), s = scale:
//
//   S = s·Q Kᵀ + M        M_ij = 0 where query i may see key j, else −inf
//   P = softmax_rows(S),  L_i = log Σ_j exp(S_ij)     (saved: the "lse")
//   O = P V
//
// Visibility: j < Tk; causal: j ≤ i + Tk − Tq; key padding: key_mask[b, j] ≠ 0.
// A query that sees no key gets O_i = 0, L_i = −inf, and zero gradients.
//
// Non-finite inputs follow the NumPy reference (docs/kernels.md): over the
// visible keys it is IEEE arithmetic (a NaN or +inf score makes the row's
// l, and so O_i and L_i, NaN; a row that sees keys whose scores are all −inf
// gets 0/0 = NaN, not the zeros of a row that sees none), and a hidden key
// does not exist for the query: P and dS are selected to 0 there, and where
// a tile holds hidden pairs (the diagonal tile, padded keys) and the rows
// that the P·V, P·dO, dS·Q or dS·K products sum over are not all finite
// (checked per tile, one warp OR-reduction; 0·inf and 0·NaN are NaN), the
// product takes a loop that skips the hidden pairs.
//
// Forward (one block of 4 warps per tile of BR = 32 queries; each warp owns 8
// query rows). The block walks key tiles of BC = 32 keys; for each it stages
// K (transposed) and V in shared memory and, per query row, lane j scores key
// j of the tile:
//
//   s_j   = (s·q_i) · k_j                      (D FMAs per lane)
//   m'    = max(m, max_j s_j)                  (warp butterfly)
//   p_j   = exp(s_j − m'),  α = exp(m − m')
//   l     = α·l + Σ_j p_j                      (warp butterfly)
//   o_i   = α·o_i + Σ_j p_j v_j                (lane owns dims lane, lane+32, …)
//
// so S and P exist only one 32×32 tile at a time (in registers and a 4 KiB
// shared array). At the end O_i = o_i / l and L_i = m + log l. With causal
// masking the key loop stops at the last key the tile's last query sees
// (whole tiles skipped; the diagonal tile is masked element-wise).
//
// Backward, with dO given and D_i = Σ_d dO_id O_id = rowsum(dO ∘ O):
//
//   P_ij  = exp(S_ij − L_i)                    (recomputed from the saved L)
//   dV_j  = Σ_i P_ij dO_i
//   dP_ij = dO_i · V_j
//   dS_ij = P_ij (dP_ij − D_i)                 (softmax backward; D_i = Σ_j P_ij dP_ij)
//   dQ_i  = s Σ_j dS_ij K_j,    dK_j = s Σ_i dS_ij Q_i
//
// FlashAttention-2 parallelises the backward over key tiles and adds dQ with
// atomics. Here dK/dV (one block per key tile, looping over query tiles) and
// dQ (one block per query tile, looping over key tiles) are two kernels that
// each recompute P: every output element is written by one thread in a fixed
// order, so results are deterministic (as numformer._cpu's), for one extra
// S/P recomputation.
//
// Shared-memory layouts: a tile read by "lane = row" *and* by "lane = dim" is
// stored transposed with a padded row of 33 floats, X_t[d][i] at d·33 + i:
// lanes reading consecutive i (fixed d) hit consecutive banks, and lanes
// reading consecutive d (fixed i) hit banks 33 apart = 1 apart mod 32. Tiles
// read only by rows broadcast to the whole warp are stored row-major.
// Head dimensions up to 128: a lane owns NDV = ⌈D/32⌉ ≤ 4 output dims.
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace numformer::cuda {

namespace {

constexpr int BR = 32;             // queries per tile
constexpr int BC = 32;             // keys per tile (= lanes: lane j scores key j)
constexpr int kWarps = 4;
constexpr int kRowsPerWarp = BR / kWarps;  // 8 (also keys per warp in the dK/dV kernel)
constexpr int kThreads = 32 * kWarps;
constexpr int TS = 33;             // padded stride of transposed tiles

// Offset of head bh's K (and V) rows: dense, or a KV cache's stride (kernels.h).
__device__ __forceinline__ index_t kv_head(const AttentionArgs& p, int bh) {
    return index_t(bh) * (p.kv_head_stride != 0 ? p.kv_head_stride : index_t(p.tk) * p.dim);
}

struct Visibility {
    const std::uint8_t* key_mask;  // this batch row's (Tk,) mask, or null
    int tq, tk;
    bool causal;
    // May query i see key j?
    __device__ __forceinline__ bool operator()(int i, int j) const {
        if (i >= tq || j >= tk) return false;
        if (causal && j > i + (tk - tq)) return false;
        return key_mask == nullptr || key_mask[j] != 0;
    }
    // One past the last key any query < i_end can see (causal skipping).
    __device__ __forceinline__ int key_end(int i_end) const {
        if (!causal) return tk;
        const int e = i_end + (tk - tq);  // last query i_end − 1 sees keys ≤ i_end − 1 + Tk − Tq
        return e < 0 ? 0 : (e > tk ? tk : e);
    }
    // The first query that can see key j (causal skipping in the dK/dV kernel).
    __device__ __forceinline__ int query_begin(int j) const {
        if (!causal) return 0;
        const int b = j - (tk - tq);
        return b < 0 ? 0 : b;
    }
};

// OR of v over the warp.
__device__ __forceinline__ unsigned warp_or(unsigned v) {
    for (int offset = 16; offset > 0; offset >>= 1) v |= __shfl_xor_sync(kFullMask, v, offset);
    return v;
}

// Bit t (t < 32) set when column t of the shared-memory tile x holds an inf or
// NaN in any of the warp's rows lane + 32c (c < NDV): for a row-major
// [32][DP] tile pass (ld = DP, step = 1) — row t, dims lane + 32c — and for
// a transposed [DP][TS] tile (ld = 1, step = TS) — column t of the dims.
// x·0 is 0 only for finite x. The access pattern is the products' own.
template <int NDV>
__device__ __forceinline__ unsigned nonfinite_bits(const float* x, int ld, int step, int lane) {
    unsigned bits = 0;
    for (int t = 0; t < 32; ++t) {
        float z = 0.0f;
        for (int c = 0; c < NDV; ++c) z += x[t * ld + (lane + 32 * c) * step] * 0.0f;
        bits |= (z == 0.0f ? 0u : 1u) << t;
    }
    return warp_or(bits);
}

// Four consecutive floats of a shared-memory row (16-byte aligned: every row
// stride and tile offset is a multiple of 4 floats). One 128-bit shared load
// instead of four: the inner loops below are bound by shared-memory
// instructions, and a broadcast float4 feeds 4 FMAs per row.
__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// Copy rows [r0, r0 + 32) of a (T, D) matrix into shared memory, zero past T
// and in the padding columns D..DP: row-major dst[r][d] (stride DP) or
// transposed dst[d][r] (stride TS). Consecutive threads read consecutive d:
// coalesced global loads.
template <int DP>
__device__ __forceinline__ void stage_rows(float* dst, bool transposed, const float* src, int r0, int T, int D,
                                           float mul) {
    for (int idx = threadIdx.x; idx < 32 * DP; idx += kThreads) {
        const int r = idx / DP, d = idx % DP;
        const float v = (r0 + r < T && d < D) ? mul * src[index_t(r0 + r) * D + d] : 0.0f;
        if (transposed) dst[d * TS + r] = v;
        else dst[r * DP + d] = v;
    }
}

// ---------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------
template <int NDV>
__global__ void __launch_bounds__(kThreads)
attention_forward_kernel(AttentionArgs p, float* __restrict__ out, float* __restrict__ lse) {
    constexpr int DP = 32 * NDV;  // padded head dim
    NF_DYNAMIC_SHARED(float, smem);
    float* Qs = smem;              // [BR][DP]   s·Q rows, broadcast reads
    float* Kt = Qs + BR * DP;      // [DP][TS]   Kᵀ: lane j reads Kt[d][j]
    float* Vs = Kt + DP * TS;      // [BC][DP]   lane d reads Vs[j][d]
    float* Ps = Vs + BC * DP;      // [kWarps][kRowsPerWarp][BC]

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int bh = blockIdx.y, b = bh / p.heads;
    const int q0 = blockIdx.x * BR;
    const int D = p.dim;
    const float* Q = p.q + index_t(bh) * p.tq * D;
    const float* K = p.k + kv_head(p, bh);
    const float* V = p.v + kv_head(p, bh);
    const Visibility vis{p.key_mask ? p.key_mask + index_t(b) * p.tk : nullptr, p.tq, p.tk, p.causal};

    stage_rows<DP>(Qs, false, Q, q0, p.tq, D, p.scale);  // fold the scale into Q once

    float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][NDV];
    unsigned seen = 0;  // bit r: this lane's key of some tile was visible to row r
    for (int r = 0; r < kRowsPerWarp; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int c = 0; c < NDV; ++c) o[r][c] = 0.0f;
    }
    float* P = Ps + warp * kRowsPerWarp * BC;
    const int row0 = warp * kRowsPerWarp;  // this warp's first row in the tile

    const int k_end = vis.key_end(imin(q0 + BR, p.tq));
    for (int j0 = 0; j0 < k_end; j0 += BC) {
        __syncthreads();  // everyone is done with the previous K/V tile (and Qs is staged)
        stage_rows<DP>(Kt, true, K, j0, p.tk, D, 1.0f);
        stage_rows<DP>(Vs, false, V, j0, p.tk, D, 1.0f);
        __syncthreads();

        // Scores of this warp's 8 rows against key j0 + lane, 4 dims per step
        // (Qs and Kt are zero past D up to DP, a multiple of 32).
        float s[kRowsPerWarp];
        for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.0f;
        for (int d = 0; d < D; d += 4) {
            const float k0 = Kt[d * TS + lane], k1 = Kt[(d + 1) * TS + lane];
            const float k2 = Kt[(d + 2) * TS + lane], k3 = Kt[(d + 3) * TS + lane];
            for (int r = 0; r < kRowsPerWarp; ++r) {
                const float4 q = ld4(Qs + (row0 + r) * DP + d);
                s[r] += q.x * k0 + q.y * k1 + q.z * k2 + q.w * k3;
            }
        }
        // Online softmax update, row by row.
        bool hidden = false;  // a real (query, key) pair of this tile that the masks hide
        for (int r = 0; r < kRowsPerWarp; ++r) {
            const int i = q0 + row0 + r;
            const bool v_ok = vis(i, j0 + lane);
            seen |= (v_ok ? 1u : 0u) << r;
            hidden |= !v_ok && i < p.tq && j0 + lane < p.tk;
            const float sr = v_ok ? s[r] : -INFINITY;
            // The max leaves a NaN score out (so m is the same in every lane);
            // the NaN reaches l through its own p. m″ = m' with −inf replaced
            // by 0: no −inf − (−inf) inside exp while every score so far is −inf.
            const float m_new = fmaxf(m[r], warp_max(sr == sr ? sr : -INFINITY));
            const float ms = m_new == -INFINITY ? 0.0f : m_new;
            const float pr = expf(sr - ms);         // hidden (−inf): 0; NaN score: NaN
            const float alpha = expf(m[r] - ms);    // 0 when m was −inf (o and l are 0, or NaN, then)
            l[r] = alpha * l[r] + warp_sum(pr);
            m[r] = m_new;
            for (int c = 0; c < NDV; ++c) o[r][c] *= alpha;
            P[r * BC + lane] = pr;
        }
        __syncwarp();
        // A hidden key's v must not reach o (P = 0 there, but 0·NaN = NaN):
        // where this tile hides a pair and some v row is not finite, skip them.
        if (__any_sync(kFullMask, hidden) && nonfinite_bits<NDV>(Vs, DP, 1, lane) != 0) {
            for (int j = 0; j < BC; ++j)
                for (int r = 0; r < kRowsPerWarp; ++r)
                    if (vis(q0 + row0 + r, j0 + j))
                        for (int c = 0; c < NDV; ++c) o[r][c] += P[r * BC + j] * Vs[j * DP + lane + 32 * c];
            __syncwarp();
            continue;
        }
        // o_i += Σ_j p_ij v_j: lane owns dims d = lane + 32c; p_ij are broadcast
        // reads, 4 keys at a time.
        for (int j = 0; j < BC; j += 4) {
            float vj[4][NDV];
            for (int t = 0; t < 4; ++t)
                for (int c = 0; c < NDV; ++c) vj[t][c] = Vs[(j + t) * DP + lane + 32 * c];
            for (int r = 0; r < kRowsPerWarp; ++r) {
                const float4 pj = ld4(P + r * BC + j);
                for (int c = 0; c < NDV; ++c)
                    o[r][c] += pj.x * vj[0][c] + pj.y * vj[1][c] + pj.z * vj[2][c] + pj.w * vj[3][c];
            }
        }
        __syncwarp();  // P is rewritten by the next tile
    }

    for (int r = 0; r < kRowsPerWarp; ++r) {
        const int i = q0 + row0 + r;
        const bool any = __any_sync(kFullMask, (seen >> r) & 1u);  // does row i see a key?
        if (i >= p.tq) break;
        const index_t row = index_t(bh) * p.tq + i;
        // No visible key: O_i = 0, L_i = −inf. Visible keys but l = 0 (their
        // scores were all −inf): 0/0, O_i = L_i = NaN. l NaN: NaN through.
        const float inv_l = 1.0f / l[r];
        for (int c = 0; c < NDV; ++c) {
            const int d = lane + 32 * c;
            if (d < D) out[row * D + d] = any ? o[r][c] * inv_l : 0.0f;
        }
        if (lane == 0) lse[row] = !any ? -INFINITY : l[r] == 0.0f ? NAN : m[r] + logf(l[r]);
    }
}

// ---------------------------------------------------------------------------
// backward: D_i = rowsum(dO ∘ O), one warp per row
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads)
attention_rowdot_kernel(const float* __restrict__ dout, const float* __restrict__ out, float* __restrict__ dvec,
                        index_t rows, int D) {
    const int lane = threadIdx.x % 32;
    const index_t r = index_t(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (r >= rows) return;  // whole warps leave together; no barrier in this kernel
    float acc = 0.0f;
    for (int d = lane; d < D; d += 32) acc += dout[r * D + d] * out[r * D + d];
    acc = warp_sum(acc);
    if (lane == 0) dvec[r] = acc;
}

// ---------------------------------------------------------------------------
// backward: dK, dV — one block per tile of 32 keys, each warp owns 8 keys
// ---------------------------------------------------------------------------
template <int NDV>
__global__ void __launch_bounds__(kThreads)
attention_dkdv_kernel(AttentionArgs p, const float* __restrict__ dout, const float* __restrict__ lse,
                      const float* __restrict__ dvec, float* __restrict__ dk, float* __restrict__ dv) {
    constexpr int DP = 32 * NDV;
    NF_DYNAMIC_SHARED(float, smem);
    float* Ks = smem;              // [BC][DP]  key rows (broadcast reads)
    float* Vs = Ks + BC * DP;      // [BC][DP]
    float* Qt = Vs + BC * DP;      // [DP][TS]  (s·Q)ᵀ of the query tile
    float* dOt = Qt + DP * TS;     // [DP][TS]  dOᵀ
    float* Ps = dOt + DP * TS;     // [kWarps][8][BR]
    float* dSs = Ps + kWarps * kRowsPerWarp * BR;

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int bh = blockIdx.y, b = bh / p.heads;
    const int k0 = blockIdx.x * BC;
    const int D = p.dim;
    const float* Q = p.q + index_t(bh) * p.tq * D;
    const float* dO = dout + index_t(bh) * p.tq * D;
    const float* L = lse + index_t(bh) * p.tq;
    const float* Dv = dvec + index_t(bh) * p.tq;
    const Visibility vis{p.key_mask ? p.key_mask + index_t(b) * p.tk : nullptr, p.tq, p.tk, p.causal};

    stage_rows<DP>(Ks, false, p.k + kv_head(p, bh), k0, p.tk, D, 1.0f);
    stage_rows<DP>(Vs, false, p.v + kv_head(p, bh), k0, p.tk, D, 1.0f);

    float acc_dk[kRowsPerWarp][NDV], acc_dv[kRowsPerWarp][NDV];
    for (int r = 0; r < kRowsPerWarp; ++r)
        for (int c = 0; c < NDV; ++c) acc_dk[r][c] = acc_dv[r][c] = 0.0f;
    const int row0 = warp * kRowsPerWarp;  // this warp's first key in the tile
    float* P = Ps + warp * kRowsPerWarp * BR;
    float* dS = dSs + warp * kRowsPerWarp * BR;

    // Causal: queries before the one that sees key k0 contribute nothing.
    const int i_begin = (vis.query_begin(k0) / BR) * BR;
    for (int i0 = i_begin; i0 < p.tq; i0 += BR) {
        __syncthreads();  // the previous query tile is no longer read (and K/V are staged)
        stage_rows<DP>(Qt, true, Q, i0, p.tq, D, p.scale);
        stage_rows<DP>(dOt, true, dO, i0, p.tq, D, 1.0f);
        __syncthreads();

        // Lane i: query i0 + i against this warp's 8 keys.
        const int i = i0 + lane;
        const float Li = i < p.tq ? L[i] : -INFINITY;
        const float Di = i < p.tq ? Dv[i] : 0.0f;
        float s[kRowsPerWarp], dp[kRowsPerWarp];
        for (int r = 0; r < kRowsPerWarp; ++r) s[r] = dp[r] = 0.0f;
        for (int d = 0; d < D; d += 4) {
            float q[4], g[4];
            for (int t = 0; t < 4; ++t) {
                q[t] = Qt[(d + t) * TS + lane];
                g[t] = dOt[(d + t) * TS + lane];
            }
            for (int r = 0; r < kRowsPerWarp; ++r) {
                const float4 kk = ld4(Ks + (row0 + r) * DP + d), vv = ld4(Vs + (row0 + r) * DP + d);
                s[r] += q[0] * kk.x + q[1] * kk.y + q[2] * kk.z + q[3] * kk.w;   // S_ij (scale folded into Q)
                dp[r] += g[0] * vv.x + g[1] * vv.y + g[2] * vv.z + g[3] * vv.w;  // dP_ij = dO_i · V_j
            }
        }
        bool hidden = false;
        for (int r = 0; r < kRowsPerWarp; ++r) {
            const bool v_ok = vis(i, k0 + row0 + r);
            hidden |= !v_ok && i < p.tq && k0 + row0 + r < p.tk;
            const float pr = v_ok ? expf(s[r] - Li) : 0.0f;
            P[r * BR + lane] = pr;
            dS[r * BR + lane] = v_ok ? pr * (dp[r] - Di) : 0.0f;  // a select: dp or Di may be NaN
        }
        __syncwarp();
        // Hidden pairs with a non-finite dO or Q row: skip them (see the top).
        if (__any_sync(kFullMask, hidden) &&
            (nonfinite_bits<NDV>(dOt, 1, TS, lane) | nonfinite_bits<NDV>(Qt, 1, TS, lane)) != 0) {
            for (int ii = 0; ii < BR; ++ii)
                for (int r = 0; r < kRowsPerWarp; ++r)
                    if (vis(i0 + ii, k0 + row0 + r))
                        for (int c = 0; c < NDV; ++c) {
                            acc_dv[r][c] += P[r * BR + ii] * dOt[(lane + 32 * c) * TS + ii];
                            acc_dk[r][c] += dS[r * BR + ii] * Qt[(lane + 32 * c) * TS + ii];
                        }
            __syncwarp();
            continue;
        }
        // dV_j += Σ_i P_ij dO_i, dK_j += Σ_i dS_ij (s·Q_i): lane owns dims lane + 32c.
        for (int ii = 0; ii < BR; ii += 4) {
            float g[4][NDV], q[4][NDV];
            for (int t = 0; t < 4; ++t)
                for (int c = 0; c < NDV; ++c) {
                    g[t][c] = dOt[(lane + 32 * c) * TS + ii + t];
                    q[t][c] = Qt[(lane + 32 * c) * TS + ii + t];
                }
            for (int r = 0; r < kRowsPerWarp; ++r) {
                const float4 pj = ld4(P + r * BR + ii), dsj = ld4(dS + r * BR + ii);
                for (int c = 0; c < NDV; ++c) {
                    acc_dv[r][c] += pj.x * g[0][c] + pj.y * g[1][c] + pj.z * g[2][c] + pj.w * g[3][c];
                    acc_dk[r][c] += dsj.x * q[0][c] + dsj.y * q[1][c] + dsj.z * q[2][c] + dsj.w * q[3][c];
                }
            }
        }
        __syncwarp();
    }

    for (int r = 0; r < kRowsPerWarp; ++r) {
        const int j = k0 + row0 + r;
        if (j >= p.tk) break;
        const index_t row = index_t(bh) * p.tk + j;
        for (int c = 0; c < NDV; ++c) {
            const int d = lane + 32 * c;
            if (d < D) {
                dk[row * D + d] = acc_dk[r][c];
                dv[row * D + d] = acc_dv[r][c];
            }
        }
    }
}

// ---------------------------------------------------------------------------
// backward: dQ — one block per tile of 32 queries, each warp owns 8 queries
// ---------------------------------------------------------------------------
template <int NDV>
__global__ void __launch_bounds__(kThreads)
attention_dq_kernel(AttentionArgs p, const float* __restrict__ dout, const float* __restrict__ lse,
                    const float* __restrict__ dvec, float* __restrict__ dq) {
    constexpr int DP = 32 * NDV;
    NF_DYNAMIC_SHARED(float, smem);
    float* Qs = smem;              // [BR][DP]  s·Q rows
    float* dOs = Qs + BR * DP;     // [BR][DP]
    float* Kt = dOs + BR * DP;     // [DP][TS]
    float* Vt = Kt + DP * TS;      // [DP][TS]
    float* dSs = Vt + DP * TS;     // [kWarps][8][BC]

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int bh = blockIdx.y, b = bh / p.heads;
    const int q0 = blockIdx.x * BR;
    const int D = p.dim;
    const float* K = p.k + kv_head(p, bh);
    const float* V = p.v + kv_head(p, bh);
    const Visibility vis{p.key_mask ? p.key_mask + index_t(b) * p.tk : nullptr, p.tq, p.tk, p.causal};

    stage_rows<DP>(Qs, false, p.q + index_t(bh) * p.tq * D, q0, p.tq, D, p.scale);
    stage_rows<DP>(dOs, false, dout + index_t(bh) * p.tq * D, q0, p.tq, D, 1.0f);

    const int row0 = warp * kRowsPerWarp;
    float Li[kRowsPerWarp], Di[kRowsPerWarp], acc[kRowsPerWarp][NDV];
    for (int r = 0; r < kRowsPerWarp; ++r) {
        const int i = q0 + row0 + r;
        Li[r] = i < p.tq ? lse[index_t(bh) * p.tq + i] : -INFINITY;
        Di[r] = i < p.tq ? dvec[index_t(bh) * p.tq + i] : 0.0f;
        for (int c = 0; c < NDV; ++c) acc[r][c] = 0.0f;
    }
    float* dS = dSs + warp * kRowsPerWarp * BC;

    const int k_end = vis.key_end(imin(q0 + BR, p.tq));
    for (int j0 = 0; j0 < k_end; j0 += BC) {
        __syncthreads();
        stage_rows<DP>(Kt, true, K, j0, p.tk, D, 1.0f);
        stage_rows<DP>(Vt, true, V, j0, p.tk, D, 1.0f);
        __syncthreads();

        // Lane j: key j0 + j against this warp's 8 queries.
        float s[kRowsPerWarp], dp[kRowsPerWarp];
        for (int r = 0; r < kRowsPerWarp; ++r) s[r] = dp[r] = 0.0f;
        for (int d = 0; d < D; d += 4) {
            float kd[4], vd[4];
            for (int t = 0; t < 4; ++t) {
                kd[t] = Kt[(d + t) * TS + lane];
                vd[t] = Vt[(d + t) * TS + lane];
            }
            for (int r = 0; r < kRowsPerWarp; ++r) {
                const float4 q = ld4(Qs + (row0 + r) * DP + d), g = ld4(dOs + (row0 + r) * DP + d);
                s[r] += q.x * kd[0] + q.y * kd[1] + q.z * kd[2] + q.w * kd[3];
                dp[r] += g.x * vd[0] + g.y * vd[1] + g.z * vd[2] + g.w * vd[3];
            }
        }
        bool hidden = false;
        for (int r = 0; r < kRowsPerWarp; ++r) {
            const bool v_ok = vis(q0 + row0 + r, j0 + lane);
            hidden |= !v_ok && q0 + row0 + r < p.tq && j0 + lane < p.tk;
            const float pr = v_ok ? expf(s[r] - Li[r]) : 0.0f;
            dS[r * BC + lane] = v_ok ? pr * (dp[r] - Di[r]) : 0.0f;
        }
        __syncwarp();
        // Hidden pairs with a non-finite K row: skip them (see the top).
        if (__any_sync(kFullMask, hidden) && nonfinite_bits<NDV>(Kt, 1, TS, lane) != 0) {
            for (int j = 0; j < BC; ++j)
                for (int r = 0; r < kRowsPerWarp; ++r)
                    if (vis(q0 + row0 + r, j0 + j))
                        for (int c = 0; c < NDV; ++c) acc[r][c] += dS[r * BC + j] * Kt[(lane + 32 * c) * TS + j];
            __syncwarp();
            continue;
        }
        // dQ_i += Σ_j dS_ij K_j (times s at the end): lane owns dims lane + 32c.
        for (int j = 0; j < BC; j += 4) {
            float kj[4][NDV];
            for (int t = 0; t < 4; ++t)
                for (int c = 0; c < NDV; ++c) kj[t][c] = Kt[(lane + 32 * c) * TS + j + t];
            for (int r = 0; r < kRowsPerWarp; ++r) {
                const float4 dsj = ld4(dS + r * BC + j);
                for (int c = 0; c < NDV; ++c)
                    acc[r][c] += dsj.x * kj[0][c] + dsj.y * kj[1][c] + dsj.z * kj[2][c] + dsj.w * kj[3][c];
            }
        }
        __syncwarp();
    }

    for (int r = 0; r < kRowsPerWarp; ++r) {
        const int i = q0 + row0 + r;
        if (i >= p.tq) break;
        const index_t row = index_t(bh) * p.tq + i;
        for (int c = 0; c < NDV; ++c) {
            const int d = lane + 32 * c;
            if (d < D) dq[row * D + d] = p.scale * acc[r][c];
        }
    }
}

template <int NDV>
void forward_t(const AttentionArgs& p, float* out, float* lse) {
    constexpr int DP = 32 * NDV;
    const std::size_t smem = sizeof(float) * (BR * DP + DP * TS + BC * DP + kWarps * kRowsPerWarp * BC);
    launch("attention_forward", attention_forward_kernel<NDV>, dim3(unsigned(ceil_div(p.tq, BR)),
           unsigned(p.batch * p.heads)), dim3(kThreads), smem, nullptr, p, out, lse);
}

template <int NDV>
void backward_t(const AttentionArgs& p, const float* dout, const float* lse, const float* dvec, float* dq,
                float* dk, float* dv) {
    constexpr int DP = 32 * NDV;
    const unsigned bh = unsigned(p.batch * p.heads);
    const std::size_t smem_kv = sizeof(float) * (2 * BC * DP + 2 * DP * TS + 2 * kWarps * kRowsPerWarp * BR);
    // A side of length 0 has no block (CUDA rejects empty grids); its kernel
    // has nothing to write. The other kernel then writes zeros.
    if (p.tk > 0)
        launch("attention_backward_dkdv", attention_dkdv_kernel<NDV>, dim3(unsigned(ceil_div(p.tk, BC)), bh),
           dim3(kThreads), smem_kv, nullptr, p, dout, lse, dvec, dk, dv);
    const std::size_t smem_q = sizeof(float) * (2 * BR * DP + 2 * DP * TS + kWarps * kRowsPerWarp * BC);
    if (p.tq > 0)
        launch("attention_backward_dq", attention_dq_kernel<NDV>, dim3(unsigned(ceil_div(p.tq, BR)), bh),
           dim3(kThreads), smem_q, nullptr, p, dout, lse, dvec, dq);
}

void check_args(const AttentionArgs& p, const char* fn) {
    if (p.dim < 1 || p.dim > kAttentionMaxDim)
        throw CudaError(std::string(fn) + ": head dimension must be 1..128, got " + std::to_string(p.dim));
    if (index_t(p.batch) * p.heads > 65535) throw CudaError(std::string(fn) + ": batch·heads > 65535");
}

}  // namespace

void attention_forward(const AttentionArgs& p, float* out, float* lse) {
    check_args(p, "attention_forward");
    if (p.batch == 0 || p.heads == 0 || p.tq == 0) return;
    switch ((p.dim + 31) / 32) {
        case 1: forward_t<1>(p, out, lse); break;
        case 2: forward_t<2>(p, out, lse); break;
        case 3: forward_t<3>(p, out, lse); break;
        default: forward_t<4>(p, out, lse); break;
    }
}

void attention_backward(const AttentionArgs& p, const float* out, const float* dout, const float* lse, float* dq,
                        float* dk, float* dv, float* scratch) {
    check_args(p, "attention_backward");
    if (p.batch == 0 || p.heads == 0 || (p.tq == 0 && p.tk == 0)) return;
    const index_t rows = index_t(p.batch) * p.heads * p.tq;
    if (rows > 0)
        launch("attention_backward_rowdot", attention_rowdot_kernel, dim3(unsigned((rows + kWarps - 1) / kWarps)),
               dim3(kThreads), 0, nullptr, dout, out, scratch, rows, p.dim);
    switch ((p.dim + 31) / 32) {
        case 1: backward_t<1>(p, dout, lse, scratch, dq, dk, dv); break;
        case 2: backward_t<2>(p, dout, lse, scratch, dq, dk, dv); break;
        case 3: backward_t<3>(p, dout, lse, scratch, dq, dk, dv); break;
        default: backward_t<4>(p, dout, lse, scratch, dq, dk, dv); break;
    }
}

}  // namespace numformer::cuda
