//! Softmax and LayerNorm over the last axis as differentiable candle ops with their own
//! backward, for training (f32).
//!
//! candle-nn's fused `softmax_last_dim` and `layer_norm` have no backward, so under autograd
//! the models ran them as composites: softmax as max, sub, exp, sum, div and LayerNorm as
//! mean, sub, sqr, mean, add, sqrt, div, each a broadcasting pass over the activations, and
//! their backward as more of the same (with an `eq` mask for the max). These ops do each
//! direction in one pass per row: `kernels/row_grad.cu` on CUDA (one warp per row), loops
//! over rows on the CPU.
//!
//! Backward: softmax `dx = y (dy - Σ dy y)`; LayerNorm without affine parameters, with
//! `x̂ = (x - mean) rstd`, `dx = rstd (dy - mean(dy) - x̂ mean(dy x̂))` (rstd recomputed from x).
//! Gradients of gradients are not supported (nothing here needs them).
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `softmax(x)` over the last axis; f32, differentiable.
pub fn softmax_rows(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxRows)
}

/// The softmax's backward alone: `dy`'s gradient through `y = softmax(scale · x)` with respect
/// to `x`, `scale · y (dy - Σ dy y)` row by row (f32, no autograd history; the product by the
/// scale is rounded last, as a separate multiplication would be).
pub fn softmax_rows_backward(y: &Tensor, dy: &Tensor, scale: f64) -> Result<Tensor> {
    y.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxRowsBwd { scale: scale as f32 })
}

/// `(x - mean) / sqrt(var + eps)` over the last axis (biased variance, no affine parameters);
/// f32, differentiable.
pub fn layer_norm_rows(x: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(LayerNormRows { eps: eps as f32 })
}

/// [`layer_norm_rows`]' backward alone: `dy`'s gradient through `y = LayerNorm(x)` with respect
/// to `x`, `rstd (dy - mean(dy) - x̂ mean(dy x̂))` row by row, the statistics recomputed from `x`
/// (f32, no autograd history).
pub fn layer_norm_rows_backward(x: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &LayerNormRowsBwd { eps: eps as f32 })
}

/// Rows and row length of a contiguous f32 operand.
fn rows_of(what: &str, dtype: DType, l: &Layout) -> Result<(usize, usize, usize, usize)> {
    if dtype != DType::F32 {
        bail!("{what}: f32 only, got {dtype:?}")
    }
    let Some((start, end)) = l.contiguous_offsets() else { bail!("{what}: the input must be contiguous") };
    let n = l.dims().last().copied().unwrap_or(1);
    let rows = (end - start).checked_div(n).unwrap_or(0);
    Ok((rows, n, start, end))
}

fn cpu_f32<'a>(what: &str, s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], usize)> {
    let (_, n, start, end) = rows_of(what, s.dtype(), l)?;
    match s {
        CpuStorage::F32(v) => Ok((&v[start..end], n)),
        _ => bail!("{what}: f32 only"),
    }
}

fn softmax_row(x: &[f32], y: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0f32;
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = (xi - m).exp();
        s += *yi;
    }
    y.iter_mut().for_each(|yi| *yi /= s);
}

/// (mean, 1 / sqrt(var + eps)) of a row, two passes.
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mu = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|&v| (v - mu) * (v - mu)).sum::<f32>() / n;
    (mu, 1.0 / (var + eps).sqrt())
}

struct SoftmaxRows;

impl CustomOp1 for SoftmaxRows {
    fn name(&self) -> &'static str {
        "softmax-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, n) = cpu_f32("softmax_rows", s, l)?;
        let mut y = vec![0f32; x.len()];
        if n > 0 {
            x.chunks(n).zip(y.chunks_mut(n)).for_each(|(xr, yr)| softmax_row(xr, yr));
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::unary("softmax_rows_f32", s, l, None)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_rows_backward(y, dy, 1.0)?))
    }
}

struct SoftmaxRowsBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxRowsBwd {
    fn name(&self) -> &'static str {
        "softmax-rows-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((y, n), (dy, _)) = (cpu_f32("softmax_rows backward", s1, l1)?, cpu_f32("softmax_rows backward", s2, l2)?);
        let mut dx = vec![0f32; y.len()];
        if n > 0 {
            for ((yr, gr), dr) in y.chunks(n).zip(dy.chunks(n)).zip(dx.chunks_mut(n)) {
                let s: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                dr.iter_mut().zip(yr.iter().zip(gr)).for_each(|(d, (y, g))| *d = y * (g - s) * self.scale);
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::binary("softmax_rows_bwd_f32", (s1, l1), (s2, l2), Some(self.scale))
    }
}

struct LayerNormRows {
    eps: f32,
}

impl CustomOp1 for LayerNormRows {
    fn name(&self) -> &'static str {
        "layer-norm-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, n) = cpu_f32("layer_norm_rows", s, l)?;
        let mut y = vec![0f32; x.len()];
        if n > 0 {
            for (xr, yr) in x.chunks(n).zip(y.chunks_mut(n)) {
                let (mu, rstd) = row_stats(xr, self.eps);
                yr.iter_mut().zip(xr).for_each(|(y, &x)| *y = (x - mu) * rstd);
            }
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::unary("layer_norm_rows_f32", s, l, Some(self.eps))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(layer_norm_rows_backward(x, dy, self.eps as f64)?))
    }
}

struct LayerNormRowsBwd {
    eps: f32,
}

