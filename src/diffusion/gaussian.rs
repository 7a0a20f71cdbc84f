//! Gaussian diffusion maths (DDPM / DDIM), mirroring the official
//! `diffusion/gaussian_diffusion.py::GaussianDiffusion` as wrapped by `respace.py::SpacedDiffusion`
//! and built by `diffusion/__init__.py::create_diffusion` (eps prediction, MSE loss with the
//! learned-variance VB term).
//!
//! The caller runs the model: functions take the model output as a tensor (or, where the
//! official code calls the model on a value computed inside, such as `x_t` in
//! `training_losses`, a closure). Timesteps `t` are indices into the *respaced* schedule; the
//! model must be fed `model_timesteps(t)` (the original timesteps, as `_WrappedModel` does).
//!
//! Precision follows the official code: the schedule lives in `f64`, the gathered entries are
//! cast to `f32` (`_extract_into_tensor`) and all tensor arithmetic is `f32`, in the official
//! operation order.

use candle_core::{bail, Result, Tensor};

use super::respace::{respace_betas, space_timesteps};
use super::schedule::{linear_betas, DiffusionSchedule};

/// Variance of p(x_{t-1} | x_t) (official `ModelVarType`, the two variants `create_diffusion`
/// produces with `sigma_small=False`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceType {
    /// `LEARNED_RANGE` (`learn_sigma=True`, the DiT-MoE default): the model outputs `2C`
    /// channels, `[eps | v]`, and `v` in [-1, 1] interpolates the log variance between the
    /// clipped posterior variance and beta_t.
    LearnedRange,
    /// `FIXED_LARGE` (`learn_sigma=False`): variance `beta_t`, except at t = 0 where the
    /// posterior variance of step 1 is used (for a better decoder log-likelihood).
    FixedLarge,
}

/// Output of `p_mean_variance` (official dict keys `mean`, `variance`, `log_variance`,
/// `pred_xstart`), all shaped like `x_t`.
#[derive(Debug, Clone)]
pub struct PMeanVariance {
    pub mean: Tensor,
    pub variance: Tensor,
    pub log_variance: Tensor,
    pub pred_xstart: Tensor,
}

/// Output of `p_sample` / `ddim_sample` (official keys `sample`, `pred_xstart`).
#[derive(Debug, Clone)]
pub struct SampleOut {
    pub sample: Tensor,
    pub pred_xstart: Tensor,
}

/// Output of `q_posterior_mean_variance`: mean, variance and clipped log variance of
/// q(x_{t-1} | x_t, x_0).
#[derive(Debug, Clone)]
pub struct Posterior {
    pub mean: Tensor,
    pub variance: Tensor,
    pub log_variance_clipped: Tensor,
}

/// Per-sample terms of `training_losses` (shape `[N]`). `vb` is present for learned variance
/// only; `loss = mse + vb` (or `mse` alone).
#[derive(Debug, Clone)]
pub struct TrainingLosses {
    pub mse: Tensor,
    pub vb: Option<Tensor>,
    pub loss: Tensor,
}

/// A (respaced) Gaussian diffusion process: the official `SpacedDiffusion`.
#[derive(Debug, Clone)]
pub struct GaussianDiffusion {
    schedule: DiffusionSchedule,
    timestep_map: Vec<usize>,
    original_num_steps: usize,
    var_type: VarianceType,
}

impl GaussianDiffusion {
    /// `create_diffusion(timestep_respacing, learn_sigma=...)` with every other argument at its
    /// official default: linear betas over 1000 steps, eps prediction, MSE (+ VB) loss.
    /// `timestep_respacing` as `space_timesteps` takes it ("" = all 1000 steps, "250",
    /// "ddim50", "10,20,30", ...).
    pub fn create(timestep_respacing: &str, learn_sigma: bool) -> Result<Self> {
        const DIFFUSION_STEPS: usize = 1000;
        let betas = linear_betas(DIFFUSION_STEPS)?;
        let use_timesteps = space_timesteps(DIFFUSION_STEPS, timestep_respacing)?;
        let var_type = if learn_sigma {
            VarianceType::LearnedRange
        } else {
            VarianceType::FixedLarge
        };
        Self::spaced(betas, &use_timesteps, var_type)
    }

