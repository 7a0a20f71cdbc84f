// Transformer-block kernels for ditmoe's GPU inference path: the memory-bound work around the
// matmuls of a DiT block, each fused into one pass and each taking its layout as scalar
// arguments (candle's strided kernels upload their dims and strides from the host on every
// call, which costs a copy per op and cannot be replayed from a CUDA graph).
//
//  ln_modulate      LayerNorm (no affine, eps) of a row, then x*(1+scale)+shift (official
//                   `modulate(norm(x), shift, scale)`), stored in the matmul dtype; one warp
//                   per row, the row in registers
//  residual_ln_modulate  the same after x_mid = x + gate * (y + bias) (both outputs kept)
//  gated_residual   x + gate * (y + bias)             (`x = x + gate_msa.unsqueeze(1) * attn(..)`)
//                   with y a Linear's output before its bias, y + bias rounded to y's dtype as
//                   the Linear's own output would be (so the bias costs no separate pass)
//  split_qkv        packed qkv [B,T,3,H,hd] (+bias) -> q,k,v [B,H,T,hd], with the flash form's
//                   per-head LayerNorm on q and k and its float16 rounding (a thread-per-row
//                   kernel for bf16 with hd % 8 == 0, a warp-per-row one otherwise)
//  softmax_scaled   softmax(scale * s) over rows, f32 maths
//  flash_attn       softmax(scale q kᵀ) v without the T x T scores in memory (bf16, mma.sync);
//                   flash_attn_qkn also applies the flash form's q/k LayerNorm (no split pass)
//
// Modulation vectors live in the adaLN output `mods` [N, C*D] f32 (chunk c at column c*D):
// token row m belongs to image m / T. Compiled after kernels/common.cuh (bf16 as raw u16 bits,
// warp reductions).

// float -> float16 -> float, round to nearest even, with float16's overflow to infinity and
// its subnormals (as the CPU path's `to_dtype(F16)`): two cvts.
__device__ __forceinline__ float round_f16(float f) {
    unsigned short h;
    float r;
    asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(h) : "f"(f));
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(r) : "h"(h));
    return r;
}

// Block-wide sum of one float per thread (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_sum(float v, float* shared) {
    v = warp_sum(v);
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (u32 w = 0; w < (blockDim.x >> 5); ++w) t += shared[w];
    return t;
}
__device__ __forceinline__ float block_max(float v, float* shared) {
    v = warp_max(v);
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float t = NEG_INF;
    for (u32 w = 0; w < (blockDim.x >> 5); ++w) t = fmaxf(t, shared[w]);
    return t;
}

// Rows of D floats (D % 4 == 0, D <= 2048) held in registers as float4s: one warp per row,
// RV float4s per lane (RV = 4, 8, 12 or 16: D up to 512, 1024, 1536, 2048), so narrow rows
// keep few registers and more warps in flight.
__device__ __forceinline__ float4 ld4(const float* p, u64 i) { return *(const float4*)(p + i); }
__device__ __forceinline__ float4 ld4(const u16* p, u64 i) {
    const uint2 w = *(const uint2*)(p + i);
    return make_float4(bf2f((u16)(w.x & 0xffffu)), bf2f((u16)(w.x >> 16)), bf2f((u16)(w.y & 0xffffu)), bf2f((u16)(w.y >> 16)));
}
__device__ __forceinline__ void st4(float* p, u64 i, float4 v) { *(float4*)(p + i) = v; }
// Packed bf16 pairs (two to a u32), as the qkv split and the attention's q/k norm hold them.
// x + b of bf16 pairs, rounded to bf16 (a bf16 add; both packed two to a word)
__device__ __forceinline__ u32 add_bf16x2(u32 x, u32 b) {
    return pack_bf16(bf2f((u16)(x & 0xffffu)) + bf2f((u16)(b & 0xffffu)), bf2f((u16)(x >> 16)) + bf2f((u16)(b >> 16)));
}
// LayerNorm (then float16 rounding, stored as bf16) of one bf16 pair at columns j, j + 1,
// given the row's mean and rstd
__device__ __forceinline__ u32 ln_f16_pair(u32 x, float mean, float rstd, const float* w, const float* b, u32 j) {
    return pack_bf16(round_f16((bf2f((u16)(x & 0xffffu)) - mean) * rstd * w[j] + b[j]),
                     round_f16((bf2f((u16)(x >> 16)) - mean) * rstd * w[j + 1] + b[j + 1]));
}
// the same for the eight bf16 values of a 16-byte chunk (columns j .. j + 7 for the norm)
__device__ __forceinline__ uint4 add_bf16x8(uint4 x, uint4 b) {
    return make_uint4(add_bf16x2(x.x, b.x), add_bf16x2(x.y, b.y), add_bf16x2(x.z, b.z), add_bf16x2(x.w, b.w));
}
__device__ __forceinline__ uint4 ln_f16_x8(uint4 x, float mean, float rstd, const float* w, const float* b, u32 j) {
    return make_uint4(ln_f16_pair(x.x, mean, rstd, w, b, j), ln_f16_pair(x.y, mean, rstd, w, b, j + 2),
                      ln_f16_pair(x.z, mean, rstd, w, b, j + 4), ln_f16_pair(x.w, mean, rstd, w, b, j + 6));
}
// sum and sum of squared deviations of bf16 pairs, for the mean and variance of a row
__device__ __forceinline__ float sum_bf16x2(u32 x) { return bf2f((u16)(x & 0xffffu)) + bf2f((u16)(x >> 16)); }
__device__ __forceinline__ float sqdev_bf16x2(u32 x, float mean) {
    const float a = bf2f((u16)(x & 0xffffu)) - mean, c = bf2f((u16)(x >> 16)) - mean;
    return a * a + c * c;
}

