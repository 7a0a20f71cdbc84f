//! The expert activations' elementwise backwards, shared by the routed experts' op
//! ([`super::routed_grad`]) and the shared expert ([`swiglu`]): one kernel each on CUDA for f32
//! and bf16 (`kernels/expert_act_grad.cu`), the same per-element maths in a loop elsewhere
//! (the exact GELU's derivative: candle ops in f32). All compute in f32 and round each result
//! once to the inputs' dtype, as autocast's backward of a bf16 activation does inside its
//! elementwise kernels.
use crate::runtime::precomputed;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `silu(g) * u` (DiT-MoE's SwiGLU, the shared expert's activation). Under autograd in f32 or
/// bf16 (training) it is one node: the value comes from candle's own ops (the same bits as the
/// composite), the backward is [`swiglu_backward`]'s single pass instead of candle's autograd
/// through `silu` and the product (ten elementwise kernels over the `[S, I]` activations).
/// Otherwise it is the composite itself.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if !(g.track_op() || u.track_op()) || !matches!(g.dtype(), DType::F32 | DType::BF16) {
        return candle_nn::ops::silu(g)? * u;
    }
    let value = (candle_nn::ops::silu(&g.detach())? * u.detach())?;
    g.apply_op2(u, SwigluGrad { value })
}

struct SwigluGrad {
    /// The forward value, computed before the op was applied ([`precomputed`]).
    value: Tensor,
}

impl CustomOp2 for SwigluGrad {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        precomputed::cpu_value("swiglu", &self.value)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        precomputed::cuda_value("swiglu", &self.value)
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _out: &Tensor, dh: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u) = (g.detach(), u.detach());
        let dh = dh.detach().broadcast_as(g.shape())?.contiguous()?;
        let (_, dg, du) = swiglu_backward(&g, &u, &dh, false)?;
        Ok((Some(dg), Some(du)))
    }
}

/// From the gate and up projections `g`, `u` and the gradient `dh` of `h = silu(g) * u`:
/// `(h, dg, du)` with `du = dh silu(g)` and `dg = dh u silu'(g)`,
/// `silu'(g) = sig (1 + g (1 - sig))`, `h` only `with_h` (the routed experts recompute it for
/// the down projection's gradient; the shared expert's op kept its value), all in the inputs'
/// dtype. One kernel on CUDA for f32 and bf16 (`kernels/expert_act_grad.cu`), the same
/// per-element maths on the CPU.
pub(crate) fn swiglu_backward(g: &Tensor, u: &Tensor, dh: &Tensor, with_h: bool) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if cuda_act::serves(&[g, u, dh]) {
        return cuda_act::swiglu_backward(g, u, dh, with_h);
    }
    // the CUDA kernel's per-element maths and rounding order
    let grads = |[g, u, dh]: [f32; 3]| {
        let sig = 1.0 / (1.0 + (-g).exp());
        let act = g * sig;
        let inner = g * (1.0 - sig) + 1.0;
        [act * u, (dh * u) * (sig * inner), dh * act]
    };
    if with_h {
        let [h, dg, du] = elementwise([g, u, dh], grads)?;
        Ok((Some(h), dg, du))
    } else {
        let [dg, du] = elementwise([g, u, dh], |v| {
            let [_, dg, du] = grads(v);
            [dg, du]
        })?;
        Ok((None, dg, du))
    }
}

/// An elementwise map over tensors of one shape and dtype, off the GPU kernels' path: `f` takes
/// each position's input values in f32 and gives its `O` results, each rounded once to the
/// inputs' dtype, as the CUDA kernels do (and without f32 copies of bf16 activations, so the
/// CPU's memory count stays the GPU's).
fn elementwise<const I: usize, const O: usize>(inputs: [&Tensor; I], f: impl Fn([f32; I]) -> [f32; O]) -> Result<[Tensor; O]> {
    let first = inputs[0];
    if let Some(t) = inputs.iter().find(|t| t.dims() != first.dims() || t.dtype() != first.dtype()) {
        candle_core::bail!("elementwise: {:?} {:?} beside {:?} {:?}", t.dims(), t.dtype(), first.dims(), first.dtype())
    }
    match first.dtype() {
        DType::F32 => elementwise_as::<f32, I, O>(inputs, f),
        DType::BF16 => elementwise_as::<half::bf16, I, O>(inputs, f),
        DType::F16 => elementwise_as::<half::f16, I, O>(inputs, f),
        DType::F64 => elementwise_as::<f64, I, O>(inputs, f),
        dt => candle_core::bail!("elementwise: {dt:?} is not a float dtype"),
    }
}

