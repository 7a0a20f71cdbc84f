// Shared by the NVRTC sources in kernels/: the Rust launchers compile each as this prelude
// followed by the file (`nvrtc_source!`), so the files stay header-free (NVRTC needs no include
// path at run time) without each one spelling out its own copy of these.
// bf16 is handled as raw u16 bits.
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf2f(u16 v) { return __uint_as_float(((u32)v) << 16); }
// float -> bf16, round to nearest even, one cvt (sm_80+; NaN stays NaN)
__device__ __forceinline__ u16 f2bf(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(f));
    return r;
}
// Two floats to packed bf16 (lo, hi), round to nearest even, in one cvt (sm_80+): the
// bit-twiddling version cost ~6 integer ops per value in every epilogue.
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Warp-wide sum and max (a butterfly: every lane gets the result).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Element access in f32 maths for f32 and bf16 (u16) tensors.
template <typename T> struct Io;
// load2/store2: elements i and i + 1 in one access (i even, so 4- or 8-byte aligned).
template <> struct Io<float> {
    static __device__ __forceinline__ float load(const float* p, u64 i) { return p[i]; }
    static __device__ __forceinline__ void store(float* p, u64 i, float v) { p[i] = v; }
    static __device__ __forceinline__ void load2(const float* p, u64 i, float& a, float& b) {
        const float2 w = *(const float2*)(p + i);
        a = w.x;
        b = w.y;
    }
    static __device__ __forceinline__ void store2(float* p, u64 i, float a, float b) { *(float2*)(p + i) = make_float2(a, b); }
};
template <> struct Io<u16> {
    static __device__ __forceinline__ float load(const u16* p, u64 i) { return bf2f(p[i]); }
    static __device__ __forceinline__ void store(u16* p, u64 i, float v) { p[i] = f2bf(v); }
    static __device__ __forceinline__ void load2(const u16* p, u64 i, float& a, float& b) {
        const u32 w = *(const u32*)(p + i);
        a = bf2f((u16)(w & 0xffffu));
        b = bf2f((u16)(w >> 16));
    }
    static __device__ __forceinline__ void store2(u16* p, u64 i, float a, float b) { *(u32*)(p + i) = (u32)f2bf(a) | ((u32)f2bf(b) << 16); }
};