    /// `SpacedDiffusion(use_timesteps, betas=base_betas, ...)`: builds the base process, keeps
    /// `use_timesteps` (sorted, unique) and rebuilds the betas from the kept cumulative
    /// products. Even with every step kept the betas are recomputed (as officially), which
    /// changes them by rounding only.
    pub fn spaced(
        base_betas: Vec<f64>,
        use_timesteps: &[usize],
        var_type: VarianceType,
    ) -> Result<Self> {
        let original_num_steps = base_betas.len();
        let base = DiffusionSchedule::from_betas(base_betas)?;
        let (betas, timestep_map) = respace_betas(&base.alphas_cumprod, use_timesteps)?;
        Ok(Self {
            schedule: DiffusionSchedule::from_betas(betas)?,
            timestep_map,
            original_num_steps,
            var_type,
        })
    }

    /// The respaced schedule's arrays (f64).
    pub fn schedule(&self) -> &DiffusionSchedule {
        &self.schedule
    }

    /// Number of respaced steps (official `num_timesteps`); valid `t` are `0..num_timesteps()`.
    pub fn num_timesteps(&self) -> usize {
        self.schedule.num_timesteps()
    }

    /// Number of steps of the process before respacing (official `original_num_steps`).
    pub fn original_num_steps(&self) -> usize {
        self.original_num_steps
    }

    /// `SpacedDiffusion.timestep_map`: respaced index -> original timestep.
    pub fn timestep_map(&self) -> &[usize] {
        &self.timestep_map
    }

    pub fn var_type(&self) -> VarianceType {
        self.var_type
    }

    /// What `_WrappedModel.__call__` feeds the model for respaced indices `t`:
    /// `timestep_map[t]` as int64 (the model never sees respaced indices).
    pub fn model_timesteps(&self, t: &[usize]) -> Result<Vec<i64>> {
        t.iter()
            .map(|&ti| match self.timestep_map.get(ti) {
                Some(&orig) => Ok(orig as i64),
                None => bail!(
                    "timestep {ti} out of range for a {}-step diffusion",
                    self.timestep_map.len()
                ),
            })
            .collect()
    }

    /// `_extract_into_tensor(arr, t, x.shape)`: gathers `arr[t]` in f64, casts to **f32** and
    /// shapes it `[N, 1, ..., 1]` for broadcasting against `x` (the official version adds a zero
    /// tensor of `x`'s shape instead; the values are the same).
    fn extract(&self, name: &str, arr: &[f64], t: &[usize], x: &Tensor) -> Result<Tensor> {
        let vals = gather(name, arr, t)?;
        per_sample_f32(&vals, x)
    }

    /// `q_sample(x_start, t, noise)`: draw from q(x_t | x_0) with the supplied noise:
    /// `sqrt(ab_t) * x_0 + sqrt(1 - ab_t) * noise`.
    pub fn q_sample(&self, x_start: &Tensor, t: &[usize], noise: &Tensor) -> Result<Tensor> {
        check_same_shape("q_sample", "noise", noise, x_start)?;
        let s = &self.schedule;
        let a = self.extract("sqrt_alphas_cumprod", &s.sqrt_alphas_cumprod, t, x_start)?;
        let b = self.extract(
            "sqrt_one_minus_alphas_cumprod",
            &s.sqrt_one_minus_alphas_cumprod,
            t,
            x_start,
        )?;
        x_start.broadcast_mul(&a)? + noise.broadcast_mul(&b)?
    }

    /// `q_posterior_mean_variance(x_start, x_t, t)`: q(x_{t-1} | x_t, x_0).
    pub fn q_posterior_mean_variance(
        &self,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &[usize],
    ) -> Result<Posterior> {
        check_same_shape("q_posterior_mean_variance", "x_start", x_start, x_t)?;
        let s = &self.schedule;
        let c1 = self.extract("posterior_mean_coef1", &s.posterior_mean_coef1, t, x_t)?;
        let c2 = self.extract("posterior_mean_coef2", &s.posterior_mean_coef2, t, x_t)?;
        let mean = (x_start.broadcast_mul(&c1)? + x_t.broadcast_mul(&c2)?)?;
        let variance = self
            .extract("posterior_variance", &s.posterior_variance, t, x_t)?
            .broadcast_as(x_t.shape())?;
        let log_variance_clipped = self
            .extract(
                "posterior_log_variance_clipped",
                &s.posterior_log_variance_clipped,
                t,
                x_t,
            )?
            .broadcast_as(x_t.shape())?;
        Ok(Posterior {
            mean,
            variance,
            log_variance_clipped,
        })
    }

