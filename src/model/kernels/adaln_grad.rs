//! adaLN's per-sample modulation as differentiable candle ops with their own backward, for
//! training (f32): `modulate(h, shift, scale) = h * (1 + scale) + shift` and the gated
//! residual `gated_add(x, y, gate) = x + y * gate`, with `h, x, y` `(N, T, D)` and the vectors
//! `(N, D)` broadcast over the T tokens of each sample (official `modulate` and
//! `x + gate.unsqueeze(1) * y`); and [`ln_modulate`], a block's `modulate(norm(x), ...)` as one
//! node whose output may be bf16 (a matmul's input under mixed precision).
//!
//! As candle composites each was two or three broadcasting ops forward, and backward a
//! broadcasting product, a reduction over the tokens and candle's gradient accumulation
//! (a zero fill and an add per contribution) for each: full passes over the activations. Here
//! each direction is one pass (`kernels/adaln_grad.cu` on CUDA, loops on the CPU); the
//! forwards round as the composites do, so the values are the same bits.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `h * (1 + scale) + shift` with `h` `(N, T, D)` and `shift`, `scale` `(N, D)`, f32.
pub fn modulate(h: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    check("modulate", h, &[("shift", shift), ("scale", scale)])?;
    h.contiguous()?.apply_op3(&shift.contiguous()?, &scale.contiguous()?, Modulate)
}

/// `x + y * gate` with `x` `(N, T, D)` f32, `y` of x's shape in f32 or bf16 (a matmul's output
/// under mixed precision, read as it is: no f32 copy of it is made or kept), and `gate` `(N, D)`
/// f32; the result is f32, and y's gradient comes in y's dtype.
pub fn gated_add(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    check("gated_add", x, &[("gate", gate)])?;
    if y.dims() != x.dims() || !matches!(y.dtype(), DType::F32 | DType::BF16) {
        bail!("gated_add: y is {:?} {:?}, x {:?} f32 (y f32 or bf16)", y.dims(), y.dtype(), x.dims())
    }
    x.contiguous()?.apply_op3(&y.contiguous()?, &gate.contiguous()?, GatedAdd)
}

/// `modulate(LayerNorm(x), shift, scale)` in `out_dtype`, with LayerNorm without affine
/// parameters (`eps`), `x` `(N, T, D)` f32 and shift and scale chunks `shift`, `scale` (of
/// width D) of `mods` `(N, C·D)` f32: one autograd node, where the composite was three (the
/// LayerNorm, the modulate, the cast), each keeping an `(N, T, D)` f32 tensor for the backward.
/// Its value is the fused inference kernel's on CUDA (one pass from the f32 residual stream to
/// the matmul input) and the composite's on the CPU. It keeps only `x`, alive anyway as the
/// residual stream: the backward recomputes `LayerNorm(x)`, then runs the modulate's backward
/// and the LayerNorm's (`dx = rstd (dn - mean(dn) - x̂ mean(dn x̂))`, `dn = dout (1 + scale)`).
pub fn ln_modulate(x: &Tensor, mods: &Tensor, shift: usize, scale: usize, eps: f64, out_dtype: DType) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let (shift_v, scale_v) = (mods.narrow(1, shift * d, d)?, mods.narrow(1, scale * d, d)?);
    check("ln_modulate", x, &[("shift", &shift_v), ("scale", &scale_v)])?;
    let value = ln_modulate_value(&x.detach(), &mods.detach(), shift, scale, eps, out_dtype)?;
    x.apply_op3(&shift_v, &scale_v, LnModulate { value, eps })
}

/// [`ln_modulate`]'s value: the fused inference kernel on CUDA (rows of up to 2048, a multiple
/// of 4), the LayerNorm and modulate ops elsewhere.
fn ln_modulate_value(x: &Tensor, mods: &Tensor, shift: usize, scale: usize, eps: f64, out_dtype: DType) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && super::block_ops::rows_fit(d) {
        return super::cuda::ln_modulate(x, mods, shift * d, scale * d, eps, out_dtype);
    }
    modulate(&crate::nn::row_grad::layer_norm_rows(x, eps)?, &mods.narrow(1, shift * d, d)?, &mods.narrow(1, scale * d, d)?)?.to_dtype(out_dtype)
}

struct LnModulate {
    /// The forward value, computed before the op was applied ([`crate::runtime::precomputed`]).
    value: Tensor,
    eps: f64,
}

