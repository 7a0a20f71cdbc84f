// MoE routing kernels for ditmoe: fused top-k gating, stable counting sort by expert,
// row gather and deterministic weighted combine.
//
// Compiled at run time with NVRTC (src/kernels/cuda.rs), after kernels/common.cuh: header-free
// on purpose (bf16 as raw 16-bit patterns), so no CUDA include directory is needed at run time.
//
// Conventions (shared with the Rust CPU reference in src/kernels/cpu.rs):
//   S tokens, E experts, k experts per token, N = S*k slots; slot p = t*k + j.
//   ids[S,k] u32 sorted by descending logit (ties -> lower expert id).
//   offsets[E+1] u32: rows of expert e are order[offsets[e] .. offsets[e+1]).
//   order[N]: slot index of each expert-contiguous row, ascending within an expert.
//   inv[N]: inverse of order (row position of each slot).

struct alignas(16) U4 { u32 x, y, z, w; };

// ---------------------------------------------------------------------------------------
// 1. Fused gating: softmax (f32) + top-k + per-expert counts and mean scores, one launch.
//
// One warp per token row; lane l owns experts l, l+32, ... (E <= 32*GATE_MAXC); for E <= 32
// the thread-per-row kernel below (gating_rows_*).
// Top-k is selected on the logits (softmax is monotonic, and the logits are the exact
// inputs, so the CPU reference picks the very same experts); weights are the softmax
// probabilities of the selected experts (no renormalisation, as official).
// Balance-loss statistics: each block writes per-expert partial sums of the scores and
// per-expert selection counts; the last block to finish (ticket counter) reduces the
// partials in block order, so mean_scores are bit-identical from run to run.
// ---------------------------------------------------------------------------------------
#define GATE_MAXC 8           // E <= 256
#define GATE_WARPS 8          // warps per block
#define GATE_ROWS_PER_WARP 8  // rows per warp -> 64 rows per block

#define PERM_WARPS 8
#define PERM_SUB 128                          // slots per warp
#define PERM_CHUNK (PERM_WARPS * PERM_SUB)    // 1024 slots per block
#define PERM_MAXE 1024

// Inclusive prefix sum of v over the lanes of a warp (a shuffle scan).
__device__ __forceinline__ u32 warp_inclusive_scan(u32 v, u32 lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= (u32)o) v += y;
    }
    return v;
}