    /// `(sqrt(1/ab_t), sqrt(1/ab_t - 1))` for `t`, shaped to broadcast against `x_t`: the two
    /// coefficients relating x_t, x_0 and eps, shared by both directions below.
    fn eps_xstart_coefficients(&self, t: &[usize], x_t: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = &self.schedule;
        let a = self.extract("sqrt_recip_alphas_cumprod", &s.sqrt_recip_alphas_cumprod, t, x_t)?;
        let b = self.extract("sqrt_recipm1_alphas_cumprod", &s.sqrt_recipm1_alphas_cumprod, t, x_t)?;
        Ok((a, b))
    }

    /// `_predict_xstart_from_eps`: `x_0 = sqrt(1/ab_t) * x_t - sqrt(1/ab_t - 1) * eps`.
    pub fn predict_xstart_from_eps(
        &self,
        x_t: &Tensor,
        t: &[usize],
        eps: &Tensor,
    ) -> Result<Tensor> {
        check_same_shape("predict_xstart_from_eps", "eps", eps, x_t)?;
        let (a, b) = self.eps_xstart_coefficients(t, x_t)?;
        x_t.broadcast_mul(&a)? - eps.broadcast_mul(&b)?
    }

    /// `_predict_eps_from_xstart`: the inverse of `predict_xstart_from_eps`
    /// (`(sqrt(1/ab_t) * x_t - x_0) / sqrt(1/ab_t - 1)`).
    pub fn predict_eps_from_xstart(
        &self,
        x_t: &Tensor,
        t: &[usize],
        pred_xstart: &Tensor,
    ) -> Result<Tensor> {
        check_same_shape("predict_eps_from_xstart", "pred_xstart", pred_xstart, x_t)?;
        let (a, b) = self.eps_xstart_coefficients(t, x_t)?;
        (x_t.broadcast_mul(&a)? - pred_xstart)?.broadcast_div(&b)
    }

    /// Splits a model output into `(eps, Some(var_values))` for learned variance
    /// (`th.split(model_output, C, dim=1)`, checking the `2C` channels) or `(eps, None)`.
    pub fn split_model_output(
        &self,
        model_output: &Tensor,
        x: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let c = x.dim(1)?;
        let mut expected = x.dims().to_vec();
        if self.var_type == VarianceType::LearnedRange {
            expected[1] = 2 * c;
        }
        if model_output.dims() != expected.as_slice() {
            bail!(
                "model_output has shape {:?}, expected {expected:?} for {:?} variance and x of shape {:?}",
                model_output.dims(),
                self.var_type,
                x.dims()
            );
        }
        match self.var_type {
            VarianceType::LearnedRange => Ok((
                model_output.narrow(1, 0, c)?,
                Some(model_output.narrow(1, c, c)?),
            )),
            VarianceType::FixedLarge => Ok((model_output.clone(), None)),
        }
    }