impl CustomOp3 for LnModulate {
    fn name(&self) -> &'static str {
        "ln-modulate"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::runtime::precomputed::cpu_value("ln_modulate", &self.value)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::runtime::precomputed::cuda_value("ln_modulate", &self.value)
    }

    fn bwd(&self, x: &Tensor, _shift: &Tensor, scale: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x = x.detach();
        let norm = crate::nn::row_grad::layer_norm_rows(&x, self.eps)?;
        let dout = dout.detach().to_dtype(DType::F32)?;
        let mut g = BroadcastMulBwd { plus_one: true, with_shift: true }.run(&dout, &norm, &scale.detach())?.into_iter();
        let (dnorm, dshift, dscale) = (g.next(), g.next(), g.next());
        let dx = dnorm.map(|dn| crate::nn::row_grad::layer_norm_rows_backward(&x, &dn, self.eps)).transpose()?;
        Ok((dx, dshift, dscale))
    }
}

fn check(what: &str, a: &Tensor, vectors: &[(&str, &Tensor)]) -> Result<()> {
    let (n, _, d) = a.dims3().map_err(|_| candle_core::Error::Msg(format!("{what}: the activations must be (N, T, D), got {:?}", a.dims())))?;
    if a.dtype() != DType::F32 {
        bail!("{what}: f32 only, got {:?}", a.dtype())
    }
    for (name, v) in vectors {
        if v.dims() != [n, d] || v.dtype() != DType::F32 {
            bail!("{what}: {name} is {:?} {:?}, expected [{n}, {d}] f32", v.dims(), v.dtype())
        }
    }
    Ok(())
}

/// The contiguous data of a CPU operand as f32 values: borrowed for f32, widened for bf16 (the
/// gated branch; the entry points check which operands may be bf16).
fn cpu<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else { bail!("adaln_grad: operands must be contiguous") };
    match s {
        CpuStorage::F32(v) => Ok(std::borrow::Cow::Borrowed(&v[a..b])),
        CpuStorage::BF16(v) => Ok(std::borrow::Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect())),
        s => bail!("adaln_grad: f32 or bf16 only, got {:?}", s.dtype()),
    }
}

/// Applies `f(activation element, vector element index)` over `(N, T, D)`.
fn per_element(shape: &[usize], mut f: impl FnMut(usize, usize)) {
    let (t, d) = (shape[1], shape[2]);
    for i in 0..shape.iter().product() {
        f(i, (i / (t * d)) * d + i % d);
    }
}

/// Splits a backward's packed output into the data gradient `(N, T, D)` and its vector
/// gradients `(N, D)`.
fn unpack(packed: &Tensor, shape: &[usize], vectors: usize) -> Result<Vec<Tensor>> {
    let (n, t, d) = (shape[0], shape[1], shape[2]);
    let mut out = vec![packed.narrow(0, 0, n * t * d)?.reshape((n, t, d))?];
    for j in 0..vectors {
        out.push(packed.narrow(0, n * t * d + j * n * d, n * d)?.reshape((n, d))?);
    }
    Ok(out)
}

struct Modulate;

impl CustomOp3 for Modulate {
    fn name(&self) -> &'static str {
        "modulate"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (h, shift, scale) = (cpu(s1, l1)?, cpu(s2, l2)?, cpu(s3, l3)?);
        let mut out = vec![0f32; h.len()];
        per_element(l1.dims(), |i, v| out[i] = h[i] * (scale[v] + 1.0) + shift[v]);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout, s3: &candle_core::CudaStorage, l3: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::launch("modulate", [(s1, l1), (s2, l2), (s3, l3)], l1.dims(), None)
    }

    fn bwd(&self, h: &Tensor, _shift: &Tensor, scale: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let bwd = BroadcastMulBwd { plus_one: true, with_shift: true };
        let mut g = bwd.run(dout, h, scale)?.into_iter();
        Ok((g.next(), g.next(), g.next()))
    }
}

struct GatedAdd;