impl CustomOp2 for LayerNormRowsBwd {
    fn name(&self) -> &'static str {
        "layer-norm-rows-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((x, n), (dy, _)) = (cpu_f32("layer_norm_rows backward", s1, l1)?, cpu_f32("layer_norm_rows backward", s2, l2)?);
        let mut dx = vec![0f32; x.len()];
        if n > 0 {
            let nf = n as f32;
            for ((xr, gr), dr) in x.chunks(n).zip(dy.chunks(n)).zip(dx.chunks_mut(n)) {
                let (mu, rstd) = row_stats(xr, self.eps);
                let mg = gr.iter().sum::<f32>() / nf;
                let mgx = gr.iter().zip(xr).map(|(g, &x)| g * ((x - mu) * rstd)).sum::<f32>() / nf;
                dr.iter_mut().zip(gr.iter().zip(xr)).for_each(|(d, (g, &x))| *d = rstd * (g - mg - (x - mu) * rstd * mgx));
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::binary("layer_norm_rows_bwd_f32", (s1, l1), (s2, l2), Some(self.eps))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::runtime::cuda::{cfg1, drv, NvrtcModule};
    use super::rows_of;
    use candle_core::cuda_backend::{cudarc, CudaStorage};
    use candle_core::backend::BackendStorage;
    use candle_core::{bail, Layout, Result, Shape};
    use cudarc::driver::PushKernelArg;

    const SRC: &str = nvrtc_source!("row_grad.cu");
    /// One warp per row (`ROWS_PER_BLOCK` in the source).
    const ROWS_PER_BLOCK: usize = 8;

    static MODULE: NvrtcModule = NvrtcModule::new(SRC, "ditmoe_row_grad");

    /// `f(x) -> y`, row by row; `param` is the kernel's trailing f32 argument, if it has one
    /// (LayerNorm's eps, the softmax backward's scale).
    pub fn unary(name: &str, s: &CudaStorage, l: &Layout, param: Option<f32>) -> Result<(CudaStorage, Shape)> {
        launch(name, &[(s, l)], param)
    }

    /// `f(a, b) -> out` of two same-shape operands, row by row.
    pub fn binary(name: &str, a: (&CudaStorage, &Layout), b: (&CudaStorage, &Layout), param: Option<f32>) -> Result<(CudaStorage, Shape)> {
        if a.1.dims() != b.1.dims() {
            bail!("{name}: operands of shapes {:?} and {:?}", a.1.dims(), b.1.dims())
        }
        launch(name, &[a, b], param)
    }

    fn launch(name: &str, ins: &[(&CudaStorage, &Layout)], param: Option<f32>) -> Result<(CudaStorage, Shape)> {
        let dev = ins[0].0.device().clone();
        let (rows, n, _, _) = rows_of(name, ins[0].0.dtype(), ins[0].1)?;
        let views = ins
            .iter()
            .map(|(s, l)| {
                let (_, _, start, end) = rows_of(name, s.dtype(), l)?;
                Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = unsafe { dev.alloc::<f32>(rows * n)? };
        if rows > 0 && n > 0 {
            let (stream, f) = MODULE.func(&dev, name)?;
            let mut b = stream.launch_builder(&f);
            for v in &views {
                b.arg(v);
            }
            let (rows64, n32) = (rows as u64, n as u32);
            b.arg(&mut out).arg(&rows64).arg(&n32);
            if let Some(p) = &param {
                b.arg(p);
            }
            drv(unsafe { b.launch(cfg1(rows.div_ceil(ROWS_PER_BLOCK) as u32, (32 * ROWS_PER_BLOCK) as u32, 0)) })?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), ins[0].1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// Value and gradient of `<op(x), probe>` against the candle composite the models used
    /// before (softmax and LayerNorm from max/sub/exp/sum/div and mean/sub/sqr/sqrt/div).
    fn check(op: impl Fn(&Tensor) -> Result<Tensor>, composite: impl Fn(&Tensor) -> Result<Tensor>, shape: (usize, usize, usize)) {
        let dev = Device::Cpu;
        let x0 = (Tensor::randn(0f32, 2.0, shape, &dev).unwrap() + 0.5).unwrap();
        let probe = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let x = Var::from_tensor(&x0).unwrap();
            let y = f(x.as_tensor()).unwrap();
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(x.as_tensor()).unwrap().clone())
        };
        let ((y, g), (y_ref, g_ref)) = (run(&op), run(&composite));
        let rel = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            // (a one-element softmax has zero gradient)
            d / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt().max(1e-30)
        };
        assert!(rel(&y, &y_ref) < 1e-6, "value rel {}", rel(&y, &y_ref));
        assert!(rel(&g, &g_ref) < 1e-5, "gradient rel {}", rel(&g, &g_ref));
    }

    #[test]
    fn softmax_rows_matches_the_composite_with_gradients() {
        for shape in [(3, 64, 64), (2, 5, 8), (1, 1, 1), (4, 7, 33)] {
            check(softmax_rows, |x| candle_nn::ops::softmax(x, D::Minus1), shape);
        }
    }

    #[test]
    fn layer_norm_rows_matches_the_composite_with_gradients() {
        let composite = |x: &Tensor| -> Result<Tensor> {
            let mean = x.mean_keepdim(D::Minus1)?;
            let c = x.broadcast_sub(&mean)?;
            let var = c.sqr()?.mean_keepdim(D::Minus1)?;
            c.broadcast_div(&(var + 1e-6)?.sqrt()?)
        };
        for shape in [(3, 64, 160), (2, 5, 8), (4, 7, 33)] {
            check(|x| layer_norm_rows(x, 1e-6), composite, shape);
        }
    }

    #[test]
    fn non_f32_input_is_an_error_naming_the_op() {
        let x = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
        let e = softmax_rows(&x).unwrap_err().to_string();
        assert!(e.contains("softmax_rows") && e.contains("f32"), "{e}");
    }
}