    /// `p_mean_variance(model, x, t, clip_denoised)` given the model's output at `(x, t)`:
    /// mean and (log-)variance of p(x_{t-1} | x_t) and the x_0 prediction (clamped to [-1, 1]
    /// when `clip_denoised`; official sampling uses `false`).
    pub fn p_mean_variance(
        &self,
        model_output: &Tensor,
        x: &Tensor,
        t: &[usize],
        clip_denoised: bool,
    ) -> Result<PMeanVariance> {
        let s = &self.schedule;
        let (eps, var_values) = self.split_model_output(model_output, x)?;
        let (variance, log_variance) = match var_values {
            Some(v) => {
                let min_log = self.extract(
                    "posterior_log_variance_clipped",
                    &s.posterior_log_variance_clipped,
                    t,
                    x,
                )?;
                let max_log = self.extract("log(betas)", &s.log_betas, t, x)?;
                // v in [-1, 1] spans [min_var, max_var] in log space.
                let frac = ((v + 1.0)? / 2.0)?;
                let one_minus_frac = frac.affine(-1.0, 1.0)?;
                let log_variance =
                    (frac.broadcast_mul(&max_log)? + one_minus_frac.broadcast_mul(&min_log)?)?;
                (log_variance.exp()?, log_variance)
            }
            None => {
                // FIXED_LARGE: np.append(posterior_variance[1], betas[1:]) and its f64 log,
                // each gathered and cast to f32 separately, as officially.
                let fixed_large: Vec<f64> = self.fixed_large_variance()?;
                let log_fixed_large: Vec<f64> = fixed_large.iter().map(|v| v.ln()).collect();
                let var = self.extract("fixed_large_variance", &fixed_large, t, x)?;
                let log_var = self.extract("log(fixed_large_variance)", &log_fixed_large, t, x)?;
                (
                    var.broadcast_as(x.shape())?,
                    log_var.broadcast_as(x.shape())?,
                )
            }
        };
        let mut pred_xstart = self.predict_xstart_from_eps(x, t, &eps)?;
        if clip_denoised {
            pred_xstart = pred_xstart.clamp(-1f32, 1f32)?;
        }
        let mean = self.q_posterior_mean_variance(&pred_xstart, x, t)?.mean;
        Ok(PMeanVariance {
            mean,
            variance,
            log_variance,
            pred_xstart,
        })
    }

    /// The FIXED_LARGE variance array `append(posterior_variance[1], betas[1:])`.
    fn fixed_large_variance(&self) -> Result<Vec<f64>> {
        let s = &self.schedule;
        if s.num_timesteps() < 2 {
            bail!("FIXED_LARGE variance needs at least 2 diffusion steps (uses posterior_variance[1])");
        }
        Ok(std::iter::once(s.posterior_variance[1])
            .chain(s.betas[1..].iter().copied())
            .collect())
    }

    /// `p_sample`: one ancestral (DDPM) step x_t -> x_{t-1}, with the caller's standard normal
    /// `noise` standing in for `th.randn_like(x)`:
    /// `sample = mean + (t != 0) * exp(0.5 * log_variance) * noise`.
    pub fn p_sample(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        noise: &Tensor,
        clip_denoised: bool,
    ) -> Result<SampleOut> {
        check_same_shape("p_sample", "noise", noise, x_t)?;
        let out = self.p_mean_variance(model_output, x_t, t, clip_denoised)?;
        let mask = nonzero_mask(t, x_t)?;
        let std = (out.log_variance * 0.5)?.exp()?;
        let sample = (out.mean + std.broadcast_mul(&mask)?.mul(noise)?)?;
        Ok(SampleOut {
            sample,
            pred_xstart: out.pred_xstart,
        })
    }

    /// `ddim_sample`: one DDIM step (Song et al. eq. 12) with stochasticity `eta`:
    /// `sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev)`,
    /// `sample = x0 * sqrt(ab_prev) + sqrt(1 - ab_prev - sigma^2) * eps' + (t != 0) * sigma * noise`
    /// where `eps'` is re-derived from the (possibly clipped) x_0 prediction. `noise` stands in
    /// for `th.randn_like(x)`; it may be `None` only when `eta == 0` (the noise term is then
    /// exactly zero, so skipping it changes nothing).
    pub fn ddim_sample(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        noise: Option<&Tensor>,
        clip_denoised: bool,
        eta: f64,
    ) -> Result<SampleOut> {
        let s = &self.schedule;
        let out = self.p_mean_variance(model_output, x_t, t, clip_denoised)?;
        let eps = self.predict_eps_from_xstart(x_t, t, &out.pred_xstart)?;
        let alpha_bar = self.extract("alphas_cumprod", &s.alphas_cumprod, t, x_t)?;
        let alpha_bar_prev = self.extract("alphas_cumprod_prev", &s.alphas_cumprod_prev, t, x_t)?;
        let one_minus_ab = alpha_bar.affine(-1.0, 1.0)?;
        let one_minus_abp = alpha_bar_prev.affine(-1.0, 1.0)?;
        let sigma = ((one_minus_abp.div(&one_minus_ab)?.sqrt()? * eta)?
            * (alpha_bar.div(&alpha_bar_prev)?.affine(-1.0, 1.0)?.sqrt()?))?;
        let eps_coef = (one_minus_abp - sigma.sqr()?)?.sqrt()?;
        let mean_pred = (out.pred_xstart.broadcast_mul(&alpha_bar_prev.sqrt()?)?
            + eps.broadcast_mul(&eps_coef)?)?;
        let sample = match noise {
            Some(noise) => {
                check_same_shape("ddim_sample", "noise", noise, x_t)?;
                let mask = nonzero_mask(t, x_t)?;
                (mean_pred + mask.mul(&sigma)?.broadcast_mul(noise)?)?
            }
            None if eta == 0.0 => mean_pred,
            None => bail!("ddim_sample: eta = {eta} needs noise"),
        };
        Ok(SampleOut {
            sample,
            pred_xstart: out.pred_xstart,
        })
    }