// offsets[E + 1] (exclusive scan of the experts' totals) and base[nb, E] (where block b's
// slots of expert e start) from per-block counts hist[nb, E], E <= PERM_MAXE, by one block:
// one warp per expert scans its per-block counts 32 blocks at a time (lanes in parallel, a
// shuffle scan), so the latency is a few loads rather than a serial walk over the blocks.
// hist is read through L2 (ld.cg): after the gating it was written by other blocks of the
// same kernel.
__device__ __forceinline__ void scan_expert_counts(const u32* hist, u32 nb, u32 E, u32* __restrict__ offsets,
                                                   u32* __restrict__ base) {
    __shared__ u32 s_tot[PERM_MAXE];
    __shared__ u32 s_off[PERM_MAXE + 1];
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    // pass 1: each expert's total
    for (u32 e = warp; e < E; e += warps) {
        u32 t = 0u;
        for (u32 b = lane; b < nb; b += 32u) t += __ldcg(hist + (size_t)b * E + e);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        if (lane == 0) s_tot[e] = t;
    }
    __syncthreads();
    // exclusive scan over the experts (E <= 1024: warp 0, 32 experts per step)
    if (warp == 0) {
        u32 carry = 0u;
        for (u32 e0 = 0; e0 < E; e0 += 32u) {
            const u32 e = e0 + lane;
            const u32 v = e < E ? s_tot[e] : 0u;
            const u32 incl = warp_inclusive_scan(v, lane);
            if (e < E) s_off[e] = carry + incl - v;
            carry += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (lane == 0) s_off[E] = carry;
    }
    __syncthreads();
    for (u32 e = threadIdx.x; e <= E; e += blockDim.x) offsets[e] = s_off[e];
    // pass 2: per-block bases, blocks in chunks of 32 per expert
    for (u32 e = warp; e < E; e += warps) {
        u32 carry = s_off[e];
        for (u32 b0 = 0; b0 < nb; b0 += 32u) {
            const u32 b = b0 + lane;
            const u32 v = b < nb ? __ldcg(hist + (size_t)b * E + e) : 0u;
            const u32 incl = warp_inclusive_scan(v, lane);
            if (b < nb) base[(size_t)b * E + e] = carry + incl - v;
            carry += __shfl_sync(0xffffffffu, incl, 31);
        }
    }
}


// The end of every gating kernel, once its block has written its partials: the last block to
// finish (ticket counter) reduces the per-block partials in block order: one warp per expert
// (experts in parallel), lane l sums blocks l, l + 32, ... in order, then a fixed xor-shuffle
// tree over the lanes (deterministic; a serial loop over the blocks cost ~30 us at 256
// blocks, one block-wide tree per expert ~1 us per expert).
// With offsets and base (not null), the last block also runs the counting sort's scan on the
// per-block counts (scan_expert_counts), so that perm_scatter can follow the gating directly,
// with the gating blocks as its chunks (fused_gating_permute: no perm_count, no perm_scan).
__device__ __forceinline__ void gating_finish(const float* part_sum, const u32* part_cnt, u32* ticket, u32* counts,
                                              float* mean_scores, u32 S, u32 E, u32* offsets, u32* base) {
    __shared__ bool s_last;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const u32 t = atomicAdd(ticket, 1u);
        s_last = (t == gridDim.x - 1);
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (u32 e = warp; e < E; e += warps) {
        double a = 0.0;
        u32 n = 0u;
        for (u32 b = lane; b < gridDim.x; b += 32u) {
            a += (double)(((volatile float*)part_sum)[(size_t)b * E + e]);
            n += ((volatile u32*)part_cnt)[(size_t)b * E + e];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_xor_sync(0xffffffffu, a, o);
            n += __shfl_xor_sync(0xffffffffu, n, o);
        }
        if (lane == 0) {
            counts[e] = n;
            mean_scores[e] = (float)(a / (double)S);
        }
    }
    if (offsets) scan_expert_counts(part_cnt, gridDim.x, E, offsets, base);
}

template <bool BF16>
__device__ __forceinline__ void fused_gating_body(
    const void* __restrict__ logits_v, u32 S, u32 E, u32 K,
    u32* __restrict__ ids, float* __restrict__ weights, float* __restrict__ scores,
    float* __restrict__ part_sum,   // [gridDim.x, E]
    u32* __restrict__ part_cnt,     // [gridDim.x, E]
    u32* __restrict__ ticket,       // [1], zero before launch
    u32* __restrict__ counts,       // [E]
    float* __restrict__ mean_scores // [E]
) {
    __shared__ float s_sum[GATE_WARPS][GATE_MAXC * 32];
    __shared__ u32 s_cnt[GATE_WARPS][GATE_MAXC * 32];
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 nc = (E + 31u) / 32u;
    float acc_s[GATE_MAXC];
    u32 acc_c[GATE_MAXC];
#pragma unroll
    for (int c = 0; c < GATE_MAXC; ++c) { acc_s[c] = 0.f; acc_c[c] = 0u; }

    const u32 row0 = blockIdx.x * (GATE_WARPS * GATE_ROWS_PER_WARP) + warp * GATE_ROWS_PER_WARP;
    for (u32 rr = 0; rr < GATE_ROWS_PER_WARP; ++rr) {
        const u32 row = row0 + rr;
        if (row >= S) break;
        float x[GATE_MAXC];
        float m = NEG_INF;
#pragma unroll
        for (int c = 0; c < GATE_MAXC; ++c) {
            const u32 e = lane + 32u * c;
            float v = NEG_INF;
            if (c < (int)nc && e < E) {
                if (BF16) v = bf2f(((const u16*)logits_v)[(size_t)row * E + e]);
                else v = ((const float*)logits_v)[(size_t)row * E + e];
            }
            x[c] = v;
            m = fmaxf(m, v);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float p[GATE_MAXC];
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < GATE_MAXC; ++c) {
            const u32 e = lane + 32u * c;
            p[c] = (c < (int)nc && e < E) ? expf(x[c] - m) : 0.f;
            s += p[c];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        const float inv = 1.f / s;
#pragma unroll
        for (int c = 0; c < GATE_MAXC; ++c) {
            const u32 e = lane + 32u * c;
            p[c] *= inv;
            if (c < (int)nc && e < E) {
                scores[(size_t)row * E + e] = p[c];
                acc_s[c] += p[c];
            }
        }
        // top-k on the logits: each round a warp arg-max (larger value, then lower id)
        u32 taken = 0u;  // bit c: expert lane+32c already selected
        for (u32 j = 0; j < K; ++j) {
            float bv = NEG_INF;
            u32 bi = 0xffffffffu;
#pragma unroll
            for (int c = 0; c < GATE_MAXC; ++c) {
                const u32 e = lane + 32u * c;
                if (c < (int)nc && e < E && !((taken >> c) & 1u)) {
                    // ">" keeps the lower id on ties because c ascends; NaN ranks as -inf
                    const float key = (x[c] != x[c]) ? NEG_INF : x[c];
                    if (bi == 0xffffffffu || key > bv) { bv = key; bi = e; }
                }
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                const u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
                const bool better = (oi != 0xffffffffu) &&
                    (bi == 0xffffffffu || ov > bv || (ov == bv && oi < bi));
                if (better) { bv = ov; bi = oi; }
            }
            // bi is now the same on all lanes
            if ((bi & 31u) == lane) {
                const u32 c = bi >> 5;
                taken |= 1u << c;
#pragma unroll
                for (int cc = 0; cc < GATE_MAXC; ++cc) if ((u32)cc == c) acc_c[cc] += 1u;
            }
            if (lane == 0) {
                ids[(size_t)row * K + j] = bi;
            }
            // weight of the chosen expert = its probability, fetched from its owner lane
            float w = 0.f;
#pragma unroll
            for (int c = 0; c < GATE_MAXC; ++c) if ((u32)c == (bi >> 5)) w = p[c];
            w = __shfl_sync(0xffffffffu, w, bi & 31u);
            if (lane == 0) weights[(size_t)row * K + j] = w;
        }
    }
    // block partials (fixed order over warps)
#pragma unroll
    for (int c = 0; c < GATE_MAXC; ++c) {
        s_sum[warp][lane + 32 * c] = acc_s[c];
        s_cnt[warp][lane + 32 * c] = acc_c[c];
    }
    __syncthreads();
    for (u32 e = threadIdx.x; e < E; e += blockDim.x) {
        float a = 0.f;
        u32 n = 0u;
        for (int w = 0; w < GATE_WARPS; ++w) { a += s_sum[w][e]; n += s_cnt[w][e]; }
        part_sum[(size_t)blockIdx.x * E + e] = a;
        part_cnt[(size_t)blockIdx.x * E + e] = n;
    }
    gating_finish(part_sum, part_cnt, ticket, counts, mean_scores, S, E, nullptr, nullptr);
}

extern "C" __global__ void __launch_bounds__(GATE_WARPS * 32) fused_gating_f32(
    const float* logits, u32 S, u32 E, u32 K, u32* ids, float* weights, float* scores,
    float* part_sum, u32* part_cnt, u32* ticket, u32* counts, float* mean_scores) {
    fused_gating_body<false>(logits, S, E, K, ids, weights, scores, part_sum, part_cnt, ticket,
                             counts, mean_scores);
}
extern "C" __global__ void __launch_bounds__(GATE_WARPS * 32) fused_gating_bf16(
    const u16* logits, u32 S, u32 E, u32 K, u32* ids, float* weights, float* scores,
    float* part_sum, u32* part_cnt, u32* ticket, u32* counts, float* mean_scores) {
    fused_gating_body<true>(logits, S, E, K, ids, weights, scores, part_sum, part_cnt, ticket,
                            counts, mean_scores);
}

// Few experts (E <= 32, every DiT-MoE size): one thread per token row, the row's logits in
// registers, so softmax and top-k need no shuffles (the warp per row above leaves 24 of 32
// lanes idle at E = 8 and walks ~50 dependent shuffles per row). Same selection rule (larger
// logit, then lower id; NaN ranks as -inf), same outputs; the block partials are summed by a
// warp shuffle tree per expert, then over the warps in order (deterministic).
#define GATE_ROWS_BLOCK 256
template <bool BF16, int EMAX>
__device__ __forceinline__ void gating_rows_body(const void* __restrict__ logits_v, u32 S, u32 E, u32 K, u32* __restrict__ ids,
                                                 float* __restrict__ weights, float* __restrict__ scores, float* __restrict__ part_sum,
                                                 u32* __restrict__ part_cnt, u32* __restrict__ ticket, u32* __restrict__ counts,
                                                 float* __restrict__ mean_scores, u32* __restrict__ offsets, u32* __restrict__ base) {
    __shared__ float s_sum[GATE_ROWS_BLOCK / 32][EMAX];
    __shared__ u32 s_cnt[GATE_ROWS_BLOCK / 32][EMAX];
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 row = blockIdx.x * GATE_ROWS_BLOCK + threadIdx.x;
    const bool live = row < S;
    float x[EMAX], p[EMAX];
    u32 taken = 0u;  // bit e: expert e selected
    float m = NEG_INF;
#pragma unroll
    for (int e = 0; e < EMAX; ++e) {
        float v = NEG_INF;
        if (live && (u32)e < E) v = BF16 ? bf2f(((const u16*)logits_v)[(size_t)row * E + e]) : ((const float*)logits_v)[(size_t)row * E + e];
        x[e] = v;
        m = fmaxf(m, v);
    }
    if (live) {
        float sum = 0.f;
#pragma unroll
        for (int e = 0; e < EMAX; ++e) {
            p[e] = (u32)e < E ? expf(x[e] - m) : 0.f;
            sum += p[e];
        }
        const float inv = 1.f / sum;
#pragma unroll
        for (int e = 0; e < EMAX; ++e) {
            p[e] *= inv;
            if ((u32)e < E) scores[(size_t)row * E + e] = p[e];
        }
        for (u32 j = 0; j < K; ++j) {
            float bv = NEG_INF;
            int bi = -1;
#pragma unroll
            for (int e = 0; e < EMAX; ++e) {
                // ">" keeps the lower id on ties (e ascends); NaN ranks as -inf
                const float key = (x[e] != x[e]) ? NEG_INF : x[e];
                if ((u32)e < E && !((taken >> e) & 1u) && (bi < 0 || key > bv)) {
                    bv = key;
                    bi = e;
                }
            }
            taken |= 1u << bi;
            float w = 0.f;
#pragma unroll
            for (int e = 0; e < EMAX; ++e) if (e == bi) w = p[e];
            ids[(size_t)row * K + j] = (u32)bi;
            weights[(size_t)row * K + j] = w;
        }
    } else {
#pragma unroll
        for (int e = 0; e < EMAX; ++e) p[e] = 0.f;
    }
    // block partials: per expert a warp tree, then the warps in order
#pragma unroll
    for (int e = 0; e < EMAX; ++e) {
        float a = p[e];
        u32 n = (taken >> e) & 1u;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_xor_sync(0xffffffffu, a, o);
            n += __shfl_xor_sync(0xffffffffu, n, o);
        }
        if (lane == 0) {
            s_sum[warp][e] = a;
            s_cnt[warp][e] = n;
        }
    }
    __syncthreads();
    for (u32 e = threadIdx.x; e < E; e += blockDim.x) {
        float a = 0.f;
        u32 n = 0u;
        for (int w = 0; w < GATE_ROWS_BLOCK / 32; ++w) {
            a += s_sum[w][e];
            n += s_cnt[w][e];
        }
        part_sum[(size_t)blockIdx.x * E + e] = a;
        part_cnt[(size_t)blockIdx.x * E + e] = n;
    }
    gating_finish(part_sum, part_cnt, ticket, counts, mean_scores, S, E, offsets, base);
}
#define GATING_ROWS(T, BF16, EMAX) \
    extern "C" __global__ void __launch_bounds__(GATE_ROWS_BLOCK) gating_rows_##T##_e##EMAX( \
        const void* logits, u32 S, u32 E, u32 K, u32* ids, float* weights, float* scores, float* part_sum, u32* part_cnt, \
        u32* ticket, u32* counts, float* mean_scores, u32* offsets, u32* base) { \
        gating_rows_body<BF16, EMAX>(logits, S, E, K, ids, weights, scores, part_sum, part_cnt, ticket, counts, mean_scores, offsets, \
                                     base); \
    }
