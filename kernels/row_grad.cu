// Softmax and LayerNorm (no affine) over the last axis, forward and backward, for training
// (src/kernels/row_grad.rs): one warp per row, f32. candle has fused forward kernels for both
// but no backward, so training ran them as composites of 5–7 broadcasting candle ops each way,
// every one a full pass over the activations (ncu: ~20% of a training step of the bundled
// model). The maths is the composites': softmax exp(x - max) / sum; LayerNorm
// (x - mean) / sqrt(var + eps) with the biased variance (torch.nn.LayerNorm).
// Compiled after kernels/common.cuh (warp_sum, warp_max).

#define ROWS_PER_BLOCK 8

// This warp's row, or -1 past the end.
__device__ __forceinline__ long long row_index(unsigned long long rows) {
    unsigned long long r = (unsigned long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    return r < rows ? (long long)r : -1;
}

extern "C" __global__ void softmax_rows_f32(const float* x, float* y, unsigned long long rows, unsigned n) {
    long long r = row_index(rows);
    if (r < 0) return;
    const unsigned lane = threadIdx.x & 31;
    const float* xr = x + (unsigned long long)r * n;
    float* yr = y + (unsigned long long)r * n;
    float m = __int_as_float(0xff800000);  // -inf
    for (unsigned i = lane; i < n; i += 32) m = fmaxf(m, xr[i]);
    m = warp_max(m);
    float s = 0.f;
    for (unsigned i = lane; i < n; i += 32) {
        float e = expf(xr[i] - m);
        yr[i] = e;
        s += e;
    }
    s = warp_sum(s);
    for (unsigned i = lane; i < n; i += 32) yr[i] = yr[i] / s;
}

// dx = (y * (dy - sum(dy * y))) * scale; the scale is the attention's 1 / sqrt(hd) when the
// softmax's input was scaled (1 otherwise: exact), rounded as candle's affine after the product.
extern "C" __global__ void softmax_rows_bwd_f32(const float* y, const float* dy, float* dx, unsigned long long rows, unsigned n,
                                                float scale) {
    long long r = row_index(rows);
    if (r < 0) return;
    const unsigned lane = threadIdx.x & 31;
    const unsigned long long o = (unsigned long long)r * n;
    float s = 0.f;
    for (unsigned i = lane; i < n; i += 32) s = fmaf(dy[o + i], y[o + i], s);
    s = warp_sum(s);
    for (unsigned i = lane; i < n; i += 32) dx[o + i] = __fmul_rn(__fmul_rn(y[o + i], dy[o + i] - s), scale);
}

// The row's mean and 1 / sqrt(var + eps), two passes as the composite computes them.
__device__ __forceinline__ void row_stats(const float* xr, unsigned n, float eps, float* mean, float* rstd) {
    const unsigned lane = threadIdx.x & 31;
    float s = 0.f;
    for (unsigned i = lane; i < n; i += 32) s += xr[i];
    const float mu = warp_sum(s) / (float)n;
    float q = 0.f;
    for (unsigned i = lane; i < n; i += 32) {
        float c = xr[i] - mu;
        q = fmaf(c, c, q);
    }
    *mean = mu;
    *rstd = 1.f / sqrtf(warp_sum(q) / (float)n + eps);
}

// The row's offset, mean and 1 / sqrt(var + eps) for this warp; false past the last row.
__device__ __forceinline__ bool layer_norm_row(const float* x, unsigned long long rows, unsigned n, float eps,
                                               unsigned long long* o, float* mean, float* rstd) {
    long long r = row_index(rows);
    if (r < 0) return false;
    *o = (unsigned long long)r * n;
    row_stats(x + *o, n, eps, mean, rstd);
    return true;
}

extern "C" __global__ void layer_norm_rows_f32(const float* x, float* y, unsigned long long rows, unsigned n, float eps) {
    unsigned long long o;
    float mu, rstd;
    if (!layer_norm_row(x, rows, n, eps, &o, &mu, &rstd)) return;
    for (unsigned i = threadIdx.x & 31; i < n; i += 32) y[o + i] = (x[o + i] - mu) * rstd;
}

// With xh = (x - mean) * rstd: dx = rstd * (dy - mean(dy) - xh * mean(dy * xh)).
extern "C" __global__ void layer_norm_rows_bwd_f32(const float* x, const float* dy, float* dx, unsigned long long rows, unsigned n, float eps) {
    unsigned long long o;
    float mu, rstd;
    if (!layer_norm_row(x, rows, n, eps, &o, &mu, &rstd)) return;
    const unsigned lane = threadIdx.x & 31;
    float sg = 0.f, sgx = 0.f;
    for (unsigned i = lane; i < n; i += 32) {
        float g = dy[o + i];
        sg += g;
        sgx = fmaf(g, (x[o + i] - mu) * rstd, sgx);
    }
    const float mg = warp_sum(sg) / (float)n, mgx = warp_sum(sgx) / (float)n;
    for (unsigned i = lane; i < n; i += 32) {
        float xh = (x[o + i] - mu) * rstd;
        dx[o + i] = rstd * (dy[o + i] - mg - xh * mgx);
    }
}
