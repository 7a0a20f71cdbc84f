//! DDPM and DDIM sampling loops over a respaced Gaussian diffusion, mirroring the official
//! `GaussianDiffusion.p_sample_loop_progressive` / `ddim_sample_loop_progressive` as called by
//! `sample.py` (`model.forward_with_cfg`, `z = cat[z, z]`, `y = cat[classes, null]`).
//!
//! The official loops carry the doubled batch, but `forward_with_cfg` only ever reads its first
//! half and `sample.py` drops the second at the end (`samples.chunk(2)`): the null half's state
//! never influences the result. These loops carry the N conditional images only and double
//! them for each forward ([`GuidedModel`]), which gives the same conditional trajectory.
use super::guidance::{Evaluation, GuidedModel};
use crate::diffusion::GaussianDiffusion;
use candle_core::{bail, Result, Tensor};

/// The schedule every DiT-MoE diffusion respaces (`create_diffusion(diffusion_steps=1000)`).
pub const DIFFUSION_STEPS: usize = 1000;

fn check_steps(steps: usize) -> Result<()> {
    if steps == 0 || steps > DIFFUSION_STEPS {
        bail!("{steps} sampling steps: must be in 1..={DIFFUSION_STEPS} (the diffusion schedule's length)")
    }
    Ok(())
}

/// Ancestral sampling (`p_sample`) with the learned variance (`learn_sigma`) or the fixed
/// large one, respaced to `steps` (respacing string `"{steps}"`, as `sample.py`'s
/// `create_diffusion(str(num_sampling_steps))`).
#[derive(Debug, Clone)]
pub struct DdpmSampler {
    diffusion: GaussianDiffusion,
    clip_denoised: bool,
}

impl DdpmSampler {
    /// Samples over any (respaced) `diffusion`. `clip_denoised` clamps the predicted x_0 to
    /// [-1, 1]: right for pixel-space models only (official `sample.py` passes `False` for its
    /// latent models).
    pub fn new(diffusion: GaussianDiffusion, clip_denoised: bool) -> Self {
        Self { diffusion, clip_denoised }
    }

    /// `steps` evenly spaced steps of the 1000-step schedule (`create_diffusion(str(steps))`).
    pub fn with_steps(steps: usize, learn_sigma: bool, clip_denoised: bool) -> Result<Self> {
        check_steps(steps)?;
        Ok(Self::new(GaussianDiffusion::create(&steps.to_string(), learn_sigma)?, clip_denoised))
    }

    pub fn steps(&self) -> usize {
        self.diffusion.num_timesteps()
    }

    /// `p_sample_loop(..., noise=z)`: `step_noise(k)` stands in for the `th.randn_like(x)` of
    /// the k-th step (drawn even at t = 0, where it is masked, as officially).
    pub fn sample(
        &self,
        model: &GuidedModel,
        z: &Tensor,
        step_noise: &mut dyn FnMut(usize) -> Result<Tensor>,
        on_eval: &mut dyn FnMut(&Evaluation),
    ) -> Result<Tensor> {
        run_loop(&self.diffusion, model, z, on_eval, |k, out, x, t| {
            Ok(self.diffusion.p_sample(out, x, t, &step_noise(k)?, self.clip_denoised)?.sample)
        })
    }
}

