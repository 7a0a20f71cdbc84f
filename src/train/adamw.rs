//! AdamW with exportable state (candle-nn's `AdamW` keeps its moments private, so a
//! checkpoint could not resume it). The update is `torch.optim.AdamW` step for step
//! (`_single_tensor_adamw`): decoupled weight decay, then
//! `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`.
//!
//! In a bf16 plan the variables are the f32 masters and the optimizer also holds the model's
//! bf16 copies of them: it reads the bf16 gradients as they are and writes the copies in the
//! update's pass (`foreach::adamw_update`). The update runs over groups of parameters and frees
//! each group's gradients once its update is done, so it adds at most one group's temporaries
//! to the memory the gradients already hold, and that memory shrinks as the update proceeds.
use crate::train::kernels::foreach::{adamw_update, AdamWUpdate};
use candle_core::{bail, Result, Tensor, Var};

/// Elements per group of the update: 64 Mi elements (128 MiB of bf16 gradients), so a
/// DiT-MoE-XL/2 update (4.2 G parameters) is a few dozen fused launches, each with its own
/// pointer table, instead of one per parameter.
const GROUP_ELEMENTS: usize = 1 << 26;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl AdamWParams {
    /// The fused update's constants for optimizer step `step` (1-based) at rate `lr`:
    /// `torch.optim.AdamW`'s bias corrections and decoupled weight decay.
    pub fn update(&self, lr: f64, step: u64, grad_scale: Option<f64>) -> AdamWUpdate {
        AdamWUpdate {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            decay: (self.weight_decay != 0.0).then_some(1.0 - lr * self.weight_decay),
            // candle's `t / x` is `t * (1 / x)`: the same constant as the division had.
            inv_bias_correction2: 1.0 / (1.0 - self.beta2.powi(step as i32)).sqrt(),
            step_size: lr / (1.0 - self.beta1.powi(step as i32)),
            grad_scale,
        }
    }
}

/// The optimizer over a fixed, named list of variables.
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var)>,
    /// The model's compute-dtype copies of `vars` (aligned), written by every update; None
    /// when the model runs on `vars` themselves.
    copies: Option<Vec<Var>>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far (torch's per-parameter `state['step']`, equal for all here).
    step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        // Separate storages: the fused update writes each moment in place.
        let zeros = || vars.iter().map(|(_, v)| v.zeros_like()).collect::<Result<Vec<_>>>();
        let (m, v) = (zeros()?, zeros()?);
        Ok(Self { params, vars, copies: None, m, v, step: 0 })
    }

    /// The optimizer that also keeps `copies[i]`, the model's weight in its compute dtype, equal
    /// to `vars()[i]` cast to that dtype after every update.
    pub fn with_model_copies(mut self, copies: Vec<Var>) -> Result<Self> {
        if copies.len() != self.vars.len() {
            bail!("AdamW: {} model copies for {} parameters", copies.len(), self.vars.len());
        }
        for ((name, var), copy) in self.vars.iter().zip(&copies) {
            if copy.dims() != var.dims() {
                bail!("AdamW: `{name}` has shape {:?}, its model copy {:?}", var.dims(), copy.dims());
            }
        }
        self.copies = Some(copies);
        Ok(self)
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with `grads[i]` the gradient of `vars()[i]` (f32, or the model copies'
    /// dtype), at learning rate `lr`, the gradients first scaled by `grad_scale` (global-norm
    /// clipping) where given. Each group's gradients are dropped as soon as its update is done
    /// (they are freed then unless the caller holds them elsewhere).
    pub fn step(&mut self, grads: Vec<Tensor>, lr: f64, grad_scale: Option<f64>) -> Result<()> {
        if grads.len() != self.vars.len() {
            bail!("AdamW: {} gradients for {} parameters", grads.len(), self.vars.len());
        }
        self.step += 1;
        let update = self.params.update(lr, self.step, grad_scale);
        let vars: Vec<Var> = self.vars.iter().map(|(_, v)| v.clone()).collect();
        let mut grads = grads.into_iter();
        for range in groups(&vars, GROUP_ELEMENTS) {
            let group: Vec<Tensor> = grads.by_ref().take(range.len()).collect();
            let copies = self.copies.as_deref().map(|c| &c[range.clone()]);
            adamw_update(&vars[range.clone()], copies, &group, &mut self.m[range.clone()], &mut self.v[range], &update)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<param>`, `v.<param>`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.vars.len());
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("m.{name}"), self.m[i].clone()));
            out.push((format!("v.{name}"), self.v[i].clone()));
        }
        out
    }

    /// Restores the moments and the step counter saved by [`Self::state_tensors`].
    pub fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (key, slot) in [(format!("m.{name}"), &mut self.m[i]), (format!("v.{name}"), &mut self.v[i])] {
                let t = tensors.get(&key).ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks `{key}`")))?;
                if t.dims() != var.dims() {
                    bail!("optimizer state `{key}` has shape {:?}, the parameter {:?}", t.dims(), var.dims());
                }
                // A copy: the fused update writes the moments in place.
                *slot = t.to_device(var.device())?.to_dtype(var.dtype())?.copy()?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Consecutive index ranges of `vars` of at most `max_elements` elements each (a larger tensor
/// alone), covering all of them in order.
fn groups(vars: &[Var], max_elements: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut elements) = (0, 0);
    for (i, var) in vars.iter().enumerate() {
        if i > start && elements + var.elem_count() > max_elements {
            out.push(start..i);
            (start, elements) = (i, 0);
        }
        elements += var.elem_count();
    }
    if start < vars.len() {
        out.push(start..vars.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps on a scalar, checked against the closed form of torch's AdamW.
    #[test]
    fn matches_torch_update() {
        let var = Var::from_vec(vec![1.0f32], 1, &Device::Cpu).unwrap();
        let p = AdamWParams { weight_decay: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], p).unwrap();
        let (lr, g1, g2) = (0.01f64, 0.5f64, -0.25f64);
        opt.step(vec![Tensor::new(&[g1 as f32], &Device::Cpu).unwrap()], lr, None).unwrap();
        opt.step(vec![Tensor::new(&[g2 as f32], &Device::Cpu).unwrap()], lr, None).unwrap();
        let mut w = 1.0f64;
        let (mut m, mut v) = (0.0, 0.0);
        for (t, g) in [(1, g1), (2, g2)] {
            w *= 1.0 - lr * 0.1;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let bc1 = 1.0 - 0.9f64.powi(t);
            let bc2 = 1.0 - 0.999f64.powi(t);
            w -= lr / bc1 * m / (v.sqrt() / bc2.sqrt() + 1e-8);
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - w).abs() < 1e-6, "{got} vs {w}");
        assert_eq!(opt.step_count(), 2);
    }

    /// The update's groups cover every parameter once, in order, each within the budget
    /// unless one tensor alone exceeds it.
    #[test]
    fn groups_cover_the_parameters_within_the_budget() {
        let sizes = [3usize, 4, 0, 10, 1, 1, 2, 0];
        let vars: Vec<Var> = sizes.iter().map(|&n| Var::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap()).collect();
        let got = groups(&vars, 5);
        assert_eq!(got, vec![0..1, 1..3, 3..4, 4..8]);
        assert_eq!(groups(&vars, 1 << 20), vec![0..8]);
        assert!(groups(&[], 5).is_empty());
    }
}
