//! `SamplerKind`: the sampling processes by the names `ditmoe generate --sampler`, `ditmoe
//! routes` and the explorer take, and the one place that builds a [`Sampler`] from a name.
use super::{DdimSampler, DdpmSampler, DpmSolverSampler, RectifiedFlowSampler, Sampler};
use crate::config::DitConfig;
use candle_core::Result;

/// Which sampling process to run; the model's training objective decides which are right
/// (DDPM/DDIM/DPM-Solver++ for the Gaussian `train.py`, Euler/Heun for rectified flow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    Ddpm,
    Ddim,
    /// DPM-Solver++ (2M), diffusers' `DPMSolverMultistepScheduler` ([`DpmSolverSampler`]).
    DpmSolver2M,
    Euler,
    Heun,
}

impl SamplerKind {
    pub const ALL: [Self; 5] = [Self::Ddpm, Self::Ddim, Self::DpmSolver2M, Self::Euler, Self::Heun];

    /// The names `ditmoe generate --sampler` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::DpmSolver2M => "dpm++2m",
            Self::Euler => "rf-euler",
            Self::Heun => "rf-heun",
        }
    }

    pub fn is_gaussian(self) -> bool {
        matches!(self, Self::Ddpm | Self::Ddim | Self::DpmSolver2M)
    }

    /// The steps the official `sample.py` takes: 250 for DDPM/DDIM, 50 for rectified flow;
    /// DPM-Solver++ (not in the official code) defaults to 20.
    pub fn official_steps(self) -> usize {
        match self {
            Self::Ddpm | Self::Ddim => 250,
            Self::DpmSolver2M => 20,
            Self::Euler | Self::Heun => 50,
        }
    }

    /// The sampler for `cfg` with `steps` steps. `clip_x0`: Gaussian samplers clamp the
    /// predicted x_0 to [-1, 1], right for pixel-space models only (`sample.py` passes
    /// `clip_denoised=False` for its latents, whose tails run well past 1; see `DdimSampler`).
    pub fn build(self, steps: usize, cfg: &DitConfig, clip_x0: bool) -> Result<Sampler> {
        Ok(match self {
            Self::Ddpm => Sampler::Ddpm(DdpmSampler::with_steps(steps, cfg.learn_sigma, clip_x0)?),
            Self::Ddim => Sampler::Ddim(DdimSampler::with_steps(steps, cfg.learn_sigma, 0.0, clip_x0)?),
            Self::DpmSolver2M => Sampler::DpmSolver(DpmSolverSampler::with_steps(steps, clip_x0)?),
            Self::Euler => Sampler::RectifiedFlow(RectifiedFlowSampler::for_model(cfg, steps, false)?),
            Self::Heun => Sampler::RectifiedFlow(RectifiedFlowSampler::for_model(cfg, steps, true)?),
        })
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown sampler `{s}` (ddpm, ddim, dpm++2m, rf-euler or rf-heun)"))
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