impl CustomOp3 for GatedAdd {
    fn name(&self) -> &'static str {
        "gated-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, y, gate) = (cpu(s1, l1)?, cpu(s2, l2)?, cpu(s3, l3)?);
        let mut out = vec![0f32; x.len()];
        per_element(l1.dims(), |i, v| out[i] = x[i] + y[i] * gate[v]);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout, s3: &candle_core::CudaStorage, l3: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::launch("gated_add", [(s1, l1), (s2, l2), (s3, l3)], l1.dims(), None)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, gate: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dout = dout.contiguous()?;
        let mut g = BroadcastMulBwd { plus_one: false, with_shift: false }.run(&dout, y, gate)?.into_iter();
        let dy = g.next().map(|dy| dy.to_dtype(y.dtype())).transpose()?;
        Ok((Some(dout), dy, g.next()))
    }
}

/// The backward of both ops: `out = a * f(v) (+ shift)` with `f(v) = v + 1` (modulate: `a = h`,
/// `v = scale`, with the shift) or `v` (gated residual: `a = y`, `v = gate`). (dout, a, v) →
/// packed `[da | dshift (if with_shift) | dv]`, f32; `a` f32 or bf16.
struct BroadcastMulBwd {
    plus_one: bool,
    with_shift: bool,
}

impl BroadcastMulBwd {
    /// `[da (N, T, D), dshift (N, D) if with_shift, dv (N, D)]`.
    fn run(&self, dout: &Tensor, a: &Tensor, v: &Tensor) -> Result<Vec<Tensor>> {
        let packed = dout.contiguous()?.apply_op3_no_bwd(&a.contiguous()?, &v.contiguous()?, self)?;
        unpack(&packed, a.dims(), 1 + self.with_shift as usize)
    }
}