fn elementwise_as<T: candle_core::WithDType, const I: usize, const O: usize>(inputs: [&Tensor; I], f: impl Fn([f32; I]) -> [f32; O]) -> Result<[Tensor; O]> {
    let values = inputs.iter().map(|t| t.flatten_all()?.to_vec1::<T>()).collect::<Result<Vec<_>>>()?;
    let n = values[0].len();
    let mut outs: [Vec<T>; O] = std::array::from_fn(|_| Vec::with_capacity(n));
    (0..n).for_each(|i| {
        // f32 -> f64 -> T rounds once, as f32 -> T does
        let r = f(std::array::from_fn(|j| values[j][i].to_f64() as f32));
        for (out, v) in outs.iter_mut().zip(r) {
            out.push(T::from_f64(v as f64));
        }
    });
    let (shape, device) = (inputs[0].shape(), inputs[0].device());
    let tensors = outs.into_iter().map(|out| Tensor::from_vec(out, shape, device)).collect::<Result<Vec<_>>>()?;
    Ok(tensors.try_into().expect("one tensor per output"))
}

#[cfg(feature = "cuda")]
mod cuda_act {
    use crate::runtime::cuda::{cfg1, cuda_dev, drv, dtype_suffix, grid_for, view, wrap, NvrtcModule, NULL};
    use candle_core::cuda_backend::{cudarc, CudaDType};
    use candle_core::{bail, DType, Result, Storage, Tensor};
    use cudarc::driver::{DeviceRepr, PushKernelArg};
    use half::bf16;

    static MODULE: NvrtcModule = NvrtcModule::new(nvrtc_source!("expert_act_grad.cu"), "ditmoe_expert_act_grad");

    /// Whether the kernels take these tensors: on the GPU, all f32 or all bf16, one shape.
    pub fn serves(ts: &[&Tensor]) -> bool {
        let t0 = ts[0];
        t0.device().is_cuda() && matches!(t0.dtype(), DType::F32 | DType::BF16) && ts.iter().all(|t| t.dtype() == t0.dtype() && t.dims() == t0.dims())
    }

    pub fn swiglu_backward(g: &Tensor, u: &Tensor, dh: &Tensor, with_h: bool) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        match g.dtype() {
            DType::BF16 => swiglu_backward_as::<bf16>(g, u, dh, with_h),
            _ => swiglu_backward_as::<f32>(g, u, dh, with_h),
        }
    }

    fn swiglu_backward_as<T: CudaDType + DeviceRepr>(g: &Tensor, u: &Tensor, dh: &Tensor, with_h: bool) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let dev = cuda_dev(g)?;
        let (g, u, dh) = (g.contiguous()?, u.contiguous()?, dh.contiguous()?);
        let n = g.elem_count();
        view!(g, T, _gg, gv);
        view!(u, T, _gu, uv);
        view!(dh, T, _gd, dv);
        let mut h = if with_h { Some(unsafe { dev.alloc::<T>(n)? }) } else { None };
        let (mut dg, mut du) = unsafe { (dev.alloc::<T>(n)?, dev.alloc::<T>(n)?) };
        if n > 0 {
            let (stream, f) = MODULE.func(&dev, &format!("swiglu_bwd_{}", dtype_suffix(g.dtype(), "swiglu_backward")?))?;
            let n64 = n as u64;
            let mut b = stream.launch_builder(&f);
            b.arg(&gv).arg(&uv).arg(&dv);
            match h.as_mut() {
                Some(h) => b.arg(h),
                None => b.arg(&NULL),
            };
            b.arg(&mut dg).arg(&mut du).arg(&n64);
            drv(unsafe { b.launch(cfg1(grid_for(n), 256, 0)) })?;
        }
        let shape = g.shape().clone();
        Ok((h.map(|h| wrap(h, &dev, shape.clone())), wrap(dg, &dev, shape.clone()), wrap(du, &dev, shape)))
    }

    /// `dh * gelu_tanh'(pre)`; `consts` = (a, 3a, c, c / 2) as candle's affine ops round them.
    pub fn gelu_tanh_backward(pre: &Tensor, dh: &Tensor, consts: [f32; 4]) -> Result<Tensor> {
        match pre.dtype() {
            DType::BF16 => gelu_tanh_backward_as::<bf16>(pre, dh, consts),
            _ => gelu_tanh_backward_as::<f32>(pre, dh, consts),
        }
    }

    fn gelu_tanh_backward_as<T: CudaDType + DeviceRepr>(pre: &Tensor, dh: &Tensor, consts: [f32; 4]) -> Result<Tensor> {
        let dev = cuda_dev(pre)?;
        let (pre, dh) = (pre.contiguous()?, dh.contiguous()?);
        let n = pre.elem_count();
        view!(pre, T, _gp, pv);
        view!(dh, T, _gd, dv);
        let mut out = unsafe { dev.alloc::<T>(n)? };
        if n > 0 {
            let (stream, f) = MODULE.func(&dev, &format!("gelu_tanh_bwd_{}", dtype_suffix(pre.dtype(), "gelu_tanh_backward")?))?;
            let n64 = n as u64;
            let mut b = stream.launch_builder(&f);
            b.arg(&pv).arg(&dv).arg(&mut out).arg(&n64).arg(&consts[0]).arg(&consts[1]).arg(&consts[2]).arg(&consts[3]);
            drv(unsafe { b.launch(cfg1(grid_for(n), 256, 0)) })?;
        }
        Ok(wrap(out, &dev, pre.shape().clone()))
    }
}

