//! DPM-Solver++ (2M) for the Gaussian (DDPM-trained, epsilon-predicting) DiT-MoE models,
//! exactly as diffusers' `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`,
//! `solver_order=2`, `solver_type="midpoint"`, `lower_order_final=True`,
//! `final_sigmas_type="zero"`, `timestep_spacing="linspace"`, `prediction_type="epsilon"`,
//! `use_karras_sigmas=False`, `thresholding=False`, on DiT's linear beta schedule (1e-4..0.02
//! over 1000 steps). Checked step by step against diffusers 0.35.2 (tests/suite/dpm_solver.rs,
//! fixture `tests/fixtures/dpm_solver`, made by `scripts/make_dpm_fixture.py`).
//!
//! The schedule is diffusers' float32 one, not the official `GaussianDiffusion`'s float64:
//! `torch.linspace` betas in f32 (reproduced bit for bit), `alphas = 1 - betas` in f32, their
//! cumulative product (accumulated in f64 and rounded, as torch's CPU `cumprod` does) and
//! `sigma = sqrt((1 - ab) / ab)` in f32 (a correctly rounded sqrt; torch's CPU sqrt is 1 ulp
//! off it for some entries, so the sigmas agree with diffusers' to ~1e-7 relative).
//! The f32 alphas put the sigmas up to ~1e-4 (relative) away from the float64 schedule's, so
//! matching diffusers needs its arithmetic. The per-step coefficients are f32 too, as diffusers'
//! 0-dim tensors.
//!
//! With `n` steps the timesteps are `round(linspace(0, 999, n + 1))` reversed without the final
//! 0 (20 steps: 999, 949, ..., 50), the sigmas those timesteps' plus a final 0. Step `k`
//! predicts `x0 = (x - sigma_k eps) / alpha_k` and moves to sigma_{k+1}: first order (DDIM) at
//! the first step and the last (final sigma 0: the result is the last x0 prediction), the
//! midpoint 2nd-order multistep update in between.
//!
//! Learned-sigma models: only the epsilon half of the output is read, as diffusers' DiT
//! pipeline splits the channels before calling the scheduler. Guidance is the Gaussian
//! samplers' ([`GuidedModel::gaussian_output`]).
use super::gaussian::DIFFUSION_STEPS;
use super::guidance::{Evaluation, GuidedModel};
use candle_core::{bail, DType, Result, Tensor};

/// DPM-Solver++ (2M) over the 1000-step linear schedule.
#[derive(Debug, Clone)]
pub struct DpmSolverSampler {
    /// Original-schedule timesteps fed to the model, descending, one per step.
    timesteps: Vec<usize>,
    /// diffusers' `scheduler.sigmas`: one per step plus the final 0.
    sigmas: Vec<f32>,
    clip_x0: bool,
}

impl DpmSolverSampler {
    /// `steps` steps (1..=999: 1000 would repeat timesteps); `clip_x0` clamps every x0
    /// prediction to [-1, 1], right for pixel-space models only (as for
    /// [`super::DdimSampler`]; diffusers' `thresholding=False` is `clip_x0 = false`).
    pub fn with_steps(steps: usize, clip_x0: bool) -> Result<Self> {
        if steps == 0 || steps > DIFFUSION_STEPS {
            bail!("{steps} sampling steps: must be in 1..={DIFFUSION_STEPS} (the diffusion schedule's length)")
        }
        let timesteps = linspace_timesteps(steps);
        if timesteps.windows(2).any(|w| w[0] <= w[1]) {
            bail!("{steps} DPM-Solver steps repeat timesteps of the {DIFFUSION_STEPS}-step schedule: use at most {}", DIFFUSION_STEPS - 1)
        }
        let all = diffusers_sigmas();
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| all[t]).collect();
        sigmas.push(0.0);
        Ok(Self { timesteps, sigmas, clip_x0 })
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The timesteps fed to the model (diffusers' `scheduler.timesteps`).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// diffusers' `scheduler.sigmas` (`steps + 1` entries, the last 0).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// A fresh solver state for driving the steps by hand (replays, tests).
    pub fn start(&self) -> DpmSolverState<'_> {
        DpmSolverState { sampler: self, index: 0, prev_x0: None }
    }

    /// Samples from `z` (x_T, N(0, I): diffusers' `init_noise_sigma` is 1), one model
    /// evaluation per step; deterministic (no step noise). Returns the final sample, f32.
    pub fn sample(&self, model: &GuidedModel, z: &Tensor, on_eval: &mut dyn FnMut(&Evaluation)) -> Result<Tensor> {
        let n = model.batch();
        let c = model.config().in_channels;
        let total = self.steps();
        let mut state = self.start();
        let mut x = z.to_dtype(DType::F32)?;
        for (k, &ts) in self.timesteps.iter().enumerate() {
            let t = Tensor::new(vec![ts as i64; n], z.device())?;
            // The noise level the guidance interval is on: the timestep over the schedule.
            let level = ts as f64 / DIFFUSION_STEPS as f64;
            // The epsilon half (learned-sigma models carry the variance values after it).
            let eps = model.gaussian_output(&x, &t, level)?.narrow(1, 0, c)?;
            on_eval(&Evaluation { index: k, total, x: &x, t: &t, forward_batch: model.forward_batch(level) });
            x = state.step(&eps, &x)?;
        }
        Ok(x)
    }
}

