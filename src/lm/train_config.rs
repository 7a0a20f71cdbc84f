//! `LmTrainConfig`: everything `ditmoe lm train` needs, as a JSON file (`--config`) whose run
//! settings can be overridden by flags. Defaults follow common small-GPT practice (nanoGPT,
//! the DeepSpeed-MoE GPT recipes scaled down): AdamW (0.9, 0.95), weight decay 0.1, linear
//! warm-up then cosine decay to a tenth of the peak rate, global-norm clipping at 1.
//!
//! An optional `distill` section ([`DistillConfig`]) makes the run a Mixture-of-Students
//! distillation from a frozen teacher (`super::distill`).
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

fn d_lr() -> f64 {
    1e-3
}
fn d_min_lr_ratio() -> f64 {
    0.1
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.95
}
fn d_eps() -> f64 {
    1e-8
}
fn d_weight_decay() -> f64 {
    0.1
}
fn d_clip() -> Option<f64> {
    Some(1.0)
}
fn d_log_every() -> u64 {
    10
}
fn d_ckpt_every() -> u64 {
    500
}
fn d_keep_last() -> usize {
    2
}
fn d_eval_batches() -> usize {
    8
}
fn d_one() -> f64 {
    1.0
}

/// Mixture-of-Students distillation (DeepSpeed-MoE, Rajbhandari et al. 2022, sec. 5): the loss
/// adds `beta · T² · KL(softmax(teacher / T) || softmax(student / T))` ([`super::distill::mos_kl`])
/// on steps `1..=stop_step`, and is the plain causal-LM loss after them. Defaults follow
/// Megatron-DeepSpeed's MoS scripts (`--kd-beta-ce 1`, `--kd-temp 1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// The teacher: an HF-layout model folder with the student's vocabulary.
    pub teacher: PathBuf,
    #[serde(default = "d_one")]
    pub beta: f64,
    /// The softmax temperature `T` of both distributions.
    #[serde(default = "d_one")]
    pub temperature: f64,
    /// The last step that distils; null = every step. DeepSpeed found that distilling to the
    /// end hurts the student late in training (the teacher's larger capacity is a target the
    /// smaller student cannot reach), so it stops distillation part-way.
    #[serde(default)]
    pub stop_step: Option<u64>,
}

impl DistillConfig {
    /// Whether optimizer step `step` (counted from 1) adds the distillation term. A function of
    /// the step alone, so a resumed run is in the stage the uninterrupted one was.
    pub fn distils_at(&self, step: u64) -> bool {
        self.stop_step.is_none_or(|s| step <= s)
    }

