// Shared by the NVRTC sources in kernels/: src/kernels/*.rs compile each as this prelude
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
