//! The optimizer step's per-parameter arithmetic over whole lists of tensors ("foreach", as
//! PyTorch's `torch._foreach_*` and fused AdamW): the global gradient norm, the AdamW update
//! and the weights' EMA.
//!
//! On CUDA, when every tensor is contiguous and on one device, with f32 weights, moments and
//! averages and f32 or bf16 gradients, each function is one or two launches of
//! `kernels/foreach.cu` for the whole list, updating in place. Everywhere else it runs candle
//! ops per tensor: the CPU reference, and the exact op sequence the trainer used before the
//! kernels existed. The AdamW and EMA kernels round as those ops do, so both paths give the
//! same bits on the GPU; the norm sums in another order (deterministic too, and within f32
//! rounding of the per-tensor sums).
//!
//! Gradients of a bf16 plan are read in bf16 and widened to f32 per element, inside the kernel
//! (per tensor on the candle path), as apex's `FusedAdam` and PyTorch's `_multi_tensor_adamw`
//! read half-precision gradients against fp32 master weights: the widening is exact, so this
//! is the update of the f32 gradients, without the f32 copy of every gradient (4 bytes a
//! parameter at the update's peak). The update also writes the bf16 model copy of each master
//! in the same pass, where Megatron's `Float16OptimizerWithFloat16Params` copies the main
//! params back to the model in a second pass over all weights.
use candle_core::{bail, DType, Result, Tensor, Var};

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

/// Whether the fused kernels serve these lists: contiguous tensors on one CUDA device, each
/// list of the dtype paired with it.
#[cfg(feature = "cuda")]
fn fused(lists: &[(&[Tensor], DType)]) -> bool {
    let Some(first) = lists.iter().flat_map(|(l, _)| l.iter()).next() else { return false };
    lists.iter().all(|(l, dtype)| l.iter().all(|t| t.device().is_cuda() && t.device().same_device(first.device()) && t.dtype() == *dtype && t.is_contiguous()))
}

/// The dtype the fused kernels read `grads` in: that of the first, when it is f32 or bf16.
#[cfg(feature = "cuda")]
fn grad_dtype(grads: &[Tensor]) -> Option<DType> {
    grads.first().map(Tensor::dtype).filter(|d| matches!(d, DType::F32 | DType::BF16))
}

/// `Σ_t Σ_i t_i²` over every tensor of the list (the global gradient norm squared), in f32
/// whatever the tensors' dtype: bf16 gradients are widened per element (per tensor on the
/// candle path), never squared or summed in bf16.
pub fn sum_of_squares(ts: &[Tensor]) -> Result<f32> {
    if ts.is_empty() {
        return Ok(0.0);
    }
    #[cfg(feature = "cuda")]
    if grad_dtype(ts).is_some_and(|d| fused(&[(ts, d)])) {
        return super::cuda::sum_of_squares(ts);
    }
    let sq: Vec<Tensor> = ts.iter().map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()).collect::<Result<_>>()?;
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
/// anything else). A gradient of another dtype than its parameter (a bf16 plan's) is widened to
/// the parameter's dtype first. With `copies` (the model's weights in its compute dtype, one
/// per parameter), each copy is set to its updated parameter cast to the copy's dtype.
pub fn adamw_update(vars: &[Var], copies: Option<&[Var]>, grads: &[Tensor], m: &mut [Tensor], v: &mut [Tensor], u: &AdamWUpdate) -> Result<()> {
    let n_copies = copies.map_or(vars.len(), <[Var]>::len);
    check_lengths("AdamW", vars.len(), &[("gradients", grads.len()), ("first moments", m.len()), ("second moments", v.len()), ("model copies", n_copies)])?;
    for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
        if var.dims() != g.dims() || var.dims() != m[i].dims() || var.dims() != v[i].dims() || copies.is_some_and(|c| c[i].dims() != var.dims()) {
            let copy = copies.map(|c| c[i].dims());
            bail!("AdamW: parameter {i} has shape {:?}, its gradient {:?}, its moments {:?} and {:?}, its model copy {copy:?}", var.dims(), g.dims(), m[i].dims(), v[i].dims());
        }
    }
    #[cfg(feature = "cuda")]
    {
        let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let copies: Vec<Tensor> = copies.unwrap_or(&[]).iter().map(|v| v.as_tensor().clone()).collect();
        if let Some(gd) = grad_dtype(grads) {
            if fused(&[(&params, DType::F32), (grads, gd), (m, DType::F32), (v, DType::F32), (&copies, DType::BF16)]) {
                return super::cuda::adamw(&params, &copies, grads, m, v, u);
            }
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
        let mut g = g.detach().to_dtype(var.dtype())?;
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
        if let Some(c) = copies {
            c[i].set(&p.to_dtype(c[i].dtype())?)?;
        }
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
    if fused(&[(ema, DType::F32), (params, DType::F32)]) {
        return super::cuda::ema(ema, params, decay);
    }
    for (e, p) in ema.iter_mut().zip(params) {
        // Detached so the average does not hold on to every earlier average (op tracking).
        *e = ((&*e * decay)? + (p.detach() * (1.0 - decay))?)?.detach();
    }
    Ok(())
}