__device__ __forceinline__ void st4(u16* p, u64 i, float4 v) {
    *(uint2*)(p + i) = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
}
// y + bias (four columns), rounded to Y's dtype: the value a Linear with that bias would have
// stored in it (RNE for bf16, as tensor_ops.cu's bias_cast).
__device__ __forceinline__ float4 add_bias(const float* b, u64 j, float4 h) {
    const float4 v = ld4(b, j);
    return make_float4(h.x + v.x, h.y + v.y, h.z + v.z, h.w + v.w);
}
__device__ __forceinline__ float4 add_bias(const u16* b, u64 j, float4 h) {
    const float4 v = ld4(b, j);
    const u32 lo = pack_bf16(h.x + v.x, h.y + v.y), hi = pack_bf16(h.z + v.z, h.w + v.w);
    return make_float4(__uint_as_float(lo << 16), __uint_as_float(lo & 0xffff0000u), __uint_as_float(hi << 16),
                       __uint_as_float(hi & 0xffff0000u));
}

// LayerNorm (no affine, eps) of each row, then modulate: out = n * (1 + scale) + shift. With
// RESID the row is first x_mid = x + gate * (y + bias) (stored f32; bias optional), the step
// from a block's attention to its MLP. Two passes over the registers (mean, then centred
// variance) like torch's LayerNorm. Row m's modulation is row m / T of mods.
template <typename Y, typename OUT, bool RESID, int ROW_V>
__device__ void row_ln_modulate_body(const float* __restrict__ x, const Y* __restrict__ y, const Y* __restrict__ bias,
                                     const float* __restrict__ mods,
                                     u32 mods_stride, u32 gate_off, u32 shift_off, u32 scale_off, u32 T, u32 D, float eps,
                                     u64 rows, float* __restrict__ x_mid, OUT* __restrict__ out) {
    const u32 lane = threadIdx.x & 31u;
    const u64 m = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (m >= rows) return;
    const float* md = mods + (m / T) * mods_stride;
    const u32 nv = D / 4u;
    const u64 base = m * D;
    float4 r[ROW_V];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < ROW_V; ++i) {
        const u32 c = lane + 32u * i;
        if (c < nv) {
            float4 v = ld4(x, base + 4u * c);
            if (RESID) {
                float4 h = ld4(y, base + 4u * c);
                if (bias) h = add_bias(bias, 4u * c, h);
                const float4 g = ld4(md, gate_off + 4u * c);
                v = make_float4(v.x + g.x * h.x, v.y + g.y * h.y, v.z + g.z * h.z, v.w + g.w * h.w);
                st4(x_mid, base + 4u * c, v);
            }
            r[i] = v;
            s += (v.x + v.y) + (v.z + v.w);
        }
    }
    const float mean = warp_sum(s) / (float)D;
    float var = 0.f;
#pragma unroll
    for (int i = 0; i < ROW_V; ++i) {
        if (lane + 32u * i < nv) {
            const float a = r[i].x - mean, b = r[i].y - mean, c = r[i].z - mean, d = r[i].w - mean;
            var += (a * a + b * b) + (c * c + d * d);
        }
    }
    const float rstd = rsqrtf(warp_sum(var) / (float)D + eps);
#pragma unroll
    for (int i = 0; i < ROW_V; ++i) {
        const u32 c = lane + 32u * i;
        if (c < nv) {
            const float4 sc = ld4(md, scale_off + 4u * c), sh = ld4(md, shift_off + 4u * c);
            const float4 v = r[i];
            st4(out, base + 4u * c,
                make_float4((v.x - mean) * rstd * (1.f + sc.x) + sh.x, (v.y - mean) * rstd * (1.f + sc.y) + sh.y,
                            (v.z - mean) * rstd * (1.f + sc.z) + sh.z, (v.w - mean) * rstd * (1.f + sc.w) + sh.w));
        }
    }
}
// names: ln_modulate_{f32|bf16}_v{RV}, residual_ln_modulate_{y}_{out}_v{RV}
#define LN_MOD(ON, O, RV) \
    extern "C" __global__ void ln_modulate_##ON##_v##RV(const float* x, const float* mods, u32 ms, u32 sh, u32 sc, u32 T, u32 D, float eps, \
                                                       u64 rows, O* out) { \
        row_ln_modulate_body<float, O, false, RV>(x, nullptr, nullptr, mods, ms, 0, sh, sc, T, D, eps, rows, nullptr, out); \
    }
#define RES_LN(YN, Y, ON, O, RV) \
    extern "C" __global__ void residual_ln_modulate_##YN##_##ON##_v##RV(const float* x, const Y* y, const Y* bias, const float* mods, u32 ms, \
                                                                      u32 g, u32 sh, u32 sc, u32 T, u32 D, float eps, u64 rows, float* x_mid, O* out) { \
        row_ln_modulate_body<Y, O, true, RV>(x, y, bias, mods, ms, g, sh, sc, T, D, eps, rows, x_mid, out); \
    }
