// Memory-bound tensor operations every model's layers use (src/nn/cuda.rs launches them): a
// Linear's bias and output cast in one pass, and the copy of a strided view to a contiguous
// buffer with its layout passed as kernel arguments (candle's strided kernels copy the layout
// from the host on every call, which a CUDA graph cannot replay).
// Compiled after kernels/common.cuh.

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
// The common case, 16 bytes at a time: the host has rewritten the view in 16-byte units (its
// innermost dim contiguous, every stride, the offset and the innermost size multiples of 16
// bytes) and checked that every index fits 32 bits. The generic kernel's 64-bit divisions
// per dim and element made a (B, H, T, hd) f32 transpose ~7x slower than the copy itself.
extern "C" __global__ void strided_copy_v16(const uint4* __restrict__ src, View6 v, u32 total, uint4* __restrict__ out) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        u32 rem = i, off = (u32)v.offset;
        for (int d = (int)v.rank - 1; d >= 0; --d) {
            const u32 idx = rem % v.dims[d];
            rem /= v.dims[d];
            off += idx * (u32)v.strides[d];
        }
        out[i] = src[off];
    }
}