    /// `_vb_terms_bpd(model -> model_output, x_start, x_t, t, clip_denoised)["output"]`: one term
    /// of the variational bound, in bits per dimension, per sample `[N]`:
    /// KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the discretized-Gaussian
    /// decoder NLL of x_0 for t == 0.
    pub fn vb_terms_bpd(
        &self,
        model_output: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        clip_denoised: bool,
    ) -> Result<Tensor> {
        let true_post = self.q_posterior_mean_variance(x_start, x_t, t)?;
        let out = self.p_mean_variance(model_output, x_t, t, clip_denoised)?;
        let ln2 = std::f64::consts::LN_2;
        let kl = normal_kl(
            &true_post.mean,
            &true_post.log_variance_clipped,
            &out.mean,
            &out.log_variance,
        )?;
        let kl = (mean_flat(&kl)? / ln2)?;
        let decoder_nll =
            discretized_gaussian_log_likelihood(x_start, &out.mean, &(out.log_variance * 0.5)?)?
                .neg()?;
        let decoder_nll = (mean_flat(&decoder_nll)? / ln2)?;
        let is_first = Tensor::from_vec(
            t.iter().map(|&ti| u8::from(ti == 0)).collect::<Vec<u8>>(),
            t.len(),
            x_t.device(),
        )?;
        is_first.where_cond(&decoder_nll, &kl)
    }

    /// `training_losses(model, x_start, t, noise=noise)` for the MSE loss type (the official
    /// configuration). Computes `x_t = q_sample(x_start, t, noise)` and calls
    /// `model(x_t, model_timesteps(t))` once (the `_WrappedModel` call), then
    /// `mse = mean_flat((noise - eps)^2)` and, for learned variance, `vb = vb_terms_bpd` on the
    /// output with its eps half detached (`frozen_out`: the VB term trains only the variance),
    /// `loss = mse + vb`. All per sample, shape `[N]`.
    pub fn training_losses<F>(
        &self,
        x_start: &Tensor,
        t: &[usize],
        noise: &Tensor,
        model: F,
    ) -> Result<TrainingLosses>
    where
        F: FnOnce(&Tensor, &[i64]) -> Result<Tensor>,
    {
        let x_t = self.q_sample(x_start, t, noise)?;
        let model_t = self.model_timesteps(t)?;
        let model_output = model(&x_t, &model_t)?;
        let (eps, var_values) = self.split_model_output(&model_output, &x_t)?;
        let vb = match var_values {
            Some(v) => {
                let frozen_out = Tensor::cat(&[&eps.detach(), &v], 1)?;
                Some(self.vb_terms_bpd(&frozen_out, x_start, &x_t, t, false)?)
            }
            None => None,
        };
        // Target for eps prediction (ModelMeanType.EPSILON) is the noise.
        let mse = mean_flat(&(noise - &eps)?.sqr()?)?;
        let loss = match &vb {
            Some(vb) => (&mse + vb)?,
            None => mse.clone(),
        };
        Ok(TrainingLosses { mse, vb, loss })
    }
}