GATING_ROWS(f32, false, 8)
GATING_ROWS(f32, false, 16)
GATING_ROWS(f32, false, 32)
GATING_ROWS(bf16, true, 8)
GATING_ROWS(bf16, true, 16)
GATING_ROWS(bf16, true, 32)

// ---------------------------------------------------------------------------------------
// 2. Stable counting sort of slots by expert: three small launches, no host round trip.
//    perm_count:   per-block histograms               hist[nb, E]
//    perm_scan:    offsets[E+1] and per-block bases    base[nb, E]   (one block)
//    perm_scatter: stable ranks inside each block (warp by warp, 32 slots at a time with
//                  __match_any_sync), order[pos] = slot, inv[slot] = pos.
// A block covers PERM_CHUNK consecutive slots; warp w covers the w-th sub-chunk.
// ---------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(PERM_WARPS * 32) perm_count(
    const u32* __restrict__ ids, u32 N, u32 E, u32* __restrict__ hist) {
    __shared__ u32 s_h[PERM_MAXE];
    for (u32 e = threadIdx.x; e < E; e += blockDim.x) s_h[e] = 0u;
    __syncthreads();
    const u32 base = blockIdx.x * PERM_CHUNK;
    for (u32 i = threadIdx.x; i < PERM_CHUNK; i += blockDim.x) {
        const u32 p = base + i;
        if (p < N) {
            const u32 e = ids[p];
            if (e < E) atomicAdd(&s_h[e], 1u);
        }
    }
    __syncthreads();
    for (u32 e = threadIdx.x; e < E; e += blockDim.x) hist[(size_t)blockIdx.x * E + e] = s_h[e];
}

