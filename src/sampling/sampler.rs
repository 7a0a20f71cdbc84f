//! `Sampler`: the one type callers hold, whichever process generates the images, with the
//! explicit-noise entry point (replays, parity tests) and the seeded one that wraps it.
use super::dpm_solver::DpmSolverSampler;
use super::flow::RectifiedFlowSampler;
use super::gaussian::{DdimSampler, DdpmSampler};
use super::guidance::{Evaluation, GuidedModel};
use super::noise::ImageNoise;
use candle_core::{bail, Result, Tensor};

#[derive(Debug, Clone)]
pub enum Sampler {
    Ddpm(DdpmSampler),
    Ddim(DdimSampler),
    DpmSolver(DpmSolverSampler),
    RectifiedFlow(RectifiedFlowSampler),
}

impl Sampler {
    /// Sampling steps of one run.
    pub fn steps(&self) -> usize {
        match self {
            Self::Ddpm(s) => s.steps(),
            Self::Ddim(s) => s.steps(),
            Self::DpmSolver(s) => s.steps(),
            Self::RectifiedFlow(s) => s.steps(),
        }
    }

    /// Model evaluations of one run (the progress total): one per step, except Heun.
    pub fn evaluations(&self) -> usize {
        match self {
            Self::RectifiedFlow(s) => s.evaluations(),
            _ => self.steps(),
        }
    }

    /// Samples the batch of `model` from the initial noise `z` (N, C, H, W): DDPM/DDIM start at
    /// x_T = z, rectified flow at t = 1 with z. `step_noise(k)` gives the fresh noise of step k
    /// (N, C, H, W) for the samplers that draw some (DDPM, DDIM with eta > 0; not DPM-Solver++); `on_eval` is
    /// called after every model evaluation. Returns the final sample (N, C, H, W), f32.
    pub fn sample(
        &self,
        model: &GuidedModel,
        z: &Tensor,
        step_noise: &mut dyn FnMut(usize) -> Result<Tensor>,
        on_eval: &mut dyn FnMut(&Evaluation),
    ) -> Result<Tensor> {
        let cfg = model.config();
        let want = [model.batch(), cfg.in_channels, cfg.input_size, cfg.input_size];
        if z.dims() != want {
            bail!("initial noise has shape {:?}, the batch needs {want:?}", z.dims())
        }
        match self {
            Self::Ddpm(s) => s.sample(model, z, step_noise, on_eval),
            Self::Ddim(s) => s.sample(model, z, step_noise, on_eval),
            Self::DpmSolver(s) => s.sample(model, z, on_eval),
            Self::RectifiedFlow(s) => s.sample(model, z, on_eval),
        }
    }

    /// [`Self::sample`] with every draw (the initial noise, then each step's noise) taken from
    /// the per-image streams of `noise`, which must hold one stream per image of the batch.
    pub fn sample_seeded(&self, model: &GuidedModel, noise: &mut ImageNoise, on_eval: &mut dyn FnMut(&Evaluation)) -> Result<Tensor> {
        if noise.len() != model.batch() {
            bail!("{} noise streams for a batch of {} images", noise.len(), model.batch())
        }
        let cfg = model.config();
        let per_image = (cfg.in_channels, cfg.input_size, cfg.input_size);
        let device = model.device();
        let z = noise.draw(per_image, &device)?;
        self.sample(model, &z, &mut |_| noise.draw(per_image, &device), on_eval)
    }
}