impl CustomOp3 for BroadcastMulBwd {
    fn name(&self) -> &'static str {
        "broadcast-mul-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (dout, a, v) = (cpu(s1, l1)?, cpu(s2, l2)?, cpu(s3, l3)?);
        let nv = v.len();
        let mut out = vec![0f32; dout.len() + (1 + self.with_shift as usize) * nv];
        let (da, rest) = out.split_at_mut(dout.len());
        let (dshift, dv) = rest.split_at_mut(if self.with_shift { nv } else { 0 });
        per_element(l1.dims(), |i, j| {
            da[i] = dout[i] * if self.plus_one { v[j] + 1.0 } else { v[j] };
            if self.with_shift {
                dshift[j] += dout[i];
            }
            dv[j] += dout[i] * a[i];
        });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout, s3: &candle_core::CudaStorage, l3: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::launch("broadcast_mul_bwd", [(s1, l1), (s2, l2), (s3, l3)], l1.dims(), Some((self.plus_one, self.with_shift)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::runtime::cuda::{cfg1, drv, dtype_suffix, grid_for, NvrtcModule};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{cudarc, CudaDType, CudaStorage};
    use candle_core::{bail, DType, Layout, Result, Shape};
    use cudarc::driver::{DeviceRepr, PushKernelArg};

    static MODULE: NvrtcModule = NvrtcModule::new(nvrtc_source!("adaln_grad.cu"), "ditmoe_adaln_grad");

    /// Runs kernel `<name>_<dtype>` on three contiguous operands, the first `(N, T, D)`: the first
    /// and third f32, the second f32 or bf16 (the gated branch; `dtype` is its). A forward
    /// (`backward` None) writes `(N, T, D)` elementwise; the backward (`backward` = `(plus_one,
    /// with_shift)`) writes the data gradient and one or two `(N, D)` gradients packed, one
    /// block per sample, all f32.
    pub fn launch(name: &str, ins: [(&CudaStorage, &Layout); 3], dims: &[usize], backward: Option<(bool, bool)>) -> Result<(CudaStorage, Shape)> {
        match ins[1].0.dtype() {
            DType::BF16 => launch_with::<half::bf16>(name, ins, dims, backward),
            _ => launch_with::<f32>(name, ins, dims, backward),
        }
    }

    /// [`launch`] with the second operand's element type `Y`.
    fn launch_with<Y: CudaDType + DeviceRepr>(name: &str, ins: [(&CudaStorage, &Layout); 3], dims: &[usize], backward: Option<(bool, bool)>) -> Result<(CudaStorage, Shape)> {
        let dev = ins[0].0.device.clone();
        let (n, t, d) = (dims[0], dims[1], dims[2]);
        let range = |l: &Layout| match l.contiguous_offsets() {
            Some((a, b)) => Ok(a..b),
            None => bail!("{name}: operands must be contiguous"),
        };
        let name = format!("{name}_{}", dtype_suffix(ins[1].0.dtype(), name)?);
        let first = ins[0].0.as_cuda_slice::<f32>()?.slice(range(ins[0].1)?);
        let second = ins[1].0.as_cuda_slice::<Y>()?.slice(range(ins[1].1)?);
        let third = ins[2].0.as_cuda_slice::<f32>()?.slice(range(ins[2].1)?);
        let total = n * t * d;
        let vectors = backward.map_or(0, |(_, with_shift)| 1 + with_shift as usize);
        let len = total + vectors * n * d;
        let mut out = unsafe { dev.alloc::<f32>(len)? };
        if total > 0 {
            let (stream, f) = MODULE.func(&dev, &name)?;
            let mut b = stream.launch_builder(&f);
            b.arg(&first).arg(&second).arg(&third).arg(&mut out);
            let (t32, d32, total64, n32) = (t as u32, d as u32, total as u64, n as u32);
            let flags = backward.map(|(plus_one, with_shift)| (plus_one as i32, with_shift as i32));
            let cfg = match &flags {
                None => {
                    b.arg(&total64).arg(&t32).arg(&d32);
                    cfg1(grid_for(total), 256, 0)
                }
                Some((plus_one, with_shift)) => {
                    b.arg(&n32).arg(&t32).arg(&d32).arg(plus_one).arg(with_shift);
                    cfg1(n32, (d.div_ceil(32) * 32).min(256) as u32, 0)
                }
            };
            drv(unsafe { b.launch(cfg) })?;
        }
        let shape = if backward.is_none() { Shape::from(dims) } else { Shape::from(len) };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        d / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt().max(1e-30)
    }

    /// Value and every gradient of `<op, probe>` against the broadcasting candle composite.
    fn check(op: impl Fn(&[Tensor]) -> Result<Tensor>, composite: impl Fn(&[Tensor]) -> Result<Tensor>, shapes: &[&[usize]]) {
        let dev = Device::Cpu;
        let inputs: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(0f32, 1.0, *s, &dev).unwrap()).collect();
        let probe = Tensor::randn(0f32, 1.0, shapes[0], &dev).unwrap();
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> = ts.iter().map(|t| g.get(t).unwrap().clone()).collect();
            (y, grads)
        };
        let ((y, g), (y_ref, g_ref)) = (run(&op), run(&composite));
        assert_eq!(rel(&y, &y_ref), 0.0, "the forward rounds as the composite");
        for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
            assert_eq!(a.dims(), b.dims());
            assert!(rel(a, b) < 1e-5, "gradient {i}: rel {}", rel(a, b));
        }
    }

    #[test]
    fn modulate_matches_the_composite_with_gradients() {
        for (n, t, d) in [(3, 64, 160), (2, 5, 7), (1, 1, 1)] {
            check(
                |v| modulate(&v[0], &v[1], &v[2]),
                |v| v[0].broadcast_mul(&(v[2].unsqueeze(1)? + 1.0)?)?.broadcast_add(&v[1].unsqueeze(1)?),
                &[&[n, t, d], &[n, d], &[n, d]],
            );
        }
    }

    #[test]
    fn gated_add_matches_the_composite_with_gradients() {
        for (n, t, d) in [(3, 64, 160), (2, 5, 7), (1, 1, 1)] {
            check(|v| gated_add(&v[0], &v[1], &v[2]), |v| &v[0] + v[1].broadcast_mul(&v[2].unsqueeze(1)?)?, &[&[n, t, d], &[n, t, d], &[n, d]]);
        }
    }

    /// A bf16 branch (a matmul's output under mixed precision) gives the values and gradients of
    /// the same branch widened to f32 first, with y's gradient rounded once to bf16.
    #[test]
    fn gated_add_reads_a_bf16_branch_as_the_widened_one() {
        let dev = Device::Cpu;
        let (n, t, d) = (3, 17, 24);
        let x0 = Tensor::randn(0f32, 1.0, (n, t, d), &dev).unwrap();
        let y16 = Tensor::randn(0f32, 1.0, (n, t, d), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let g0 = Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (n, t, d), &dev).unwrap();
        let run = |y0: &Tensor| {
            let (x, y, g) = (Var::from_tensor(&x0).unwrap(), Var::from_tensor(y0).unwrap(), Var::from_tensor(&g0).unwrap());
            let out = gated_add(x.as_tensor(), y.as_tensor(), g.as_tensor()).unwrap();
            let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            (out, grad(&x), grad(&y), grad(&g))
        };
        let (out16, dx16, dy16, dg16) = run(&y16);
        let (out, dx, dy, dg) = run(&y16.to_dtype(DType::F32).unwrap());
        assert_eq!((out16.dtype(), dy16.dtype()), (DType::F32, DType::BF16));
        assert_eq!(rel(&out16, &out), 0.0);
        assert_eq!(rel(&dx16, &dx), 0.0);
        assert_eq!(rel(&dy16.to_dtype(DType::F32).unwrap(), &dy.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()), 0.0);
        assert_eq!(rel(&dg16, &dg), 0.0);
    }

    /// The fused LayerNorm + modulate node against candle autograd through the composite
    /// (`LN(x) * (1 + scale) + shift` with chunks 1 and 2 of `mods`), with an f32 and a bf16
    /// output: value and the gradients of `x` and `mods`.
    #[test]
    fn ln_modulate_matches_the_composite_with_gradients() {
        let dev = Device::Cpu;
        for (n, t, d) in [(3, 64, 160), (2, 5, 7)] {
            let x0 = (Tensor::randn(0f32, 2.0, (n, t, d), &dev).unwrap() + 0.5).unwrap();
            let m0 = Tensor::randn(0f32, 0.5, (n, 3 * d), &dev).unwrap();
            let probe = Tensor::randn(0f32, 1.0, (n, t, d), &dev).unwrap();
            let run = |fused: Option<DType>| {
                let (x, m) = (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&m0).unwrap());
                let (xt, mt) = (x.as_tensor(), m.as_tensor());
                let y = match fused {
                    Some(dt) => ln_modulate(xt, mt, 1, 2, 1e-6, dt).unwrap(),
                    None => {
                        let mean = xt.mean_keepdim(2).unwrap();
                        let c = xt.broadcast_sub(&mean).unwrap();
                        let var = c.sqr().unwrap().mean_keepdim(2).unwrap();
                        let norm = c.broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap()).unwrap();
                        let chunk = |i: usize| mt.narrow(1, i * d, d).unwrap().unsqueeze(1).unwrap();
                        norm.broadcast_mul(&(chunk(2) + 1.0).unwrap()).unwrap().broadcast_add(&chunk(1)).unwrap()
                    }
                };
                let g = (y.to_dtype(DType::F32).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(xt).unwrap().clone(), g.get(mt).unwrap().clone())
            };
            let (y_ref, dx_ref, dm_ref) = run(None);
            let (y, dx, dm) = run(Some(DType::F32));
            assert!(rel(&y, &y_ref) < 1e-6, "value rel {}", rel(&y, &y_ref));
            assert!(rel(&dx, &dx_ref) < 1e-5, "d x rel {}", rel(&dx, &dx_ref));
            assert!(rel(&dm, &dm_ref) < 1e-5, "d mods rel {}", rel(&dm, &dm_ref));
            assert_eq!(dm.narrow(1, 0, d).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "chunk 0 is not read");
            // a bf16 output (the matmul input under mixed precision): the f32 value rounded, and
            // f32 gradients within bf16's error
            let (y16, dx16, dm16) = run(Some(DType::BF16));
            assert_eq!(y16.dtype(), DType::BF16);
            assert_eq!(rel(&y16.to_dtype(DType::F32).unwrap(), &y.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()), 0.0);
            assert_eq!((dx16.dtype(), dm16.dtype()), (DType::F32, DType::F32));
            assert!(rel(&dx16, &dx_ref) < 1e-2 && rel(&dm16, &dm_ref) < 1e-2, "bf16: d x rel {}, d mods rel {}", rel(&dx16, &dx_ref), rel(&dm16, &dm_ref));
        }
    }

    #[test]
    fn wrong_shapes_are_errors_naming_the_operand() {
        let dev = Device::Cpu;
        let h = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        let bad = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        let e = modulate(&h, &bad, &bad).unwrap_err().to_string();
        assert!(e.contains("modulate") && e.contains("shift"), "{e}");
        let e = gated_add(&h, &h, &bad).unwrap_err().to_string();
        assert!(e.contains("gate"), "{e}");
    }
}