// one block of 1024 threads; E <= PERM_MAXE
extern "C" __global__ void __launch_bounds__(1024) perm_scan(
    const u32* __restrict__ hist, u32 nb, u32 E, u32* __restrict__ offsets, u32* __restrict__ base) {
    scan_expert_counts(hist, nb, E, offsets, base);
}

// `sub` slots per warp (a multiple of 32): PERM_SUB after perm_count, 32 k after the gating
// (a gating_rows block of GATE_ROWS_BLOCK tokens is one chunk).
extern "C" __global__ void __launch_bounds__(PERM_WARPS * 32) perm_scatter(
    const u32* __restrict__ ids, u32 N, u32 E, const u32* __restrict__ base, u32 sub,
    u32* __restrict__ order, u32* __restrict__ inv) {
    // per-warp running counts: E <= PERM_MAXE would need 32 KB; use dynamic shared memory
    extern __shared__ u32 s_wc[];  // [PERM_WARPS][E]
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    for (u32 i = threadIdx.x; i < PERM_WARPS * E; i += blockDim.x) s_wc[i] = 0u;
    __syncthreads();
    const u32 sub0 = blockIdx.x * PERM_WARPS * sub + warp * sub;
    const u32 lt = (1u << lane) - 1u;
    u32* wc = s_wc + warp * E;
    // pass 1: per-warp counts
    for (u32 s = 0; s < sub; s += 32) {
        const u32 p = sub0 + s + lane;
        const u32 e = (p < N) ? ids[p] : 0xffffffffu;
        const u32 grp = __match_any_sync(0xffffffffu, e);
        if (e < E && (grp & lt) == 0u) wc[e] += __popc(grp);
        __syncwarp();
    }
    __syncthreads();
    // exclusive prefix over warps, per expert: s_wc[w][e] becomes the warp's start
    for (u32 e = threadIdx.x; e < E; e += blockDim.x) {
        u32 acc = base[(size_t)blockIdx.x * E + e];
        for (u32 w = 0; w < PERM_WARPS; ++w) {
            const u32 c = s_wc[w * E + e];
            s_wc[w * E + e] = acc;
            acc += c;
        }
    }
    __syncthreads();
    // pass 2: stable positions
    for (u32 s = 0; s < sub; s += 32) {
        const u32 p = sub0 + s + lane;
        const u32 e = (p < N) ? ids[p] : 0xffffffffu;
        const u32 grp = __match_any_sync(0xffffffffu, e);
        if (e < E) {
            const u32 pos = wc[e] + __popc(grp & lt);
            order[pos] = p;
            inv[p] = pos;
        }
        __syncwarp();
        if (e < E && (grp & lt) == 0u) wc[e] += __popc(grp);
        __syncwarp();
    }
}