/// DDIM (Song et al. eq. 12) with stochasticity `eta` (0 = deterministic, the official
/// default), respaced with the DDIM paper's integer stride (respacing string `"ddim{steps}"`).
///
/// Why official DDIM samples of the S and B checkpoints come out corrupted
/// (feizc/DiT-MoE issue #9) and these do not, as far as the code shows: the official
/// `ddim_sample_loop` defaults to `clip_denoised=True`, clamping the predicted x_0 to [-1, 1]
/// at every step, while `sample.py` passes `clip_denoised=False` only to `p_sample_loop`;
/// swapping in the DDIM loop keeps the clamp. That is right for pixels, wrong for SD-VAE
/// latents (scaled by 0.18215 to about unit variance, tails well past ±1). DDIM then rebuilds
/// `x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps'` from the clamped x_0 (eps' re-derived
/// from it), injecting the clamp error deterministically at every step with no fresh noise to
/// wash it out (eta = 0). The XL/G checkpoints are rectified-flow models and never meet this.
/// Here clamping belongs to the data space: the caller enables it for pixel-space models only.
/// The other suspects are harmless here: DDIM reads only the eps channels (the learned-sigma
/// half only feeds the DDPM variance), and the official 3-channel guidance leaves channel 3 of
/// a 4-channel latent on its own (unguided, conditional) trajectory, consistent per channel;
/// [`super::Guidance::guide_all_channels`] guides it too.
#[derive(Debug, Clone)]
pub struct DdimSampler {
    diffusion: GaussianDiffusion,
    eta: f64,
    clip_denoised: bool,
}

impl DdimSampler {
    /// DDIM steps over any (respaced) `diffusion`; `clip_denoised` as for [`DdpmSampler::new`].
    pub fn new(diffusion: GaussianDiffusion, eta: f64, clip_denoised: bool) -> Result<Self> {
        if !(eta.is_finite() && eta >= 0.0) {
            bail!("DDIM eta {eta} must be finite and >= 0")
        }
        Ok(Self { diffusion, eta, clip_denoised })
    }

    /// The DDIM paper's striding (`create_diffusion("ddim{steps}")`); fails when no integer
    /// stride of the 1000-step schedule gives exactly `steps` steps (e.g. 300).
    pub fn with_steps(steps: usize, learn_sigma: bool, eta: f64, clip_denoised: bool) -> Result<Self> {
        check_steps(steps)?;
        Self::new(GaussianDiffusion::create(&format!("ddim{steps}"), learn_sigma)?, eta, clip_denoised)
    }

    pub fn steps(&self) -> usize {
        self.diffusion.num_timesteps()
    }

    /// `ddim_sample_loop(..., noise=z, eta)`: `step_noise` is only called when eta > 0 (with
    /// eta = 0 the noise term is exactly zero).
    pub fn sample(
        &self,
        model: &GuidedModel,
        z: &Tensor,
        step_noise: &mut dyn FnMut(usize) -> Result<Tensor>,
        on_eval: &mut dyn FnMut(&Evaluation),
    ) -> Result<Tensor> {
        run_loop(&self.diffusion, model, z, on_eval, |k, out, x, t| {
            let noise = if self.eta > 0.0 { Some(step_noise(k)?) } else { None };
            Ok(self.diffusion.ddim_sample(out, x, t, noise.as_ref(), self.clip_denoised, self.eta)?.sample)
        })
    }
}

/// The loop both samplers share: respaced indices `num_timesteps - 1 .. 0`, the model fed the
/// original timesteps (`_WrappedModel`), one `step(k, model_output, x_t, t)` per index. The
/// noise level of a step (where guidance applies, [`super::GuidanceInterval`]) is its original
/// timestep over the schedule's length.
fn run_loop<F>(
    diffusion: &GaussianDiffusion,
    model: &GuidedModel,
    z: &Tensor,
    on_eval: &mut dyn FnMut(&Evaluation),
    mut step: F,
) -> Result<Tensor>
where
    F: FnMut(usize, &Tensor, &Tensor, &[usize]) -> Result<Tensor>,
{
    let n = model.batch();
    let total = diffusion.num_timesteps();
    let mut x = z.clone();
    for (k, i) in (0..total).rev().enumerate() {
        let t_idx = vec![i; n];
        let timesteps = diffusion.model_timesteps(&t_idx)?;
        let level = timesteps[0] as f64 / diffusion.original_num_steps() as f64;
        let t = Tensor::new(timesteps, z.device())?;
        let out = model.gaussian_output(&x, &t, level)?;
        on_eval(&Evaluation { index: k, total, x: &x, t: &t, forward_batch: model.forward_batch(level) });
        x = step(k, &out, &x, &t_idx)?;
    }
    Ok(x)
}
