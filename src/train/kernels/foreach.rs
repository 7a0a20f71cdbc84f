//! The optimizer step's per-parameter arithmetic over whole lists of tensors ("foreach", as
//! PyTorch's `torch._foreach_*` and fused AdamW): the global gradient norm, the AdamW update
//! and the weights' EMA.
//!
//! On CUDA, when every tensor is a contiguous f32 tensor on one device, each function is one
//! or two launches of `kernels/foreach.cu` for the whole list, updating in place. Everywhere
//! else it runs candle ops per tensor: the CPU reference, and the exact op sequence the
//! trainer used before the kernels existed. The AdamW and EMA kernels round as those ops do,
//! so both paths give the same bits on the GPU; the norm sums in another order (deterministic
//! too, and within f32 rounding of the per-tensor sums).
use candle_core::{bail, Result, Tensor, Var};

/// AdamW's per-step constants (`torch.optim.AdamW`, `_single_tensor_adamw`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWUpdate {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// `1 - lr * weight_decay`, or None without weight decay.
    pub decay: Option<f64>,
    /// `1 / sqrt(1 - beta2^step)`.
    pub inv_bias_correction2: f64,
    /// `lr / (1 - beta1^step)`.
    pub step_size: f64,
    /// The gradients' scale (global-norm clipping), None for 1.
    pub grad_scale: Option<f64>,
}

/// Whether the fused kernels serve these lists: contiguous f32 tensors on one CUDA device.
#[cfg(feature = "cuda")]
fn fused(lists: &[&[Tensor]]) -> bool {
    let Some(first) = lists.iter().flat_map(|l| l.iter()).next() else { return false };
    lists.iter().flat_map(|l| l.iter()).all(|t| t.device().is_cuda() && t.device().same_device(first.device()) && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
}

/// `Σ_t Σ_i t_i²` over every tensor of the list (the global gradient norm squared).
pub fn sum_of_squares(ts: &[Tensor]) -> Result<f32> {
    if ts.is_empty() {
        return Ok(0.0);
    }
    #[cfg(feature = "cuda")]
    if fused(&[ts]) {
        return super::cuda::sum_of_squares(ts);
    }
    let sq: Vec<Tensor> = ts.iter().map(|g| g.sqr()?.sum_all()).collect::<Result<_>>()?;
    Tensor::stack(&sq, 0)?.sum_all()?.to_scalar::<f32>()
}

fn check_lengths(what: &str, n: usize, lens: &[(&str, usize)]) -> Result<()> {
    for (name, len) in lens {
        if *len != n {
            bail!("{what}: {len} {name} for {n} parameters");
        }
    }
    Ok(())
}

/// One AdamW update of `vars` with gradients `grads` and moments `m`, `v` (replaced by the new
/// moments; on the fused path they are updated in place, so they must not share storage with
/// anything else).
pub fn adamw_update(vars: &[Var], grads: &[Tensor], m: &mut [Tensor], v: &mut [Tensor], u: &AdamWUpdate) -> Result<()> {
    check_lengths("AdamW", vars.len(), &[("gradients", grads.len()), ("first moments", m.len()), ("second moments", v.len())])?;
    for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
        if var.dims() != g.dims() || var.dims() != m[i].dims() || var.dims() != v[i].dims() {
            bail!("AdamW: parameter {i} has shape {:?}, its gradient {:?}, its moments {:?} and {:?}", var.dims(), g.dims(), m[i].dims(), v[i].dims());
        }
    }
    #[cfg(feature = "cuda")]
    {
        let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        if fused(&[&params, grads, m, v]) {
            return super::cuda::adamw(&params, grads, m, v, u);
        }
    }
    for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
        if var.elem_count() == 0 {
            // nothing to update (and candle's ops hand an empty tensor's storage back, which
            // `Var::set` refuses as derived from the variable)
            continue;
        }
        // Detached: otherwise each moment would keep the previous one (and its gradient's
        // graph) alive through candle's op tracking, and memory would grow every step.
        let mut g = g.detach();
        if let Some(s) = u.grad_scale {
            g = (g * s)?;
        }
        let mi = ((&m[i] * u.beta1)? + (&g * (1.0 - u.beta1))?)?.detach();
        let vi = ((&v[i] * u.beta2)? + (g.sqr()? * (1.0 - u.beta2))?)?.detach();
        let mut p = var.as_tensor().clone();
        if let Some(d) = u.decay {
            p = (p * d)?;
        }
        let denom = ((vi.sqrt()? * u.inv_bias_correction2)? + u.eps)?;
        let p = (p - ((&mi / denom)? * u.step_size)?)?.detach();
        var.set(&p)?;
        m[i] = mi;
        v[i] = vi;
    }
    Ok(())
}

/// `ema = decay * ema + (1 - decay) * param` for each pair (official `update_ema`); on the
/// fused path in place, so `ema` must not share storage with anything else.
pub fn ema_update(ema: &mut [Tensor], params: &[Tensor], decay: f64) -> Result<()> {
    check_lengths("EMA", ema.len(), &[("parameters", params.len())])?;
    for (e, p) in ema.iter().zip(params) {
        if e.dims() != p.dims() {
            bail!("EMA: average of shape {:?} for a parameter of shape {:?}", e.dims(), p.dims());
        }
    }
    #[cfg(feature = "cuda")]
    if fused(&[ema, params]) {
        return super::cuda::ema(ema, params, decay);
    }
    for (e, p) in ema.iter_mut().zip(params) {
        // Detached so the average does not hold on to every earlier average (op tracking).
        *e = ((&*e * decay)? + (p.detach() * (1.0 - decay))?)?.detach();
    }
    Ok(())
}
