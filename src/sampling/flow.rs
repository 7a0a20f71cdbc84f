//! Rectified-flow sampling (official `RectifiedFlow.sample`): Euler, or Heun's second-order
//! method, from t = 1 (noise) to t = 0 (data) on the uniform grid `t = i / steps`.
//!
//! Official `sample.py` hard-codes 50 steps and guidance 7.0 in its rectified-flow branch and
//! ignores `--num-sampling-steps`/`--cfg-scale`; here both are the caller's.
use super::guidance::{Evaluation, GuidedModel};
use crate::diffusion::{sample_euler_indexed, sample_heun_indexed, FlowTimeGrid};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct RectifiedFlowSampler {
    grid: FlowTimeGrid,
    heun: bool,
}

impl RectifiedFlowSampler {
    /// The uniform grid `t = i / steps`, fed to the model as is (DiT-MoE).
    pub fn new(steps: usize, heun: bool) -> Result<Self> {
        Ok(Self { grid: FlowTimeGrid::uniform(steps)?, heun })
    }

    /// The grid the model family was trained with (`DitConfig::flow_time_scale`): DiT-MoE's
    /// uniform t, or ProMoE's flow-matching sigmas fed as `sigma * 1000`.
    pub fn for_model(cfg: &crate::DitConfig, steps: usize, heun: bool) -> Result<Self> {
        let scale = cfg.flow_time_scale();
        if scale == 1.0 {
            Self::new(steps, heun)
        } else {
            Ok(Self { grid: FlowTimeGrid::shifted_sigmas(steps, 1.0, scale)?, heun })
        }
    }

    pub fn grid(&self) -> &FlowTimeGrid {
        &self.grid
    }

    pub fn steps(&self) -> usize {
        self.grid.steps()
    }

    /// Model evaluations: one per Euler step; Heun's `2n - 1` (its last step is plain Euler).
    pub fn evaluations(&self) -> usize {
        if self.heun {
            2 * self.steps() - 1
        } else {
            self.steps()
        }
    }

    /// Integrates from `z` (the noise at t = 1); the model is fed t as f32 (official
    /// `torch.tensor([t] * b)`), guided on every channel at the levels the guidance interval
    /// holds.
    pub fn sample(&self, model: &GuidedModel, z: &Tensor, on_eval: &mut dyn FnMut(&Evaluation)) -> Result<Tensor> {
        let n = model.batch();
        let total = self.evaluations();
        let mut index = 0;
        // The guidance interval is on the grid time itself: its f32 model time only rounds it
        // (t = 0.6 is fed as 0.6000000238, outside an interval that ends at 0.6).
        let velocity = |x: &Tensor, i: usize| -> Result<Tensor> {
            let level = self.grid.times()[i];
            let t = Tensor::full(self.grid.model_time(i), n, x.device())?;
            let v = model.velocity(x, &t, level)?;
            on_eval(&Evaluation { index, total, x, t: &t, forward_batch: model.forward_batch(level) });
            index += 1;
            Ok(v)
        };
        let run = if self.heun { sample_heun_indexed(z, &self.grid, velocity)? } else { sample_euler_indexed(z, &self.grid, velocity)? };
        match run.states.into_iter().last() {
            Some(x) => Ok(x),
            None => candle_core::bail!("flow sampler returned no state"),
        }
    }
}
