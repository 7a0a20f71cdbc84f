//! A model folder's sampling defaults, from the `generate.json` that `ditmoe generate` reads
//! (`{"sampler": "rf-euler", "steps": 30, "cfg_scale": 3.0}`), so routing runs sample a model
//! the way its trainer said it samples (a rectified-flow model is wrong under DDPM).
use super::SamplerKind;
use crate::sampling::GuidanceInterval;
use candle_core::Result;
use serde::Deserialize;
use std::path::Path;

pub const DEFAULTS_FILE: &str = "generate.json";

/// Official `sample.py`'s `--cfg-scale` default (as `ditmoe generate`).
pub const CFG_SCALE: f64 = 4.0;

#[derive(Debug, Default, Deserialize)]
struct File {
    sampler: Option<String>,
    steps: Option<usize>,
    cfg_scale: Option<f64>,
    guidance_interval: Option<Vec<f64>>,
}

/// The defaults of one model: the file's values, else the official ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunDefaults {
    pub sampler: SamplerKind,
    pub steps: usize,
    pub cfg_scale: f64,
    /// The noise levels guidance is limited to; None: every level.
    pub guidance_interval: Option<GuidanceInterval>,
}

impl RunDefaults {
    /// Reads `dir/generate.json` when it exists; a file that does not parse is an error
    /// naming it. Its steps belong to its sampler, so they are dropped when `sampler`
    /// overrides it with another.
    pub fn read(dir: &Path, sampler: Option<SamplerKind>) -> Result<Self> {
        let path = dir.join(DEFAULTS_FILE);
        let file: File = if path.is_file() {
            let s = std::fs::read_to_string(&path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
            serde_json::from_str(&s).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?
        } else {
            File::default()
        };
        let from_file = match &file.sampler {
            Some(s) => Some(s.parse::<SamplerKind>().map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?),
            None => None,
        };
        let chosen = sampler.or(from_file).unwrap_or(SamplerKind::Ddpm);
        let steps_apply = from_file.is_none_or(|f| f == chosen);
        let guidance_interval = file
            .guidance_interval
            .as_deref()
            .map(GuidanceInterval::from_bounds)
            .transpose()
            .map_err(|e| candle_core::Error::Msg(format!("{}: guidance_interval: {e}", path.display())))?;
        Ok(Self {
            sampler: chosen,
            steps: file.steps.filter(|_| steps_apply).unwrap_or(chosen.official_steps()),
            cfg_scale: file.cfg_scale.unwrap_or(CFG_SCALE),
            guidance_interval,
        })
    }
}