#define ROW_KERNELS(RV) \
    LN_MOD(f32, float, RV) \
    LN_MOD(bf16, u16, RV) \
    RES_LN(f32, float, f32, float, RV) \
    RES_LN(bf16, u16, f32, float, RV) \
    RES_LN(f32, float, bf16, u16, RV) \
    RES_LN(bf16, u16, bf16, u16, RV)
ROW_KERNELS(4)
ROW_KERNELS(8)
ROW_KERNELS(12)
ROW_KERNELS(16)

// out = x + gate[m / T] * (y + bias) over [M, D] (D % 4 == 0), four elements per thread; x
// and out f32.
template <typename Y>
__device__ void gated_residual_body(const float* __restrict__ x, const Y* __restrict__ y, const Y* __restrict__ bias,
                                    const float* __restrict__ mods, u32 mods_stride, u32 gate_off, u32 T, u32 D,
                                    u64 total, float* __restrict__ out) {
    for (u64 i = 4u * ((u64)blockIdx.x * blockDim.x + threadIdx.x); i < total; i += 4u * (u64)gridDim.x * blockDim.x) {
        const u64 m = i / D;
        const u32 j = (u32)(i - m * D);
        float4 h = ld4(y, i);
        if (bias) h = add_bias(bias, j, h);
        const float4 v = ld4(x, i), g = ld4(mods, (m / T) * mods_stride + gate_off + j);
        st4(out, i, make_float4(v.x + g.x * h.x, v.y + g.y * h.y, v.z + g.z * h.z, v.w + g.w * h.w));
    }
}
extern "C" __global__ void gated_residual_f32(const float* x, const float* y, const float* b, const float* mods, u32 ms, u32 g, u32 T, u32 D, u64 n, float* out) {
    gated_residual_body<float>(x, y, b, mods, ms, g, T, D, n, out);
}
extern "C" __global__ void gated_residual_bf16(const float* x, const u16* y, const u16* b, const float* mods, u32 ms, u32 g, u32 T, u32 D, u64 n, float* out) {
    gated_residual_body<u16>(x, y, b, mods, ms, g, T, D, n, out);
}


// One warp per (token, head) pair: reads the q, k and v rows of that head from the packed
// [B, T, 3, H, hd] projection, adds the bias, optionally LayerNorms q and k over hd (affine
// weights f32, then float16 rounding as the official `.half()`), writes [B, H, T, hd].
// Each lane holds element pairs 2*lane + 64*i (hd even, at most 256) in registers, so every
// row is read once, in 32-bit (bf16) or 64-bit (f32) accesses.
template <typename E>
__device__ void split_qkv_body(const E* __restrict__ qkv, const E* __restrict__ bias,
                               const float* __restrict__ qw, const float* __restrict__ qb,
                               const float* __restrict__ kw, const float* __restrict__ kb, float eps,
                               u32 B, u32 T, u32 H, u32 hd, E* __restrict__ q, E* __restrict__ k, E* __restrict__ v) {
    const u32 lane = threadIdx.x & 31u;
    const u64 pair = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (pair >= (u64)B * T * H) return;
    const u32 h = (u32)(pair % H);
    const u64 bt = pair / H;  // b * T + t
    const u32 t = (u32)(bt % T);
    const u64 b = bt / T;
    const u32 D = H * hd;
    const u64 dst = ((b * H + h) * T + t) * hd;
    for (u32 which = 0; which < 3; ++which) {
        const u64 src = bt * 3 * D + (u64)which * D + (u64)h * hd;
        const u32 boff = which * D + h * hd;
        E* o = which == 0 ? q : (which == 1 ? k : v);
        const float* nw = which == 0 ? qw : kw;
        const float* nb = which == 0 ? qb : kb;
        const bool norm = which < 2 && nw != nullptr;
        float val[8];
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 j = 2u * lane + 64u * i;
            float a = 0.f, c = 0.f;
            if (j < hd) {
                Io<E>::load2(qkv, src + j, a, c);
                if (bias) {
                    float ba, bc;
                    Io<E>::load2(bias, boff + j, ba, bc);
                    a += ba;
                    c += bc;
                }
            }
            val[2 * i] = a;
            val[2 * i + 1] = c;
            s += a + c;
        }
        float mean = 0.f, rstd = 1.f;
        if (norm) {
            for (int x = 16; x > 0; x >>= 1) s += __shfl_xor_sync(0xffffffffu, s, x);
            mean = s / (float)hd;
            float var = 0.f;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (2u * lane + 64u * i < hd) {
                    const float ca = val[2 * i] - mean, cc = val[2 * i + 1] - mean;
                    var += ca * ca + cc * cc;
                }
            }
            for (int x = 16; x > 0; x >>= 1) var += __shfl_xor_sync(0xffffffffu, var, x);
            rstd = rsqrtf(var / (float)hd + eps);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 j = 2u * lane + 64u * i;
            if (j >= hd) continue;
            float a = val[2 * i], c = val[2 * i + 1];
            if (norm) {
                a = round_f16((a - mean) * rstd * nw[j] + nb[j]);
                c = round_f16((c - mean) * rstd * nw[j + 1] + nb[j + 1]);
            }
            Io<E>::store2(o, dst + j, a, c);
        }
    }
}
extern "C" __global__ void split_qkv_bf16(const u16* qkv, const u16* bias, const float* qw, const float* qb, const float* kw, const float* kb,
                                          float eps, u32 B, u32 T, u32 H, u32 hd, u16* q, u16* k, u16* v) {
    split_qkv_body<u16>(qkv, bias, qw, qb, kw, kb, eps, B, T, H, hd, q, k, v);
}
extern "C" __global__ void split_qkv_f32(const float* qkv, const float* bias, const float* qw, const float* qb, const float* kw, const float* kb,
                                         float eps, u32 B, u32 T, u32 H, u32 hd, float* q, float* k, float* v) {
    split_qkv_body<float>(qkv, bias, qw, qb, kw, kb, eps, B, T, H, hd, q, k, v);
}

