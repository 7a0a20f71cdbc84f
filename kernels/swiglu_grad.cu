// The SwiGLU experts' elementwise backward (src/kernels/routed_grad.rs), f32, one pass:
// from the recomputed gate and up projections g, u and the gradient dh of h = silu(g) * u,
//   h  = silu(g) * u                       (the down projection's input, for its gradient)
//   du = dh * silu(g)
//   dg = dh * u * sig * (1 + g * (1 - sig))  with sig = sigmoid(g)
// As candle ops this was ten passes over the [rows, I] tensors (~25 ms of a training step of the
// bundled model, ncu job 30). The operations are rounded in the composite's order.
// Header-free (NVRTC needs no include path).

extern "C" __global__ void swiglu_bwd_f32(const float* g, const float* u, const float* dh, float* h, float* dg, float* du,
                                          unsigned long long n) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float gi = g[i], ui = u[i], dhi = dh[i];
        const float sig = 1.f / (1.f + expf(-gi));  // candle's sigmoid kernel
        const float act = __fmul_rn(gi, sig);
        h[i] = __fmul_rn(act, ui);
        du[i] = __fmul_rn(dhi, act);
        // ((dh * u) * (sig * ((g * (1 - sig)) + 1)))
        const float inner = __fadd_rn(__fmul_rn(gi, __fmaf_rn(sig, -1.f, 1.f)), 1.f);
        dg[i] = __fmul_rn(__fmul_rn(dhi, ui), __fmul_rn(sig, inner));
    }
}