/// The GELU of a GELU expert form: candle's `gelu` is the tanh approximation (timm's and
/// ProMoE's `GELU(approximate="tanh")`), `gelu_erf` the exact one (PyTorch's default `F.gelu`,
/// Megatron's `ParallelMLP` in DeepSpeed-MoE's experts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeluKind {
    Tanh,
    Erf,
}

impl GeluKind {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Tanh => x.gelu(),
            Self::Erf => x.gelu_erf(),
        }
    }

    /// `dh * gelu'(x)`.
    pub(crate) fn backward(self, x: &Tensor, dh: &Tensor) -> Result<Tensor> {
        match self {
            Self::Tanh => gelu_tanh_backward(x, dh),
            Self::Erf => gelu_erf_backward(x, dh),
        }
    }
}

/// `dh * (Φ(x) + x φ(x))`, the exact GELU's derivative, in candle ops in f32 (where `erf` is
/// exact to the rounding), rounded once to the inputs' dtype.
fn gelu_erf_backward(x: &Tensor, dh: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let (x, dh) = (x.to_dtype(DType::F32)?, dh.to_dtype(DType::F32)?);
    let cdf = (&x / std::f64::consts::SQRT_2)?.erf()?.affine(0.5, 0.5)?;
    let pdf = (x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
    (dh * (cdf + (&x * pdf?)?)?)?.to_dtype(dtype)
}

/// `dh * d gelu_tanh(x) / dx` for candle's `gelu` (the tanh approximation):
/// `0.5 (1 + t) + 0.5 x (1 - t²) c (1 + 3 a x²)` with `t = tanh(c (x + a x³))`, `c = sqrt(2/π)`,
/// in the inputs' dtype. One kernel on CUDA for f32 and bf16 (`kernels/expert_act_grad.cu`),
/// the same per-element maths on the CPU.
fn gelu_tanh_backward(x: &Tensor, dh: &Tensor) -> Result<Tensor> {
    const A: f64 = 0.044715;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    #[cfg(feature = "cuda")]
    if cuda_act::serves(&[x, dh]) {
        return cuda_act::gelu_tanh_backward(x, dh, [A as f32, (3.0 * A) as f32, c as f32, (0.5 * c) as f32]);
    }
    // the CUDA kernel's per-element maths and rounding order
    let (a, a3, c, half_c) = (A as f32, (3.0 * A) as f32, c as f32, (0.5 * c) as f32);
    let [dpre] = elementwise([x, dh], |[x, dh]| {
        let x2 = x * x;
        let t = ((x * x2.mul_add(a, 1.0)) * c).tanh();
        let outer = t.mul_add(0.5, 0.5);
        let inner = (x * (t * t).mul_add(-1.0, 1.0)) * x2.mul_add(a3, 1.0);
        [dh * (outer + inner * half_c)]
    })?;
    Ok(dpre)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn swiglu_matches_the_composite_with_gradients() {
        let dev = Device::Cpu;
        let g0 = Tensor::randn(0f32, 2.0, (37, 24), &dev).unwrap();
        let u0 = Tensor::randn(0f32, 1.0, (37, 24), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (37, 24), &dev).unwrap();
        let run = |fused: bool| {
            let (g, u) = (Var::from_tensor(&g0).unwrap(), Var::from_tensor(&u0).unwrap());
            let h = if fused { swiglu(g.as_tensor(), u.as_tensor()) } else { candle_nn::ops::silu(g.as_tensor()).and_then(|a| a * u.as_tensor()) }.unwrap();
            let grads = (&h * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            (h, grads.get(g.as_tensor()).unwrap().clone(), grads.get(u.as_tensor()).unwrap().clone())
        };
        let ((h, dg, du), (h_ref, dg_ref, du_ref)) = (run(true), run(false));
        let rel = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            d / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
        };
        assert_eq!(rel(&h, &h_ref), 0.0, "the value is the composite's");
        assert!(rel(&dg, &dg_ref) < 1e-6, "d gate {}", rel(&dg, &dg_ref));
        assert!(rel(&du, &du_ref) < 1e-6, "d up {}", rel(&du, &du_ref));

        // bf16 (mixed-precision training): its gradients in bf16 within the
        // project's bf16 tolerance of the f32 composite's
        let (g, u) = (Var::from_tensor(&g0.to_dtype(DType::BF16).unwrap()).unwrap(), Var::from_tensor(&u0.to_dtype(DType::BF16).unwrap()).unwrap());
        let h = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let grads = (h.to_dtype(DType::F32).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let f32_of = |v: &Var| grads.get(v.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
        assert!(rel(&f32_of(&g), &dg_ref) < 1e-2, "bf16 d gate {}", rel(&f32_of(&g), &dg_ref));
        assert!(rel(&f32_of(&u), &du_ref) < 1e-2, "bf16 d up {}", rel(&f32_of(&u), &du_ref));
    }
}
