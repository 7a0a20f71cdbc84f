//! Noise schedule of the Gaussian diffusion, in `f64`.
//!
//! Mirrors the constructor of the official `GaussianDiffusion`
//! (`diffusion/gaussian_diffusion.py::GaussianDiffusion.__init__`) and the `"linear"` branch of
//! `get_named_beta_schedule`. The official code keeps every array in numpy `float64` ("Use
//! float64 for accuracy") and only casts the gathered entries to `float32` when they meet a
//! tensor (`_extract_into_tensor`); doing the same here keeps the respaced schedules (whose betas
//! are differences of close cumulative products) as accurate as the reference.

use candle_core::{bail, Result};

/// `get_named_beta_schedule("linear", num_diffusion_timesteps)`: Ho et al.'s linear betas,
/// 1e-4 to 0.02 for 1000 steps, with both ends scaled by `1000 / num_diffusion_timesteps` so
/// other step counts keep the same overall noise level.
pub fn linear_betas(num_diffusion_timesteps: usize) -> Result<Vec<f64>> {
    if num_diffusion_timesteps == 0 {
        bail!("linear_betas: num_diffusion_timesteps must be > 0");
    }
    let scale = 1000.0 / num_diffusion_timesteps as f64;
    Ok(linspace(
        scale * 0.0001,
        scale * 0.02,
        num_diffusion_timesteps,
    ))
}

/// `np.linspace(start, stop, num)` (endpoint included) with numpy's arithmetic, so the betas are
/// bit-identical: `y[i] = i * step + start` with `step = (stop - start) / (num - 1)`, and the
/// last element overwritten with `stop` exactly.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// Every array `GaussianDiffusion.__init__` derives from the betas (plus `log_betas`, the
/// `np.log(self.betas)` that `p_mean_variance` recomputes on each call for LEARNED_RANGE).
/// All arrays have one entry per (respaced) step.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionSchedule {
    pub betas: Vec<f64>,
    pub log_betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    pub alphas_cumprod_next: Vec<f64>,
    pub sqrt_alphas_cumprod: Vec<f64>,
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    pub log_one_minus_alphas_cumprod: Vec<f64>,
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    pub posterior_variance: Vec<f64>,
    /// Empty for a one-step schedule, exactly as the official code (which has no `[1]` entry
    /// to clip with); indexing it then fails with an error instead of an official IndexError.
    pub posterior_log_variance_clipped: Vec<f64>,
    pub posterior_mean_coef1: Vec<f64>,
    pub posterior_mean_coef2: Vec<f64>,
}

impl DiffusionSchedule {
    /// `GaussianDiffusion.__init__(betas=...)`: validates like the official asserts
    /// (`0 < beta <= 1`, 1-D non-empty) and derives the arrays with the official formulas, in
    /// the official operation order (so f64 results agree to the last ulp or so).
    pub fn from_betas(betas: Vec<f64>) -> Result<Self> {
        if betas.is_empty() {
            bail!("DiffusionSchedule: betas must not be empty");
        }
        if let Some((i, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, &b)| !(b > 0.0 && b <= 1.0))
        {
            bail!("DiffusionSchedule: betas must lie in (0, 1], got betas[{i}] = {b}");
        }
        let n = betas.len();
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        // np.cumprod: a sequential running product.
        let alphas_cumprod: Vec<f64> = alphas
            .iter()
            .scan(1.0f64, |acc, a| {
                *acc *= a;
                Some(*acc)
            })
            .collect();
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod[..n - 1].iter().copied())
            .collect();
        let alphas_cumprod_next: Vec<f64> = alphas_cumprod[1..]
            .iter()
            .copied()
            .chain(std::iter::once(0.0))
            .collect();
        let map = |f: &dyn Fn(usize) -> f64| (0..n).map(f).collect::<Vec<f64>>();
        let ac = &alphas_cumprod;
        let acp = &alphas_cumprod_prev;
        let sqrt_alphas_cumprod = map(&|i| ac[i].sqrt());
        let sqrt_one_minus_alphas_cumprod = map(&|i| (1.0 - ac[i]).sqrt());
        let log_one_minus_alphas_cumprod = map(&|i| (1.0 - ac[i]).ln());
        let sqrt_recip_alphas_cumprod = map(&|i| (1.0 / ac[i]).sqrt());
        let sqrt_recipm1_alphas_cumprod = map(&|i| (1.0 / ac[i] - 1.0).sqrt());
        // Posterior q(x_{t-1} | x_t, x_0).
        let posterior_variance = map(&|i| betas[i] * (1.0 - acp[i]) / (1.0 - ac[i]));
        // The posterior variance is 0 at t = 0, so its log is "clipped" by repeating entry 1.
        let posterior_log_variance_clipped = if n > 1 {
            std::iter::once(posterior_variance[1])
                .chain(posterior_variance[1..].iter().copied())
                .map(f64::ln)
                .collect()
        } else {
            Vec::new()
        };
        let posterior_mean_coef1 = map(&|i| betas[i] * acp[i].sqrt() / (1.0 - ac[i]));
        let posterior_mean_coef2 = map(&|i| (1.0 - acp[i]) * alphas[i].sqrt() / (1.0 - ac[i]));
        let log_betas = betas.iter().map(|b| b.ln()).collect();
        Ok(Self {
            betas,
            log_betas,
            alphas_cumprod,
            alphas_cumprod_prev,
            alphas_cumprod_next,
            sqrt_alphas_cumprod,
            sqrt_one_minus_alphas_cumprod,
            log_one_minus_alphas_cumprod,
            sqrt_recip_alphas_cumprod,
            sqrt_recipm1_alphas_cumprod,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
        })
    }

    /// Number of (respaced) steps, the official `num_timesteps`.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }
}