// ---------------------------------------------------------------------------------------
// 3. Gather rows into expert-contiguous order: dst[r] = src[order[r] / k].
//    Copies 16-byte chunks when rows are 16-byte aligned, else 4 or 2 bytes.
// ---------------------------------------------------------------------------------------
template <typename V>
__device__ __forceinline__ void gather_body(const V* __restrict__ src, const u32* __restrict__ order,
                                            u32 k, V* __restrict__ dst, u32 R, u32 vpr) {
    const size_t total = (size_t)R * vpr;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const u32 r = (u32)(i / vpr), c = (u32)(i % vpr);
        const u32 t = order[r] / k;
        dst[i] = src[(size_t)t * vpr + c];
    }
}
extern "C" __global__ void gather_rows_v16(const U4* src, const u32* order, u32 k, U4* dst, u32 R, u32 vpr) {
    gather_body<U4>(src, order, k, dst, R, vpr);
}
extern "C" __global__ void gather_rows_v4(const u32* src, const u32* order, u32 k, u32* dst, u32 R, u32 vpr) {
    gather_body<u32>(src, order, k, dst, R, vpr);
}
extern "C" __global__ void gather_rows_v2(const u16* src, const u32* order, u32 k, u16* dst, u32 R, u32 vpr) {
    gather_body<u16>(src, order, k, dst, R, vpr);
}

