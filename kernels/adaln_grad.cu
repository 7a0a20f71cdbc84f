// adaLN's modulate and gated residual for training (src/kernels/adaln_grad.rs), forward and
// backward, in f32 maths. x, h, out: (N, T, D) f32 contiguous; y (the gated branch, a matmul's
// output) f32 or bf16 (Y); per-sample vectors (shift, scale, gate): (N, D) f32 contiguous.
//   modulate:       out = h * (1 + scale) + shift
//   gated residual: out = x + y * gate
// The forwards round as the candle ops they replace (affine `scale + 1` is one fma; the
// products and sums are separate IEEE operations), so training values do not move. The
// backward (one kernel for both) writes one packed buffer: the (N, T, D) data gradient, then each vector's gradient
// (sums over the T tokens of a sample, in token order).
// Compiled after kernels/common.cuh, like every source here (its Io<T> loads).

extern "C" __global__ void modulate_f32(const float* h, const float* shift, const float* scale, float* out,
                                        unsigned long long total, unsigned t, unsigned d) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long v = (i / ((unsigned long long)t * d)) * d + i % d;
        out[i] = __fadd_rn(__fmul_rn(h[i], __fadd_rn(scale[v], 1.f)), shift[v]);
    }
}

template <typename Y>
__device__ __forceinline__ void gated_add(const float* x, const Y* y, const float* gate, float* out,
                                          unsigned long long total, unsigned t, unsigned d) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long v = (i / ((unsigned long long)t * d)) * d + i % d;
        out[i] = __fadd_rn(x[i], __fmul_rn(Io<Y>::load(y, i), gate[v]));
    }
}
extern "C" __global__ void gated_add_f32(const float* x, const float* y, const float* gate, float* out,
                                         unsigned long long total, unsigned t, unsigned d) {
    gated_add<float>(x, y, gate, out, total, t, d);
}
extern "C" __global__ void gated_add_bf16(const float* x, const u16* y, const float* gate, float* out,
                                          unsigned long long total, unsigned t, unsigned d) {
    gated_add<u16>(x, y, gate, out, total, t, d);
}

// The backward of both: out = a * f(v) (+ shift), f(v) = v + 1 (modulate: a = h, v = scale) or
// v (gated residual: a = y, v = gate), the vector broadcast over each sample's T tokens. One
// block per sample; each thread walks its channels over the sample's tokens.
// packed = [da = dout * f(v) (N*T*D) | dshift = sum_t dout (N*D), if with_shift | dv = sum_t dout * a (N*D)];
// the gated residual's dx is dout itself. a is f32 or bf16 (A); da is f32 either way.
template <typename A>
__device__ __forceinline__ void broadcast_mul_bwd(const float* dout, const A* a, const float* v, float* packed,
                                                  unsigned n, unsigned t, unsigned d, int plus_one, int with_shift) {
    const unsigned s = blockIdx.x;
    const unsigned long long base = (unsigned long long)s * t * d;
    float* da = packed;
    float* dshift = packed + (unsigned long long)n * t * d;
    float* dv = dshift + (with_shift ? (unsigned long long)n * d : 0ull);
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x) {
        const float vc = v[(unsigned long long)s * d + c];
        const float f = plus_one ? __fadd_rn(vc, 1.f) : vc;
        float gs = 0.f, gv = 0.f;
        for (unsigned k = 0; k < t; k++) {
            const unsigned long long i = base + (unsigned long long)k * d + c;
            const float g = dout[i];
            da[i] = __fmul_rn(g, f);
            gs += g;
            gv = fmaf(g, Io<A>::load(a, i), gv);
        }
        if (with_shift) dshift[(unsigned long long)s * d + c] = gs;
        dv[(unsigned long long)s * d + c] = gv;
    }
}
extern "C" __global__ void broadcast_mul_bwd_f32(const float* dout, const float* a, const float* v, float* packed,
                                                 unsigned n, unsigned t, unsigned d, int plus_one, int with_shift) {
    broadcast_mul_bwd<float>(dout, a, v, packed, n, t, d, plus_one, with_shift);
}
extern "C" __global__ void broadcast_mul_bwd_bf16(const float* dout, const u16* a, const float* v, float* packed,
                                                  unsigned n, unsigned t, unsigned d, int plus_one, int with_shift) {
    broadcast_mul_bwd<u16>(dout, a, v, packed, n, t, d, plus_one, with_shift);
}
