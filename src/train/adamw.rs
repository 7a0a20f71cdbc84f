//! AdamW with exportable state (candle-nn's `AdamW` keeps its moments private, so a
//! checkpoint could not resume it). The update is `torch.optim.AdamW` step for step
//! (`_single_tensor_adamw`): decoupled weight decay, then
//! `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`.
use crate::train::kernels::foreach::{adamw_update, AdamWUpdate};
use candle_core::{bail, Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// The optimizer over a fixed, named list of variables.
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var)>,
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
        Ok(Self { params, vars, m, v, step: 0 })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with `grads[i]` the gradient of `vars()[i]`, at learning rate `lr`, the
    /// gradients first scaled by `grad_scale` (global-norm clipping) where given.
    pub fn step(&mut self, grads: &[Tensor], lr: f64, grad_scale: Option<f64>) -> Result<()> {
        if grads.len() != self.vars.len() {
            bail!("AdamW: {} gradients for {} parameters", grads.len(), self.vars.len());
        }
        self.step += 1;
        let AdamWParams { weight_decay, beta1, beta2, eps } = self.params;
        let update = AdamWUpdate {
            beta1,
            beta2,
            eps,
            decay: (weight_decay != 0.0).then_some(1.0 - lr * weight_decay),
            // candle's `t / x` is `t * (1 / x)`: the same constant as the division had.
            inv_bias_correction2: 1.0 / (1.0 - beta2.powi(self.step as i32)).sqrt(),
            step_size: lr / (1.0 - beta1.powi(self.step as i32)),
            grad_scale,
        };
        let vars: Vec<Var> = self.vars.iter().map(|(_, v)| v.clone()).collect();
        adamw_update(&vars, grads, &mut self.m, &mut self.v, &update)
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
        opt.step(&[Tensor::new(&[g1 as f32], &Device::Cpu).unwrap()], lr, None).unwrap();
        opt.step(&[Tensor::new(&[g2 as f32], &Device::Cpu).unwrap()], lr, None).unwrap();
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
}