// ---------------------------------------------------------------------------------------
// 4. Combine: out[t, :] = add[t, :] + sum_{j=0..k-1} w[t, j] * y[inv[t*k + j], :]
//    f32 accumulation in slot order j = 0..k-1, no atomics: deterministic.
//    Each thread does 8 (bf16) or 4 (f32) consecutive columns; D % 8 == 0 (bf16) or
//    D % 4 == 0 (f32) and 16-byte aligned rows take the vector path, else scalar.
// ---------------------------------------------------------------------------------------
extern "C" __global__ void combine_f32(const float* __restrict__ y, const u32* __restrict__ inv,
                                       const float* __restrict__ w, const float* __restrict__ add,
                                       float* __restrict__ out, u32 S, u32 k, u32 D, u32 vec) {
    const u32 per = vec ? 4u : 1u;
    const u32 cpr = D / per;
    const size_t total = (size_t)S * cpr;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const u32 t = (u32)(i / cpr), c = (u32)(i % cpr) * per;
        float a[4] = {0.f, 0.f, 0.f, 0.f};
        if (add) {
            if (vec) { const U4 v = *(const U4*)(add + (size_t)t * D + c);
                a[0] = __uint_as_float(v.x); a[1] = __uint_as_float(v.y); a[2] = __uint_as_float(v.z); a[3] = __uint_as_float(v.w); }
            else a[0] = add[(size_t)t * D + c];
        }
        for (u32 j = 0; j < k; ++j) {
            const float wj = w[(size_t)t * k + j];
            const size_t r = inv[(size_t)t * k + j];
            if (vec) { const U4 v = *(const U4*)(y + r * D + c);
                a[0] += wj * __uint_as_float(v.x); a[1] += wj * __uint_as_float(v.y);
                a[2] += wj * __uint_as_float(v.z); a[3] += wj * __uint_as_float(v.w); }
            else a[0] += wj * y[r * D + c];
        }
        if (vec) { U4 o; o.x = __float_as_uint(a[0]); o.y = __float_as_uint(a[1]); o.z = __float_as_uint(a[2]); o.w = __float_as_uint(a[3]);
            *(U4*)(out + (size_t)t * D + c) = o; }
        else out[(size_t)t * D + c] = a[0];
    }
}