// bf16 with hd % 8 == 0 and hd <= 128 (every DiT-MoE size): one thread per (image, q/k/v,
// head, token), the head's row read and written in 16-byte chunks and kept as packed bf16 (the
// biased projection rounded to bf16, as candle's bf16 add and the official bf16 Linear output
// are). The token index is the fastest, so a warp writes consecutive output rows and shares one
// bias and LayerNorm weight row (broadcast loads). The warp-per-pair kernel above moves 4 bytes
// per lane and leaves most lanes idle for hd = 72.
#define SPLIT_MAXC 16
extern "C" __global__ void split_qkv_rows_bf16(const u16* __restrict__ qkv, const u16* __restrict__ bias,
                                               const float* __restrict__ qw, const float* __restrict__ qb,
                                               const float* __restrict__ kw, const float* __restrict__ kb, float eps,
                                               u32 B, u32 T, u32 H, u32 hd, u16* __restrict__ q, u16* __restrict__ k,
                                               u16* __restrict__ v) {
    const u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (u64)B * 3u * H * T) return;
    const u32 t = (u32)(idx % T);
    u64 r = idx / T;
    const u32 h = (u32)(r % H);
    r /= H;
    const u32 which = (u32)(r % 3u);
    const u64 b = r / 3u;
    const u32 D = H * hd, nc = hd >> 3;
    const uint4* src = (const uint4*)(qkv + ((b * T + t) * 3u + which) * (u64)D + (u64)h * hd);
    const uint4* bsrc = bias ? (const uint4*)(bias + (u64)which * D + (u64)h * hd) : nullptr;
    uint4 x[SPLIT_MAXC];
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < SPLIT_MAXC; ++c) {
        if ((u32)c < nc) {
            uint4 w = src[c];
            if (bsrc) w = add_bf16x8(w, bsrc[c]);
            s += sum_bf16x2(w.x);
            s += sum_bf16x2(w.y);
            s += sum_bf16x2(w.z);
            s += sum_bf16x2(w.w);
            x[c] = w;
        }
    }
    const float* nw = which == 0 ? qw : kw;
    const float* nb = which == 0 ? qb : kb;
    if (which < 2 && nw != nullptr) {
        const float mean = s / (float)hd;
        float var = 0.f;
#pragma unroll
        for (int c = 0; c < SPLIT_MAXC; ++c) {
            if ((u32)c < nc) {
                var += sqdev_bf16x2(x[c].x, mean);
                var += sqdev_bf16x2(x[c].y, mean);
                var += sqdev_bf16x2(x[c].z, mean);
                var += sqdev_bf16x2(x[c].w, mean);
            }
        }
        const float rstd = rsqrtf(var / (float)hd + eps);
        // LayerNorm, then the official float16 rounding, stored as bf16
#pragma unroll
        for (int c = 0; c < SPLIT_MAXC; ++c) {
            if ((u32)c < nc) x[c] = ln_f16_x8(x[c], mean, rstd, nw, nb, 8u * c);
        }
    }
    u16* o = which == 0 ? q : (which == 1 ? k : v);
    uint4* dst = (uint4*)(o + ((b * H + h) * T + t) * (u64)hd);
#pragma unroll
    for (int c = 0; c < SPLIT_MAXC; ++c)
        if ((u32)c < nc) dst[c] = x[c];
}