    /// Refuses settings that could not distil, naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            bail!("lm train config: `distill.beta` must be finite and >= 0, got {}", self.beta)
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!("lm train config: `distill.temperature` must be finite and > 0, got {}", self.temperature)
        }
        if self.stop_step == Some(0) {
            bail!("lm train config: `distill.stop_step` must be at least 1 (or null for every step)")
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmTrainConfig {
    /// The model: an `LmConfig` JSON file (random init), or an HF model folder to continue
    /// from (its `config.json` and weights).
    pub model: PathBuf,
    /// A corpus folder as `ditmoe data sotu` writes it: `tokenizer.json`, `train.safetensors`,
    /// `validation.safetensors`.
    pub data: PathBuf,
    /// The run folder (checkpoints, `log.jsonl`, the final model in `<out>/model`).
    pub out: PathBuf,
    /// Tokens per training sequence (each step draws `batch_size` windows of `seq_len + 1`).
    pub seq_len: usize,
    pub batch_size: usize,
    pub steps: u64,
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// The cosine decay ends at `lr · min_lr_ratio` on step `lr_decay_steps`.
    #[serde(default = "d_min_lr_ratio")]
    pub min_lr_ratio: f64,
    /// The length of the learning-rate schedule (nanoGPT's `lr_decay_iters`); default `steps`.
    /// A run stopped early (`--steps`) and resumed keeps its schedule through this.
    #[serde(default)]
    pub lr_decay_steps: Option<u64>,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "d_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_eps: f64,
    /// Global gradient-norm clipping (`clip_grad_norm_`); null = none.
    #[serde(default = "d_clip")]
    pub max_grad_norm: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_log_every")]
    pub log_every: u64,
    #[serde(default = "d_ckpt_every")]
    pub ckpt_every: u64,
    #[serde(default = "d_keep_last")]
    pub keep_last: usize,
    /// Validation loss every this many steps (0 = only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Validation windows of `seq_len + 1` tokens per evaluation, `batch_size` at a time.
    #[serde(default = "d_eval_batches")]
    pub eval_batches: usize,
    /// Stop (with a checkpoint) before this many minutes have passed.
    #[serde(default)]
    pub max_minutes: Option<f64>,
    /// Distil from a teacher (absent = plain training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
}

impl LmTrainConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Refuses settings that could not train, naming the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [("seq_len", self.seq_len as f64), ("batch_size", self.batch_size as f64), ("steps", self.steps as f64), ("log_every", self.log_every as f64), ("ckpt_every", self.ckpt_every as f64), ("keep_last", self.keep_last as f64), ("eval_batches", self.eval_batches as f64)];
        for (name, v) in positive {
            if v < 1.0 {
                bail!("lm train config: `{name}` must be at least 1")
            }
        }
        for (name, v) in [("lr", self.lr), ("adam_eps", self.adam_eps)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("lm train config: `{name}` must be finite and > 0, got {v}")
            }
        }
        for (name, v) in [("min_lr_ratio", self.min_lr_ratio), ("beta1", self.beta1), ("beta2", self.beta2), ("weight_decay", self.weight_decay)] {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                bail!("lm train config: `{name}` must be in [0, 1], got {v}")
            }
        }
        if let Some(c) = self.max_grad_norm.filter(|c| !(c.is_finite() && *c > 0.0)) {
            bail!("lm train config: `max_grad_norm` must be finite and > 0 (or null), got {c}")
        }
        if let Some(m) = self.max_minutes.filter(|m| !(m.is_finite() && *m > 0.0)) {
            bail!("lm train config: `max_minutes` must be finite and > 0, got {m}")
        }
        if let Some(d) = &self.distill {
            d.validate()?;
        }
        Ok(())
    }

    /// Linear warm-up to `lr`, then cosine decay to `lr · min_lr_ratio` at `lr_decay_steps`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.lr_decay_steps.unwrap_or(self.steps).saturating_sub(self.warmup_steps).max(1) as f64;
        crate::train::lr_schedule::cosine_decay(self.lr, self.min_lr_ratio, (step - self.warmup_steps) as f64 / span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LmTrainConfig {
        serde_json::from_str(r#"{"model": "m.json", "data": "d", "out": "o", "seq_len": 8, "batch_size": 2, "steps": 100, "warmup_steps": 10}"#).unwrap()
    }

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let c = cfg();
        assert!((c.lr_at(0) - c.lr / 10.0).abs() < 1e-12);
        assert!((c.lr_at(9) - c.lr).abs() < 1e-12);
        assert!((c.lr_at(10) - c.lr).abs() < 1e-12);
        assert!((c.lr_at(100) - c.lr * c.min_lr_ratio).abs() < 1e-12);
        assert!(c.lr_at(55) < c.lr && c.lr_at(55) > c.lr * c.min_lr_ratio);
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = cfg();
        c.beta2 = 1.5;
        assert!(c.validate().unwrap_err().to_string().contains("`beta2`"));
        let mut c = cfg();
        c.seq_len = 0;
        assert!(c.validate().unwrap_err().to_string().contains("`seq_len`"));
        let mut c = cfg();
        c.distill = Some(DistillConfig { teacher: "t".into(), beta: 1.0, temperature: 0.0, stop_step: None });
        assert!(c.validate().unwrap_err().to_string().contains("`distill.temperature`"));
    }

    #[test]
    fn distillation_stops_after_its_step() {
        let c: LmTrainConfig = serde_json::from_str(r#"{"model": "m.json", "data": "d", "out": "o", "seq_len": 8, "batch_size": 2, "steps": 100, "distill": {"teacher": "t", "stop_step": 60}}"#).unwrap();
        let d = c.distill.unwrap();
        assert_eq!((d.beta, d.temperature), (1.0, 1.0));
        assert!(d.distils_at(1) && d.distils_at(60) && !d.distils_at(61));
        assert!(DistillConfig { stop_step: None, ..d }.distils_at(u64::MAX));
        assert!(cfg().distill.is_none() && !serde_json::to_string(&cfg()).unwrap().contains("distill"), "a plain config stays as it was");
    }
}
