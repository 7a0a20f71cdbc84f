// adaLN's modulate and gated residual for training (src/kernels/adaln_grad.rs), forward and
// backward, f32. x, h, y, out: (N, T, D) contiguous; per-sample vectors (shift, scale, gate):
// (N, D) contiguous.
//   modulate:       out = h * (1 + scale) + shift
//   gated residual: out = x + y * gate
// The forwards round as the candle ops they replace (affine `scale + 1` is one fma; the
// products and sums are separate IEEE operations), so training values do not move. The
// backwards write one packed buffer: the (N, T, D) data gradient, then each vector's gradient
// (sums over the T tokens of a sample, in token order).
// Header-free (NVRTC needs no include path).

extern "C" __global__ void modulate_f32(const float* h, const float* shift, const float* scale, float* out,
                                        unsigned long long total, unsigned t, unsigned d) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long v = (i / ((unsigned long long)t * d)) * d + i % d;
        out[i] = __fadd_rn(__fmul_rn(h[i], __fadd_rn(scale[v], 1.f)), shift[v]);
    }
}

// One block per sample; each thread walks its channels over the sample's tokens.
// packed = [dh (N*T*D) | dshift (N*D) | dscale (N*D)].
extern "C" __global__ void modulate_bwd_f32(const float* dout, const float* h, const float* scale, float* packed,
                                            unsigned n, unsigned t, unsigned d) {
    const unsigned s = blockIdx.x;
    const unsigned long long base = (unsigned long long)s * t * d;
    float* dh = packed;
    float* dshift = packed + (unsigned long long)n * t * d;
    float* dscale = dshift + (unsigned long long)n * d;
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x) {
        const float s1 = __fadd_rn(scale[(unsigned long long)s * d + c], 1.f);
        float gs = 0.f, gsc = 0.f;
        for (unsigned k = 0; k < t; k++) {
            const unsigned long long i = base + (unsigned long long)k * d + c;
            const float g = dout[i];
            dh[i] = __fmul_rn(g, s1);
            gs += g;
            gsc = fmaf(g, h[i], gsc);
        }
        dshift[(unsigned long long)s * d + c] = gs;
        dscale[(unsigned long long)s * d + c] = gsc;
    }
}

extern "C" __global__ void gated_add_f32(const float* x, const float* y, const float* gate, float* out,
                                         unsigned long long total, unsigned t, unsigned d) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long v = (i / ((unsigned long long)t * d)) * d + i % d;
        out[i] = __fadd_rn(x[i], __fmul_rn(y[i], gate[v]));
    }
}

// packed = [dy (N*T*D) | dgate (N*D)]; dx is dout itself.
extern "C" __global__ void gated_add_bwd_f32(const float* dout, const float* y, const float* gate, float* packed,
                                             unsigned n, unsigned t, unsigned d) {
    const unsigned s = blockIdx.x;
    const unsigned long long base = (unsigned long long)s * t * d;
    float* dy = packed;
    float* dgate = packed + (unsigned long long)n * t * d;
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x) {
        const float g = gate[(unsigned long long)s * d + c];
        float acc = 0.f;
        for (unsigned k = 0; k < t; k++) {
            const unsigned long long i = base + (unsigned long long)k * d + c;
            dy[i] = __fmul_rn(dout[i], g);
            acc = fmaf(dout[i], y[i], acc);
        }
        dgate[(unsigned long long)s * d + c] = acc;
    }
}