// softmax(scale * s) of each row of `cols` values, one block per row, f32 maths.
template <typename E>
__device__ void softmax_scaled_body(const E* __restrict__ s, float scale, u32 cols, E* __restrict__ out) {
    __shared__ float red[32];
    const u64 base = (u64)blockIdx.x * cols;
    float m = NEG_INF;
    for (u32 j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, Io<E>::load(s, base + j) * scale);
    m = block_max(m, red);
    float sum = 0.f;
    for (u32 j = threadIdx.x; j < cols; j += blockDim.x) sum += __expf(Io<E>::load(s, base + j) * scale - m);
    const float inv = 1.f / block_sum(sum, red);
    for (u32 j = threadIdx.x; j < cols; j += blockDim.x) Io<E>::store(out, base + j, __expf(Io<E>::load(s, base + j) * scale - m) * inv);
}
extern "C" __global__ void softmax_scaled_bf16(const u16* s, float scale, u32 cols, u16* out) { softmax_scaled_body<u16>(s, scale, cols, out); }
extern "C" __global__ void softmax_scaled_f32(const float* s, float scale, u32 cols, float* out) { softmax_scaled_body<float>(s, scale, cols, out); }
// The same, one warp per row for short rows (a block of 128 threads per row left most of them
// idle at T = 64: 0.45 ms for the training attention's scores). Lane l plays threads l, 32 + l,
// 64 + l and 96 + l of that 128-thread block, in its order: the per-thread partial sums, the
// butterfly per warp and the warps summed from 0 in turn, so the results are the same bits.
template <typename E>
__device__ void softmax_scaled_warp_body(const E* __restrict__ s, float scale, u32 cols, u32 rows, E* __restrict__ out) {
    const u32 lane = threadIdx.x & 31u;
    const u64 row = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const u64 base = row * cols;
    float m = NEG_INF;
    for (u32 j = lane; j < cols; j += 32u) m = fmaxf(m, Io<E>::load(s, base + j) * scale);
    m = warp_max(m);
    float t = 0.f;
    for (u32 w = 0; w < 4u; ++w) {
        float sum = 0.f;
        for (u32 j = w * 32u + lane; j < cols; j += 128u) sum += __expf(Io<E>::load(s, base + j) * scale - m);
        t += warp_sum(sum);
    }
    const float inv = 1.f / t;
    for (u32 j = lane; j < cols; j += 32u) Io<E>::store(out, base + j, __expf(Io<E>::load(s, base + j) * scale - m) * inv);
}
extern "C" __global__ void softmax_scaled_warp_bf16(const u16* s, float scale, u32 cols, u32 rows, u16* out) { softmax_scaled_warp_body<u16>(s, scale, cols, rows, out); }
extern "C" __global__ void softmax_scaled_warp_f32(const float* s, float scale, u32 cols, u32 rows, float* out) { softmax_scaled_warp_body<float>(s, scale, cols, rows, out); }


// ---------------------------------------------------------------------------------------------
// Fused attention softmax(scale q kᵀ) v for bf16 q, k, v (FlashAttention-2's forward: online
// softmax over key tiles, nothing of size T x T in memory), read through FlashStrides (heads
// [B, H, T, hd], or the packed qkv projection itself, so no split pass is needed) and written
// straight into the merged-heads layout out [B, T, H*hd]. Reading the projection directly,
// its biases are folded in: q's is added as q is loaded; k's is dropped, since q.(k + b_k)
// shifts every score of a query row by the same q.b_k and softmax is shift-invariant; v's is
// added to the output, since each row's softmax weights sum to one. With NORM (the flash
// form, `FlashSelfMHAModified`), q and k are LayerNormed over hd and rounded to float16 as
// split_qkv_rows does, inside the kernel: q in registers as it is loaded (the four lanes of a
// row reduce with two shuffles), each k tile in shared memory once it has landed (b_k goes in
// first: LayerNorm is not shift-invariant per element), and b_v is added to each v tile with
// the bf16 rounding of the CPU path's v + b_v (folding it into the output instead flipped a
// bf16 routing near-tie in the `tiny-flash` fixture). This saves the split pass, which wrote
// q, k and v out for the attention to read back. mma.sync m16n8k16 (bf16 in, f32 accumulate,
// sm_80+); hd is padded with zeros to HDP, a multiple of 16. One warp per 16 query rows,
// WARPS (4 or 8) warps per block; key tiles of 64 keys staged row-major in shared memory by
// 16-byte cp.async loads, double-buffered so that the next tile loads while this one is
// computed (rows padded by 8 elements against bank conflicts): q kᵀ reads its B fragments
// as aligned 32-bit pairs, p v through ldmatrix.trans. P is rounded to bf16 for the second
// product, as flash attention does.
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
// 2^x in one MUFU instruction (exp2f adds a range fix-up around it); -inf -> 0, and results
// below float's normal range flush to zero, which the softmax sums do not notice
__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ void ldsm_x4_trans(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16u : 0u) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// Keys per tile; the k and v tiles of two key tiles are in shared memory at once (double
// buffering: the next tile's cp.async loads run while this one is computed).
#define FLASH_KT 64

// Where q, k and v live: element strides between images, heads and tokens of each (all
// multiples of 8 when hd % 8 == 0, for the 16-byte loads), so that the kernel reads both
// [B, H, T, hd] tensors and the packed [B, T, 3, H, hd] projection.
struct FlashStrides {
    u64 image[3], head[3], token[3];
};

// The flash form's per-head LayerNorm weights of q and k (f32 [hd] each), for NORM kernels.
struct QkNormArgs {
    const float *qw, *qb, *kw, *kb;
    float eps;
};