extern "C" __global__ void combine_bf16(const u16* __restrict__ y, const u32* __restrict__ inv,
                                        const float* __restrict__ w, const u16* __restrict__ add,
                                        u16* __restrict__ out, u32 S, u32 k, u32 D, u32 vec) {
    const u32 per = vec ? 8u : 1u;
    const u32 cpr = D / per;
    const size_t total = (size_t)S * cpr;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const u32 t = (u32)(i / cpr), c = (u32)(i % cpr) * per;
        float a[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) a[q] = 0.f;
        if (add) {
            if (vec) { const U4 v = *(const U4*)(add + (size_t)t * D + c);
                const u32 vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int q = 0; q < 4; ++q) { a[2*q] = bf2f((u16)(vv[q] & 0xffffu)); a[2*q+1] = bf2f((u16)(vv[q] >> 16)); } }
            else a[0] = bf2f(add[(size_t)t * D + c]);
        }
        for (u32 j = 0; j < k; ++j) {
            const float wj = w[(size_t)t * k + j];
            const size_t r = inv[(size_t)t * k + j];
            if (vec) { const U4 v = *(const U4*)(y + r * D + c);
                const u32 vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int q = 0; q < 4; ++q) { a[2*q] += wj * bf2f((u16)(vv[q] & 0xffffu)); a[2*q+1] += wj * bf2f((u16)(vv[q] >> 16)); } }
            else a[0] += wj * bf2f(y[r * D + c]);
        }
        if (vec) { u32 vv[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) vv[q] = (u32)f2bf(a[2*q]) | ((u32)f2bf(a[2*q+1]) << 16);
            U4 o; o.x = vv[0]; o.y = vv[1]; o.z = vv[2]; o.w = vv[3];
            *(U4*)(out + (size_t)t * D + c) = o; }
        else out[(size_t)t * D + c] = f2bf(a[0]);
    }
}

// ---------------------------------------------------------------------------------------
// 5. Combine's backward (training), from the gradient g = dout [S, D] of its output, f32 or
//    bf16 (T; f32 maths, each result rounded once): towards the expert outputs,
//    dy[r, :] = w[order[r]] * g[order[r] / k, :] in g's dtype (the gathered, scaled rows: one
//    product, rounded as the composite's broadcast multiply); towards the weights,
//    dw[order[r]] = <g[order[r] / k, :], y[r, :]> in f32, one warp per row (the dot product in
//    lane order, then a butterfly: another summation order than the CPU's, same maths).
// ---------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void gather_rows_scaled_body(const T* __restrict__ g, const float* __restrict__ w,
                                                        const u32* __restrict__ order, u32 k, u32 R, u32 D,
                                                        T* __restrict__ dy) {
    const size_t total = (size_t)R * D;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / D, c = i % D;
        const u32 slot = order[r];
        Io<T>::store(dy, i, __fmul_rn(Io<T>::load(g, (size_t)(slot / k) * D + c), w[slot]));
    }
}
extern "C" __global__ void gather_rows_scaled_f32(const float* g, const float* w, const u32* order, u32 k, u32 R, u32 D, float* dy) {
    gather_rows_scaled_body<float>(g, w, order, k, R, D, dy);
}
extern "C" __global__ void gather_rows_scaled_bf16(const u16* g, const float* w, const u32* order, u32 k, u32 R, u32 D, u16* dy) {
    gather_rows_scaled_body<u16>(g, w, order, k, R, D, dy);
}

template <typename G, typename Y>
__device__ __forceinline__ void combine_weight_grad_body(const G* __restrict__ g, const Y* __restrict__ y,
                                                         const u32* __restrict__ order, u32 k, u32 R, u32 D,
                                                         float* __restrict__ dw) {
    const u32 lane = threadIdx.x & 31u;
    const size_t warps = ((size_t)gridDim.x * blockDim.x) >> 5;
    for (size_t r = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < R; r += warps) {
        const u32 slot = order[r];
        const size_t gt = (size_t)(slot / k) * D, yr = r * D;
        float acc = 0.f;
        for (u32 c = lane; c < D; c += 32u) acc = fmaf(Io<G>::load(g, gt + c), Io<Y>::load(y, yr + c), acc);
        acc = warp_sum(acc);
        if (lane == 0) dw[slot] = acc;
    }
}
extern "C" __global__ void combine_weight_grad_f32(const float* g, const float* y, const u32* order, u32 k, u32 R, u32 D, float* dw) {
    combine_weight_grad_body<float, float>(g, y, order, k, R, D, dw);
}
extern "C" __global__ void combine_weight_grad_bf16(const u16* g, const u16* y, const u32* order, u32 k, u32 R, u32 D, float* dw) {
    combine_weight_grad_body<u16, u16>(g, y, order, k, R, D, dw);
}

// [0, s]: the offsets of a single "expert" owning all rows (dense SwiGLU through the grouped GEMM)
extern "C" __global__ void dense_offsets(u32* o, u32 s) {
    if (threadIdx.x == 0) { o[0] = 0u; o[1] = s; }
}
