// The routed experts' elementwise backwards (src/kernels/routed_grad.rs), one pass each, for f32
// and bf16 tensors (T; f32 maths in the same order for both, each bf16 result rounded once).
// SwiGLU (DiT-MoE):
// from the recomputed gate and up projections g, u and the gradient dh of h = silu(g) * u,
//   h  = silu(g) * u                       (the down projection's input, for its gradient)
//   du = dh * silu(g)
//   dg = dh * u * sig * (1 + g * (1 - sig))  with sig = sigmoid(g)
// As candle ops this is ten passes over the [rows, I] tensors (about 25 ms of a training step of
// the bundled model on an H100, by Nsight Compute). The operations are rounded in the composite's order.
// Compiled after kernels/common.cuh, like every source here (its Io<T> loads and stores).

// h may be null (the shared expert's backward needs no recomputed h: its op kept the value).
template <typename T>
__device__ __forceinline__ void swiglu_bwd(const T* g, const T* u, const T* dh, T* h, T* dg, T* du, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float gi = Io<T>::load(g, i), ui = Io<T>::load(u, i), dhi = Io<T>::load(dh, i);
        const float sig = 1.f / (1.f + expf(-gi));  // candle's sigmoid kernel
        const float act = __fmul_rn(gi, sig);
        if (h) Io<T>::store(h, i, __fmul_rn(act, ui));
        Io<T>::store(du, i, __fmul_rn(dhi, act));
        // ((dh * u) * (sig * ((g * (1 - sig)) + 1)))
        const float inner = __fadd_rn(__fmul_rn(gi, __fmaf_rn(sig, -1.f, 1.f)), 1.f);
        Io<T>::store(dg, i, __fmul_rn(__fmul_rn(dhi, ui), __fmul_rn(sig, inner)));
    }
}
extern "C" __global__ void swiglu_bwd_f32(const float* g, const float* u, const float* dh, float* h, float* dg, float* du, u64 n) {
    swiglu_bwd<float>(g, u, dh, h, dg, du, n);
}
extern "C" __global__ void swiglu_bwd_bf16(const u16* g, const u16* u, const u16* dh, u16* h, u16* dg, u16* du, u64 n) {
    swiglu_bwd<u16>(g, u, dh, h, dg, du, n);
}

// ProMoE's GELU experts (candle's tanh-approximation `gelu`): dpre = dh * gelu'(pre),
//   gelu'(x) = 0.5 (1 + t) + 0.5 c x (1 - t²)(1 + 3 a x²),  t = tanh(c (x + a x³)),
// rounded in the order of `gelu_tanh_backward`'s candle ops; a = 0.044715, c = sqrt(2 / pi), and
// the products a, 3a, c, 0.5 c come as f32 arguments (the constants of candle's affine ops).
template <typename T>
__device__ __forceinline__ void gelu_tanh_bwd(const T* pre, const T* dh, T* dpre, u64 n, float a, float a3, float c, float half_c) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float x = Io<T>::load(pre, i);
        const float x2 = __fmul_rn(x, x);
        const float t = tanhf(__fmaf_rn(__fmul_rn(x, __fmaf_rn(x2, a, 1.f)), c, 0.f));
        const float outer = __fmaf_rn(t, 0.5f, 0.5f);
        const float inner = __fmul_rn(__fmul_rn(x, __fmaf_rn(__fmul_rn(t, t), -1.f, 1.f)), __fmaf_rn(x2, a3, 1.f));
        Io<T>::store(dpre, i, __fmul_rn(Io<T>::load(dh, i), __fadd_rn(outer, __fmaf_rn(inner, half_c, 0.f))));
    }
}
extern "C" __global__ void gelu_tanh_bwd_f32(const float* pre, const float* dh, float* dpre, u64 n, float a, float a3, float c, float half_c) {
    gelu_tanh_bwd<float>(pre, dh, dpre, n, a, a3, c, half_c);
}
extern "C" __global__ void gelu_tanh_bwd_bf16(const u16* pre, const u16* dh, u16* dpre, u64 n, float a, float a3, float c, float half_c) {
    gelu_tanh_bwd<u16>(pre, dh, dpre, n, a, a3, c, half_c);
}