// NORM: the k tile (keys k0 .. k0 + KT - 1, rows KS apart) gets b_k, its LayerNorm and the
// float16 rounding, the v tile b_v, in place in shared memory (hd % 8 == 0). Four threads per
// key row, each with every fourth 16-byte chunk; rows past T stay zero.
template <int HDP, int KT, int KS>
__device__ __forceinline__ void flash_fix_kv_tile(u16* sK, u16* sV, u32 k0, u32 T, u32 hd, const u16* __restrict__ k_bias,
                                                  const u16* __restrict__ v_bias, const QkNormArgs& nrm) {
    constexpr int CPT = (HDP / 8 + 3) / 4;  // chunks per thread
    const u32 nc = hd >> 3, quad = threadIdx.x & 3u;
    for (u32 r = threadIdx.x >> 2; r < (u32)KT; r += blockDim.x >> 2) {
        const bool live = k0 + r < T;
        uint4 x[CPT];
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < CPT; ++i) {
            const u32 c = quad + 4u * i;
            if (live && c < nc) {
                x[i] = *(const uint4*)(sK + r * KS + 8u * c);
                if (k_bias) x[i] = add_bf16x8(x[i], *(const uint4*)(k_bias + 8u * c));
                s += sum_bf16x2(x[i].x) + sum_bf16x2(x[i].y) + sum_bf16x2(x[i].z) + sum_bf16x2(x[i].w);
            }
        }
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        const float mean = s / (float)hd;
        float var = 0.f;
#pragma unroll
        for (int i = 0; i < CPT; ++i)
            if (live && quad + 4u * i < nc)
                var += sqdev_bf16x2(x[i].x, mean) + sqdev_bf16x2(x[i].y, mean) + sqdev_bf16x2(x[i].z, mean) + sqdev_bf16x2(x[i].w, mean);
        var += __shfl_xor_sync(0xffffffffu, var, 1);
        var += __shfl_xor_sync(0xffffffffu, var, 2);
        const float rstd = rsqrtf(var / (float)hd + nrm.eps);
#pragma unroll
        for (int i = 0; i < CPT; ++i) {
            const u32 c = quad + 4u * i, j = 8u * c;
            if (live && c < nc) *(uint4*)(sK + r * KS + j) = ln_f16_x8(x[i], mean, rstd, nrm.kw, nrm.kb, j);
        }
    }
    if (v_bias) {
        for (u32 i = threadIdx.x; i < (u32)KT * nc; i += blockDim.x) {
            const u32 r = i / nc, j = 8u * (i % nc);
            if (k0 + r >= T) continue;
            uint4* p = (uint4*)(sV + r * KS + j);
            *p = add_bf16x8(*p, *(const uint4*)(v_bias + j));
        }
    }
}

template <int HDP, int WARPS, bool NORM>
__device__ void flash_attn_body(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                                const u16* __restrict__ q_bias, const u16* __restrict__ k_bias, const u16* __restrict__ v_bias,
                                QkNormArgs nrm, FlashStrides st, u32 T, u32 H, u32 hd, float scale_log2, u32 causal,
                                u16* __restrict__ out) {
    constexpr int KT = FLASH_KT;
    constexpr int KS = HDP + 8;   // row stride of the k/v tiles (u16), padded against bank conflicts
    extern __shared__ __align__(16) u16 flash_smem[];  // [2 buffers][k tile, v tile][KT * KS]
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 g = lane >> 2, tg = lane & 3u;
    const u32 bh = blockIdx.y;
    const u32 q0 = blockIdx.x * (16u * WARPS) + warp * 16u;
    const u32 b = bh / H, h = bh % H;
    const u16* qh = q + b * st.image[0] + h * st.head[0];
    const u16* kh = k + b * st.image[1] + h * st.head[1];
    const u16* vh = v + b * st.image[2] + h * st.head[2];
    const u64 qs = st.token[0], ks = st.token[1], vs = st.token[2];

    // k and v rows k0 .. k0 + KT - 1 into buffer `buf` (zeros past T and past hd)
    auto load_tile = [&](u32 k0, u32 buf) {
        u16* sK = flash_smem + buf * 2u * KT * KS;
        u16* sV = sK + KT * KS;
        if ((hd & 7u) == 0) {  // 16-byte chunks, asynchronous
            for (u32 i = threadIdx.x; i < (u32)KT * (HDP / 8); i += blockDim.x) {
                const u32 key = i / (HDP / 8), d = (i % (HDP / 8)) * 8u;
                const bool ok = k0 + key < T && d < hd;
                const u64 row = ok ? (u64)(k0 + key) : 0u;
                cp_async16(smem_u32(sK + key * KS + d), kh + row * ks + (ok ? d : 0u), ok);
                cp_async16(smem_u32(sV + key * KS + d), vh + row * vs + (ok ? d : 0u), ok);
            }
        } else {
            for (u32 i = threadIdx.x; i < (u32)KT * (HDP / 2); i += blockDim.x) {
                const u32 key = i / (HDP / 2), d = (i % (HDP / 2)) * 2u;
                const bool ok = k0 + key < T && d < hd;
                const u64 row = (u64)(k0 + key);
                *(u32*)(sK + key * KS + d) = ok ? *(const u32*)(kh + row * ks + d) : 0u;
                *(u32*)(sV + key * KS + d) = ok ? *(const u32*)(vh + row * vs + d) : 0u;
            }
        }
        cp_async_commit();
    };
    load_tile(0, 0);
    // causal (a decoder's prefill): query row r sees keys 0..=r, so the block's keys end after
    // its last row and tiles past a warp's first row mask the keys after each row
    const u32 k_end = causal ? min(T, (blockIdx.x + 1u) * 16u * WARPS) : T;

    u32 qa[HDP / 16][4];
#pragma unroll
    for (int c = 0; c < HDP / 16; ++c) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 row = q0 + g + (i & 1) * 8u, d = 16u * c + 2u * tg + (i >> 1) * 8u;
            u32 w = 0u;
            if (row < T && d < hd) {
                w = *(const u32*)(qh + (u64)row * qs + d);
                // the projection's q bias, rounded to bf16 with q as a bf16 add would
                if (q_bias) w = add_bf16x2(w, *(const u32*)(q_bias + h * hd + d));
            }
            qa[c][i] = w;
        }
    }
    if constexpr (NORM) {
        // LayerNorm of rows g (registers 0, 2) and g + 8 (1, 3): the row's hd values are spread
        // over the four lanes tg; columns past hd hold zeros and count in neither sum
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int c = 0; c < HDP / 16; ++c) {
            s0 += sum_bf16x2(qa[c][0]) + sum_bf16x2(qa[c][2]);
            s1 += sum_bf16x2(qa[c][1]) + sum_bf16x2(qa[c][3]);
        }
