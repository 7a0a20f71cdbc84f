// Transformer-block kernels for ditmoe's GPU inference path: the memory-bound work around the
// matmuls of a DiT block, each fused into one pass and each taking its layout as scalar
// arguments (candle's strided kernels upload their dims and strides from the host on every
// call, which costs a copy per op and cannot be replayed from a CUDA graph).
//
//  ln_modulate      LayerNorm (no affine, eps) of a row, then x*(1+scale)+shift (official
//                   `modulate(norm(x), shift, scale)`), stored in the matmul dtype
//  gated_residual   x + gate * (y + bias)             (`x = x + gate_msa.unsqueeze(1) * attn(..)`)
//  bias_cast        y + bias, converted               (`nn.Linear`'s bias, then the caller's dtype)
//  split_qkv        packed qkv [B,T,3,H,hd] (+bias) -> q,k,v [B,H,T,hd], with the flash form's
//                   per-head LayerNorm on q and k and its float16 rounding
//  softmax_scaled   softmax(scale * s) over rows, f32 maths
//  strided_copy     any view (permute, narrow, broadcast) made contiguous
//
// Modulation vectors live in the adaLN output `mods` [N, C*D] f32 (chunk c at column c*D):
// token row m belongs to image m / T. Header-free: bf16 is handled as raw u16 bits.
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf2f(u16 v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ u16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                        // round to nearest even
    return (u16)(u >> 16);
}
// float -> float16 -> float, round to nearest even (normal float16 range; LayerNorm outputs).
__device__ __forceinline__ float round_f16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) >= 0x7f800000u) return f;
    u += 0xfffu + ((u >> 13) & 1u);
    u &= ~0x1fffu;
    return __uint_as_float(u);
}

template <typename T> struct Io;
template <> struct Io<float> {
    static __device__ __forceinline__ float load(const float* p, u64 i) { return p[i]; }
    static __device__ __forceinline__ void store(float* p, u64 i, float v) { p[i] = v; }
};
template <> struct Io<u16> {
    static __device__ __forceinline__ float load(const u16* p, u64 i) { return bf2f(p[i]); }
    static __device__ __forceinline__ void store(u16* p, u64 i, float v) { p[i] = f2bf(v); }
};

// Block-wide sum of one float per thread (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (u32 w = 0; w < (blockDim.x >> 5); ++w) t += shared[w];
    return t;
}
__device__ __forceinline__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float t = NEG_INF;
    for (u32 w = 0; w < (blockDim.x >> 5); ++w) t = fmaxf(t, shared[w]);
    return t;
}

// One block per token row; two passes over the row (mean, then centred variance) like
// torch's LayerNorm, the row re-read from L1/L2.
template <typename OUT>
__device__ void ln_modulate_body(const float* __restrict__ x, const float* __restrict__ mods, u32 mods_stride,
                                 u32 shift_off, u32 scale_off, u32 T, u32 D, float eps, OUT* __restrict__ out) {
    __shared__ float red[32];
    const u64 m = blockIdx.x;
    const float* row = x + m * D;
    float s = 0.f;
    for (u32 j = threadIdx.x; j < D; j += blockDim.x) s += row[j];
    const float mean = block_sum(s, red) / (float)D;
    float v = 0.f;
    for (u32 j = threadIdx.x; j < D; j += blockDim.x) { const float c = row[j] - mean; v += c * c; }
    const float rstd = rsqrtf(block_sum(v, red) / (float)D + eps);
    const float* md = mods + (u64)(m / T) * mods_stride;
    for (u32 j = threadIdx.x; j < D; j += blockDim.x) {
        const float n = (row[j] - mean) * rstd;
        Io<OUT>::store(out, m * D + j, n * (1.f + md[scale_off + j]) + md[shift_off + j]);
    }
}
extern "C" __global__ void ln_modulate_f32(const float* x, const float* mods, u32 ms, u32 sh, u32 sc, u32 T, u32 D, float eps, float* out) {
    ln_modulate_body<float>(x, mods, ms, sh, sc, T, D, eps, out);
}
extern "C" __global__ void ln_modulate_bf16(const float* x, const float* mods, u32 ms, u32 sh, u32 sc, u32 T, u32 D, float eps, u16* out) {
    ln_modulate_body<u16>(x, mods, ms, sh, sc, T, D, eps, out);
}

