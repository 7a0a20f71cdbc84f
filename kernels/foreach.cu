// Multi-tensor ("foreach") kernels for the optimizer step, as PyTorch's fused/foreach AdamW and
// apex's multi_tensor_apply do it: a list of tensors is one virtual concatenation, and
// block b handles its elements [b*CHUNK, (b+1)*CHUNK), whichever tensors they fall in. One
// launch serves every parameter, instead of a dozen candle ops per parameter (the step of a
// 10 M-parameter model spent ~80 ms of host time in ~2500 small launches; see
// docs/benchmarks.md).
//
// The table `tab` (device u64s) holds `starts[0..=n]` (element offsets of each tensor in the
// concatenation) followed by one array of n device pointers per operand list.
//
// Rounding: the AdamW and EMA updates round after every operation exactly as the candle ops of
// the CPU path do (`affine` is one fma, `+ - * /` and sqrt are IEEE), so the fused update gives
// the same bits as those ops on the GPU; the `__f*_rn` intrinsics keep the compiler from
// contracting them into other fmas.
//
// Gradients come as f32 or bf16 (the `_f32` / `_bf16` entry points): a bf16 plan's gradients are
// read as they are and widened per element (exactly), as apex's FusedAdam and PyTorch's
// `_multi_tensor_adamw` read half-precision gradients against fp32 master weights, so no f32
// copy of the gradients is ever made. The AdamW update can also write the bf16 model copy of
// each master it updates (round to nearest even, as candle's f32 -> bf16 cast), in the same
// pass.
// Compiled after kernels/common.cuh (u64, u16, warp_sum, Io).

#define CHUNK 4096
#define THREADS 256

// The tensor holding element i: the largest t with starts[t] <= i (empty tensors share their
// start with the next one and are skipped).
__device__ __forceinline__ int tensor_of(const u64* starts, int n, u64 i) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (starts[mid] <= i) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// candle's `affine(x, mul, add)` kernel: `x * mul + add`, contracted to one fma.
__device__ __forceinline__ float affine(float x, float mul, float add) { return __fmaf_rn(x, mul, add); }

// Visits this thread's elements of this block's chunk in order: f(tensor, index in tensor).
template <typename F>
__device__ __forceinline__ void for_each_element(const u64* starts, int n, F f) {
    const u64 total = starts[n];
    const u64 base = (u64)blockIdx.x * CHUNK;
    const u64 end = base + CHUNK < total ? base + CHUNK : total;
    u64 i = base + threadIdx.x;
    if (i >= end) return;
    int t = tensor_of(starts, n, i);
    for (; i < end; i += THREADS) {
        while (i >= starts[t + 1]) t++;
        f(t, i - starts[t]);
    }
}

__device__ __forceinline__ float block_sum(float s) {
    __shared__ float warp_sums[THREADS / 32];
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = s;
    __syncthreads();
    s = threadIdx.x < THREADS / 32 ? warp_sums[threadIdx.x] : 0.f;
    if (threadIdx.x < 32) s = warp_sum(s);
    return s;
}

// Per-block sums of squares (operand list 0, of G = float or bf16 bits); the fixed split and
// reduction order make the result the same on every run.
template <typename G>
__device__ __forceinline__ void sumsq_partial(const u64* tab, int n, float* partial) {
    const G* const* x = (const G* const*)(tab + n + 1);
    float s = 0.f;
    for_each_element(tab, n, [&](int t, u64 j) { float v = Io<G>::load(x[t], j); s = fmaf(v, v, s); });
    s = block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
extern "C" __global__ void foreach_sumsq_partial_f32(const u64* tab, int n, float* partial) { sumsq_partial<float>(tab, n, partial); }
extern "C" __global__ void foreach_sumsq_partial_bf16(const u64* tab, int n, float* partial) { sumsq_partial<u16>(tab, n, partial); }

// One block: the sum of the per-block partials.
extern "C" __global__ void foreach_sum_partials(const float* partial, int nb, float* out) {
    float s = 0.f;
    for (int i = threadIdx.x; i < nb; i += THREADS) s += partial[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = s;
}

// torch.optim.AdamW's update (`_single_tensor_adamw`), in place, with the gradient first
// widened to f32 and scaled by `gscale` (global-norm clipping's coefficient, 1 when not
// clipping):
//   g *= gscale; m = m*b1 + g*(1-b1); v = v*b2 + g²*(1-b2); p *= decay (if apply_decay);
//   p -= (m / (sqrt(v) * inv_bc2 + eps)) * step        with step = lr / bc1;
// and with `copy`, the bf16 model copy c = bf16(p) of the new master.
// Operand lists: p, g (G = float or bf16 bits), m, v, then c when `copy`.
template <typename G>
__device__ __forceinline__ void adamw(const u64* tab, int n, int copy, float gscale, float b1, float omb1, float b2, float omb2,
                                      float decay, int apply_decay, float inv_bc2, float eps, float step) {
    float* const* p = (float* const*)(tab + n + 1);
    const G* const* g = (const G* const*)(tab + 2 * n + 1);
    float* const* m = (float* const*)(tab + 3 * n + 1);
    float* const* v = (float* const*)(tab + 4 * n + 1);
    u16* const* c = (u16* const*)(tab + 5 * n + 1);
    for_each_element(tab, n, [&](int t, u64 j) {
        float gj = affine(Io<G>::load(g[t], j), gscale, 0.f);
        float mj = __fadd_rn(affine(m[t][j], b1, 0.f), affine(gj, omb1, 0.f));
        float vj = __fadd_rn(affine(v[t][j], b2, 0.f), affine(__fmul_rn(gj, gj), omb2, 0.f));
        float pj = apply_decay ? affine(p[t][j], decay, 0.f) : p[t][j];
        float denom = affine(affine(sqrtf(vj), inv_bc2, 0.f), 1.f, eps);
        pj = __fsub_rn(pj, affine(__fdiv_rn(mj, denom), step, 0.f));
        p[t][j] = pj;
        m[t][j] = mj;
        v[t][j] = vj;
        if (copy) c[t][j] = f2bf(pj);
    });
}
#define ADAMW_ARGS const u64* tab, int n, int copy, float gscale, float b1, float omb1, float b2, float omb2, float decay, int apply_decay, float inv_bc2, float eps, float step
#define ADAMW_CALL tab, n, copy, gscale, b1, omb1, b2, omb2, decay, apply_decay, inv_bc2, eps, step
extern "C" __global__ void foreach_adamw_f32(ADAMW_ARGS) { adamw<float>(ADAMW_CALL); }
extern "C" __global__ void foreach_adamw_bf16(ADAMW_ARGS) { adamw<u16>(ADAMW_CALL); }

// The EMA of the weights, in place (official `update_ema`): e = e*decay + p*(1-decay).
// Operand lists: e, p.
extern "C" __global__ void foreach_ema(const u64* tab, int n, float decay, float omd) {
    float* const* e = (float* const*)(tab + n + 1);
    const float* const* p = (const float* const*)(tab + 2 * n + 1);
    for_each_element(tab, n, [&](int t, u64 j) { e[t][j] = __fadd_rn(affine(e[t][j], decay, 0.f), affine(p[t][j], omd, 0.f)); });
}