/// `arr[t]` for every sample, with a clear error for an index past the schedule.
fn gather(name: &str, arr: &[f64], t: &[usize]) -> Result<Vec<f64>> {
    t.iter()
        .map(|&ti| match arr.get(ti) {
            Some(&v) => Ok(v),
            None => bail!("timestep {ti} out of range for {name} (len {})", arr.len()),
        })
        .collect()
}

/// f64 per-sample values -> f32 tensor `[N, 1, ..., 1]` on `x`'s device, rank of `x`.
fn per_sample_f32(vals: &[f64], x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    if vals.len() != n {
        bail!("got {} timesteps for a batch of {n}", vals.len());
    }
    let mut shape = vec![1usize; x.rank()];
    shape[0] = n;
    let v32: Vec<f32> = vals.iter().map(|&v| v as f32).collect();
    Tensor::from_vec(v32, shape, x.device())
}

/// `(t != 0).float()` shaped `[N, 1, ..., 1]`: no noise is added on the last step.
fn nonzero_mask(t: &[usize], x: &Tensor) -> Result<Tensor> {
    let vals: Vec<f64> = t
        .iter()
        .map(|&ti| if ti != 0 { 1.0 } else { 0.0 })
        .collect();
    per_sample_f32(&vals, x)
}

fn check_same_shape(op: &str, name: &str, a: &Tensor, like: &Tensor) -> Result<()> {
    if a.dims() != like.dims() {
        bail!(
            "{op}: {name} has shape {:?}, expected {:?}",
            a.dims(),
            like.dims()
        );
    }
    Ok(())
}

/// `mean_flat`: mean over all non-batch dimensions, `[N, ...] -> [N]`.
pub fn mean_flat(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(1)?.mean(1)
}

/// `diffusion_utils.normal_kl`: KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in
/// nats, in the official operation order.
pub fn normal_kl(
    mean1: &Tensor,
    logvar1: &Tensor,
    mean2: &Tensor,
    logvar2: &Tensor,
) -> Result<Tensor> {
    let a = ((logvar2 - 1.0)? - logvar1)?;
    let b = (logvar1 - logvar2)?.exp()?;
    let c = (mean1 - mean2)?.sqr()?.mul(&logvar2.neg()?.exp()?)?;
    ((a + b)? + c)? * 0.5
}

/// `diffusion_utils.approx_standard_normal_cdf`: the tanh approximation of the standard normal
/// CDF, `0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`.
pub fn approx_standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let x3 = x.sqr()?.mul(x)?;
    let inner = ((x + (x3 * 0.044715)?)? * (2.0 / std::f64::consts::PI).sqrt())?;
    (inner.tanh()? + 1.0)? * 0.5
}

/// `diffusion_utils.discretized_gaussian_log_likelihood`: log-probability (nats) of `x`
/// (assumed uint8 pixels rescaled to [-1, 1], bin width 2/255) under N(means, e^(2 log_scales)),
/// with the edge bins extended to -inf / +inf.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Result<Tensor> {
    check_same_shape("discretized_gaussian_log_likelihood", "means", means, x)?;
    check_same_shape(
        "discretized_gaussian_log_likelihood",
        "log_scales",
        log_scales,
        x,
    )?;
    let centered_x = (x - means)?;
    let inv_stdv = log_scales.neg()?.exp()?;
    let plus_in = inv_stdv.mul(&(&centered_x + 1.0 / 255.0)?)?;
    let cdf_plus = approx_standard_normal_cdf(&plus_in)?;
    let min_in = inv_stdv.mul(&(&centered_x - 1.0 / 255.0)?)?;
    let cdf_min = approx_standard_normal_cdf(&min_in)?;
    let log_cdf_plus = cdf_plus.maximum(1e-12f32)?.log()?;
    let log_one_minus_cdf_min = cdf_min.affine(-1.0, 1.0)?.maximum(1e-12f32)?.log()?;
    let cdf_delta = (cdf_plus - cdf_min)?;
    let log_delta = cdf_delta.maximum(1e-12f32)?.log()?;
    let upper = x
        .gt(0.999f32)?
        .where_cond(&log_one_minus_cdf_min, &log_delta)?;
    x.lt(-0.999f32)?.where_cond(&log_cdf_plus, &upper)
}