#pragma unroll
        for (int x = 1; x < 4; x <<= 1) {
            s0 += __shfl_xor_sync(0xffffffffu, s0, x);
            s1 += __shfl_xor_sync(0xffffffffu, s1, x);
        }
        const float mean0 = s0 / (float)hd, mean1 = s1 / (float)hd;
        float v0 = 0.f, v1 = 0.f;
#pragma unroll
        for (int c = 0; c < HDP / 16; ++c) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (16u * c + 2u * tg + (i >> 1) * 8u >= hd) continue;
                if (i & 1) v1 += sqdev_bf16x2(qa[c][i], mean1);
                else v0 += sqdev_bf16x2(qa[c][i], mean0);
            }
        }
#pragma unroll
        for (int x = 1; x < 4; x <<= 1) {
            v0 += __shfl_xor_sync(0xffffffffu, v0, x);
            v1 += __shfl_xor_sync(0xffffffffu, v1, x);
        }
        const float r0 = rsqrtf(v0 / (float)hd + nrm.eps), r1 = rsqrtf(v1 / (float)hd + nrm.eps);
#pragma unroll
        for (int c = 0; c < HDP / 16; ++c) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 d = 16u * c + 2u * tg + (i >> 1) * 8u;
                if (d < hd) qa[c][i] = (i & 1) ? ln_f16_pair(qa[c][i], mean1, r1, nrm.qw, nrm.qb, d) : ln_f16_pair(qa[c][i], mean0, r0, nrm.qw, nrm.qb, d);
            }
        }
    }
    float o[HDP / 8][4];
#pragma unroll
    for (int n = 0; n < HDP / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    for (u32 k0 = 0, t = 0; k0 < k_end; k0 += KT, ++t) {
        // prefetch the next tile into the other buffer (freed by the barrier at the end of the
        // previous iteration); an empty group at the end keeps the wait count uniform
        if (k0 + KT < k_end) load_tile(k0 + KT, (t + 1u) & 1u);
        else cp_async_commit();
        cp_async_wait1();
        __syncthreads();
        u16* sK = flash_smem + (t & 1u) * 2u * KT * KS;
        u16* sV = sK + KT * KS;
        if constexpr (NORM) {
            flash_fix_kv_tile<HDP, KT, KS>(sK, sV, k0, T, hd, k_bias ? k_bias + h * hd : nullptr, v_bias ? v_bias + h * hd : nullptr, nrm);
            __syncthreads();
        }
        float s[KT / 8][4];
#pragma unroll
        for (int j = 0; j < KT / 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int c = 0; c < HDP / 16; ++c) {
                const u16* kr = sK + (8 * j + g) * KS + 16 * c + 2 * tg;
                mma16816(s[j], qa[c], *(const u32*)kr, *(const u32*)(kr + 8));
            }
        }
        // The softmax's bookkeeping is most of a tile's instructions at these head sizes, so,
        // as FlashAttention-2 does: keys are masked only in a tile that runs past T; the max is
        // taken on the raw scores (scale > 0) and the scale goes into each exponent's FMA,
        // exp2(s * scale - m), with m kept scaled; the row sums l stay per lane (each lane sums
        // its own keys) and are reduced once, after the last tile.
        if (k0 + KT > T || (causal && k0 + KT > q0 + 1u)) {
#pragma unroll
            for (int j = 0; j < KT / 8; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const u32 key = k0 + 8u * j + 2u * tg + (i & 1), row = q0 + g + (i >> 1) * 8u;
                    if (key >= T || (causal && key > row)) s[j][i] = NEG_INF;
                }
        }
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int j = 0; j < KT / 8; ++j) {
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
#pragma unroll
        for (int x = 1; x < 4; x <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
        }
        // every tile has a key below T, so mx is finite and so are n0, n1; under the causal
        // mask a row may see none of a tile's keys (mx = -inf), but it saw key 0 in the first
        // tile, so m0, m1 and n0, n1 stay finite
        const float n0 = fmaxf(m0, mx0 * scale_log2), n1 = fmaxf(m1, mx1 * scale_log2);
        const float c0 = fast_exp2(m0 - n0), c1 = fast_exp2(m1 - n1);
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int j = 0; j < KT / 8; ++j) {
            s[j][0] = fast_exp2(fmaf(s[j][0], scale_log2, -n0));
            s[j][1] = fast_exp2(fmaf(s[j][1], scale_log2, -n0));
            s[j][2] = fast_exp2(fmaf(s[j][2], scale_log2, -n1));
            s[j][3] = fast_exp2(fmaf(s[j][3], scale_log2, -n1));
            sum0 += s[j][0] + s[j][1];
            sum1 += s[j][2] + s[j][3];
        }
        l0 = l0 * c0 + sum0;
        l1 = l1 * c1 + sum1;
        m0 = n0;
        m1 = n1;