/// The multistep state of one run: the step index and the previous x0 prediction.
#[derive(Debug, Clone)]
pub struct DpmSolverState<'a> {
    sampler: &'a DpmSolverSampler,
    index: usize,
    prev_x0: Option<Tensor>,
}

impl DpmSolverState<'_> {
    /// Steps taken so far.
    pub fn index(&self) -> usize {
        self.index
    }

    /// diffusers' `scheduler.step(eps, timesteps[k], sample).prev_sample` for the next step k:
    /// `eps` is the model's epsilon at `sample` (same shape); returns the sample at sigma_{k+1}.
    pub fn step(&mut self, eps: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let s = self.sampler;
        let k = self.index;
        if k >= s.steps() {
            bail!("DPM-Solver: all {} steps already taken", s.steps())
        }
        if eps.dims() != sample.dims() {
            bail!("DPM-Solver: model output {:?} and sample {:?} differ in shape", eps.dims(), sample.dims())
        }
        let sample = sample.to_dtype(DType::F32)?;
        let eps = eps.to_dtype(DType::F32)?;
        let (alpha_s0, sigma_s0) = alpha_sigma(s.sigmas[k]);
        let (alpha_t, sigma_t) = alpha_sigma(s.sigmas[k + 1]);
        // convert_model_output: x0 = (x - sigma_t eps) / alpha_t.
        let mut x0 = (&sample - (&eps * f64::from(sigma_s0))?)?.broadcast_div(&Tensor::new(alpha_s0, sample.device())?)?;
        if s.clip_x0 {
            x0 = x0.clamp(-1f32, 1f32)?;
        }
        let lambda = |alpha: f32, sigma: f32| alpha.ln() - sigma.ln();
        let (lambda_t, lambda_s0) = (lambda(alpha_t, sigma_t), lambda(alpha_s0, sigma_s0));
        let h = lambda_t - lambda_s0;
        let ratio = sigma_t / sigma_s0;
        let c = alpha_t * ((-h).exp() - 1.0);
        let last = k + 1 == s.steps();
        let x = match (&self.prev_x0, last) {
            // First order (DDIM) at the first step and, lower_order_final with final sigma 0,
            // at the last.
            (None, _) | (_, true) => ((&sample * f64::from(ratio))? - (&x0 * f64::from(c))?)?,
            (Some(m1), false) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(s.sigmas[k - 1]);
                let h_0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
                let r0 = h_0 / h;
                let d1 = ((&x0 - m1)? * f64::from(1.0 / r0))?;
                (((&sample * f64::from(ratio))? - (&x0 * f64::from(c))?)? - (d1 * f64::from(0.5 * c))?)?
            }
        };
        self.prev_x0 = Some(x0);
        self.index += 1;
        Ok(x)
    }
}

/// diffusers' `_sigma_to_alpha_sigma_t` in f32: alpha = 1 / sqrt(sigma^2 + 1), sigma_t =
/// sigma alpha.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `np.linspace(0, 999, steps + 1).round()[::-1][:-1]` (numpy's linspace, round half to even).
fn linspace_timesteps(steps: usize) -> Vec<usize> {
    let stop = (DIFFUSION_STEPS - 1) as f64;
    let step = stop / steps as f64;
    let mut y: Vec<f64> = (0..=steps).map(|i| i as f64 * step).collect();
    y[steps] = stop;
    y.iter().rev().take(steps).map(|v| v.round_ties_even() as usize).collect()
}

/// diffusers' f32 `sqrt((1 - alphas_cumprod) / alphas_cumprod)` for every original timestep.
fn diffusers_sigmas() -> Vec<f32> {
    let mut acc = 1f64;
    torch_linspace_f32(0.0001, 0.02, DIFFUSION_STEPS)
        .into_iter()
        .map(|b| {
            acc *= f64::from(1.0 - b);
            let ab = acc as f32;
            ((1.0 - ab) / ab).sqrt()
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` bit for bit as torch's CPU kernel
/// computes it (f32 step, the first half from `start`, the second from `end`, each a fused
/// multiply-add). The correctly rounded f64 `linear_betas` differ from these in the last bit
/// for about a third of the entries, enough to move the first x0 predictions (x - sigma eps) /
/// alpha, at alpha ~ 0.006, by ~1e-5 relative.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| if i < n / 2 { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_follow_linspace_spacing() {
        assert_eq!(linspace_timesteps(10), vec![999, 899, 799, 699, 599, 500, 400, 300, 200, 100]);
        assert_eq!(linspace_timesteps(1), vec![999]);
        assert!(DpmSolverSampler::with_steps(999, false).is_ok());
        assert!(DpmSolverSampler::with_steps(1000, false).is_err());
        assert!(DpmSolverSampler::with_steps(0, false).is_err());
    }
}