// out = x + gate[m / T] * (y + bias), elementwise over [M, D]; x and out f32.
template <typename Y>
__device__ void gated_residual_body(const float* __restrict__ x, const Y* __restrict__ y, const Y* __restrict__ bias,
                                    const float* __restrict__ mods, u32 mods_stride, u32 gate_off, u32 T, u32 D,
                                    u64 total, float* __restrict__ out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 m = i / D;
        const u32 j = (u32)(i - m * D);
        float h = Io<Y>::load(y, i);
        if (bias) h += Io<Y>::load(bias, j);
        out[i] = x[i] + mods[(m / T) * mods_stride + gate_off + j] * h;
    }
}
extern "C" __global__ void gated_residual_f32(const float* x, const float* y, const float* b, const float* mods, u32 ms, u32 g, u32 T, u32 D, u64 n, float* out) {
    gated_residual_body<float>(x, y, b, mods, ms, g, T, D, n, out);
}
extern "C" __global__ void gated_residual_bf16(const float* x, const u16* y, const u16* b, const float* mods, u32 ms, u32 g, u32 T, u32 D, u64 n, float* out) {
    gated_residual_body<u16>(x, y, b, mods, ms, g, T, D, n, out);
}

// out = y + bias[col] over [rows, N], converted from IN to OUT (f32 maths).
template <typename IN, typename OUT>
__device__ void bias_cast_body(const IN* __restrict__ y, const IN* __restrict__ bias, u32 N, u64 total, OUT* __restrict__ out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        float v = Io<IN>::load(y, i);
        if (bias) v += Io<IN>::load(bias, i % N);
        Io<OUT>::store(out, i, v);
    }
}
extern "C" __global__ void bias_cast_bf16_f32(const u16* y, const u16* b, u32 N, u64 n, float* out) { bias_cast_body<u16, float>(y, b, N, n, out); }
extern "C" __global__ void bias_cast_bf16_bf16(const u16* y, const u16* b, u32 N, u64 n, u16* out) { bias_cast_body<u16, u16>(y, b, N, n, out); }
extern "C" __global__ void bias_cast_f32_f32(const float* y, const float* b, u32 N, u64 n, float* out) { bias_cast_body<float, float>(y, b, N, n, out); }

// One warp per (token, head) pair: reads the q, k and v rows of that head from the packed
// [B, T, 3, H, hd] projection, adds the bias, optionally LayerNorms q and k over hd (affine
// weights f32, then float16 rounding as the official `.half()`), writes [B, H, T, hd].
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
        float mean = 0.f, rstd = 1.f;
        if (norm) {
            float s = 0.f;
            for (u32 j = lane; j < hd; j += 32) s += Io<E>::load(qkv, src + j) + (bias ? Io<E>::load(bias, boff + j) : 0.f);
            for (int x = 16; x > 0; x >>= 1) s += __shfl_xor_sync(0xffffffffu, s, x);
            mean = s / (float)hd;
            float var = 0.f;
            for (u32 j = lane; j < hd; j += 32) {
                const float c = Io<E>::load(qkv, src + j) + (bias ? Io<E>::load(bias, boff + j) : 0.f) - mean;
                var += c * c;
            }
            for (int x = 16; x > 0; x >>= 1) var += __shfl_xor_sync(0xffffffffu, var, x);
            rstd = rsqrtf(var / (float)hd + eps);
        }
        for (u32 j = lane; j < hd; j += 32) {
            float val = Io<E>::load(qkv, src + j) + (bias ? Io<E>::load(bias, boff + j) : 0.f);
            if (norm) val = round_f16((val - mean) * rstd * nw[j] + nb[j]);
            Io<E>::store(o, dst + j, val);
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

// A view of up to 6 dims (shape, element strides, start offset) copied to a contiguous buffer.
struct View6 {
    u32 dims[6];
    u64 strides[6];
    u64 offset;
    u32 rank;
};
template <typename E>
__device__ void strided_copy_body(const E* __restrict__ src, View6 v, u64 total, E* __restrict__ out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 rem = i, off = v.offset;
        for (int d = (int)v.rank - 1; d >= 0; --d) {
            const u64 idx = rem % v.dims[d];
            rem /= v.dims[d];
            off += idx * v.strides[d];
        }
        out[i] = src[off];
    }
}
extern "C" __global__ void strided_copy_u16(const u16* src, View6 v, u64 n, u16* out) { strided_copy_body<u16>(src, v, n, out); }
extern "C" __global__ void strided_copy_u32(const u32* src, View6 v, u64 n, u32* out) { strided_copy_body<u32>(src, v, n, out); }