#pragma unroll
        for (int n = 0; n < HDP / 8; ++n) {
            o[n][0] *= c0;
            o[n][1] *= c0;
            o[n][2] *= c1;
            o[n][3] *= c1;
        }
#pragma unroll
        for (int c = 0; c < KT / 16; ++c) {
            const u32 pa[4] = {pack_bf16(s[2 * c][0], s[2 * c][1]), pack_bf16(s[2 * c][2], s[2 * c][3]),
                               pack_bf16(s[2 * c + 1][0], s[2 * c + 1][1]), pack_bf16(s[2 * c + 1][2], s[2 * c + 1][3])};
#pragma unroll
            for (int n = 0; n < HDP / 8; n += 2) {
                // B fragments (k = key, n = d) of the row-major v tile for columns 8n and
                // 8n + 8, transposed by one ldmatrix x4: lanes 16-31 point at the second
                u32 b[4];
                ldsm_x4_trans(b[0], b[1], b[2], b[3], smem_u32(sV + (16 * c + (lane & 15u)) * KS + 8 * n + 8u * (lane >> 4)));
                mma16816(o[n], pa, b[0], b[1]);
                mma16816(o[n + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads();  // this buffer is refilled by the next iteration's prefetch
    }
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, x);
        l1 += __shfl_xor_sync(0xffffffffu, l1, x);
    }
    const u32 D = H * hd;
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
#pragma unroll
    for (int n = 0; n < HDP / 8; ++n) {
        const u32 d = 8u * n + 2u * tg;
        if (d >= hd) continue;
        const u32 r0 = q0 + g, r1 = q0 + g + 8u;
        // the v bias passes through unchanged: the softmax weights of a row sum to one
        float vb0 = 0.f, vb1 = 0.f;
        if (!NORM && v_bias) {
            vb0 = bf2f(v_bias[h * hd + d]);
            vb1 = bf2f(v_bias[h * hd + d + 1]);
        }
        if (r0 < T) *(u32*)(out + ((u64)b * T + r0) * D + h * hd + d) = pack_bf16(o[n][0] * inv0 + vb0, o[n][1] * inv0 + vb1);
        if (r1 < T) *(u32*)(out + ((u64)b * T + r1) * D + h * hd + d) = pack_bf16(o[n][2] * inv1 + vb0, o[n][3] * inv1 + vb1);
    }
}
#define FLASH_K(NAME, HDP, W, NORM, BOUNDS) \
    extern "C" __global__ void BOUNDS NAME(const u16* q, const u16* k, const u16* v, const u16* q_bias, const u16* k_bias, \
                                           const u16* v_bias, const float* qw, const float* qb, const float* kw, const float* kb, \
                                           float eps, FlashStrides st, u32 T, u32 H, u32 hd, float sl2, u32 causal, u16* out) { \
        flash_attn_body<HDP, W, NORM>(q, k, v, q_bias, k_bias, v_bias, QkNormArgs{qw, qb, kw, kb, eps}, st, T, H, hd, sl2, causal, out); \
    }
// flash_attn_bf16_*: q, k, v as they are (k_bias and the norm weights unused);
// flash_attn_qkn_bf16_*: the flash form's q/k LayerNorm in the kernel (NORM above)
#define FLASH(HDP, W) \
    FLASH_K(flash_attn_bf16_hd##HDP##_w##W, HDP, W, false, __launch_bounds__(32 * W)) \
    FLASH_K(flash_attn_qkn_bf16_hd##HDP##_w##W, HDP, W, true, __launch_bounds__(32 * W))
// 16 warps per SM (128 registers) up to head size 80: measured on an H100 at XL/2 (hd 72,
// T 256, batch 64) 0.161 ms against 0.187 ms with 130 registers and 8 warps per SM, despite
// a few spilled bytes at hd 80
#define FLASH_OCC2(HDP, W) \
    FLASH_K(flash_attn_bf16_hd##HDP##_w##W, HDP, W, false, __launch_bounds__(32 * W, 16 / W)) \
    FLASH_K(flash_attn_qkn_bf16_hd##HDP##_w##W, HDP, W, true, __launch_bounds__(32 * W, 16 / W))
FLASH_OCC2(16, 4)
FLASH_OCC2(32, 4)
FLASH_OCC2(64, 4)
FLASH_OCC2(80, 4)
FLASH(96, 4)
FLASH(128, 4)
FLASH_OCC2(16, 8)
FLASH_OCC2(32, 8)
FLASH_OCC2(64, 8)
FLASH_OCC2(80, 8)
FLASH(96, 8)
FLASH(128, 8)
