//! `TrainConfig`: everything `ditmoe train` needs, as a JSON file (`--config`) whose fields can
//! also be set by flags. Defaults are the official `train.py` settings (AdamW lr 1e-4, no
//! weight decay, global batch 256, EMA 0.9999, uniform-t DDPM objective).
use crate::config::{DitConfig, ProMoeConfig};
use crate::presets;
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Official `train.py`: eps MSE (+ the VB term when sigma is learned), t uniform.
    Ddpm,
    /// Official `train_rf.py`: rectified flow, t = sigmoid(randn).
    Rf,
}

impl std::str::FromStr for Objective {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ddpm" => Ok(Self::Ddpm),
            "rf" => Ok(Self::Rf),
            other => Err(format!("unknown objective `{other}` (ddpm or rf)")),
        }
    }
}

/// Which router the MoE layers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Router {
    /// DiT-MoE's linear top-k gate: the model config as given.
    #[default]
    Topk,
    /// ProMoE's prototypical router: sets `promoe = ProMoeConfig::released(hidden_size)` on the
    /// model config (everything else kept), adding the routing contrastive loss.
    Promoe,
}

impl std::str::FromStr for Router {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "topk" => Ok(Self::Topk),
            "promoe" => Ok(Self::Promoe),
            other => Err(format!("unknown router `{other}` (topk or promoe)")),
        }
    }
}

fn d_lr() -> f64 {
    1e-4
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_ema_every() -> u64 {
    1
}

fn d_ema() -> f64 {
    0.9999
}
fn d_batch() -> usize {
    256
}
fn d_true() -> bool {
    true
}
fn d_log_every() -> u64 {
    10
}
fn d_ckpt_every() -> u64 {
    1000
}
fn d_keep() -> usize {
    3
}
fn d_steps() -> u64 {
    400_000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// A preset name (`DiT-MoE-S/2-8E2A`), a model folder, or the path of a model `config.json`.
    pub model: String,
    /// Class folders (`root/<class>/<image>`), or a latent shard `.safetensors` file, or a
    /// folder of shards (as `ditmoe encode` writes).
    pub data: PathBuf,
    /// Run folder: checkpoints, `log.jsonl`, the exported EMA model, sample grids.
    pub out: PathBuf,
    pub objective: Objective,
    /// `topk` (default: the model config as given) or `promoe` (ProMoE's prototypical router
    /// with the released settings for the model's width).
    #[serde(default)]
    pub router: Router,
    /// Images are preprocessed (center crop/resize) to this side, then padded with the
    /// background value -1 up to the model's `input_size` (Fashion-MNIST: 28 padded to 32).
    /// Default: the model's `input_size` (no padding, the official pipeline).
    #[serde(default)]
    pub image_size: Option<usize>,
    #[serde(default = "d_true")]
    pub random_flip: bool,
    /// Leave out class-folder images whose header does not decode (listed as the run starts)
    /// instead of refusing the dataset.
    #[serde(default)]
    pub skip_bad_images: bool,
    /// Images per optimizer step (official `global_batch_size`).
    #[serde(default = "d_batch")]
    pub global_batch: usize,
    /// Images per forward/backward pass; `global_batch / micro_batch` passes are accumulated.
    #[serde(default)]
    pub micro_batch: Option<usize>,
    /// Optimizer steps to train for (the total, counted across resumes).
    #[serde(default = "d_steps")]
    pub steps: u64,
    /// Wall-clock budget: stop (saving a checkpoint and the EMA model) before it runs out.
    #[serde(default)]
    pub max_minutes: Option<f64>,
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Linear learning-rate warmup (the official run has none: 0).
    #[serde(default)]
    pub warmup_steps: u64,
    /// After the warm-up, decay the learning rate along a cosine to `lr · min_lr_ratio` at
    /// step `lr_decay_steps` (`train::lr_schedule`). Absent: constant, as the official
    /// `train.py`. A `max_minutes` stop keeps the schedule.
    #[serde(default)]
    pub min_lr_ratio: Option<f64>,
    /// The cosine's length (nanoGPT's `lr_decay_iters`); default `steps`. A run trained in
    /// parts with growing `steps` keeps one schedule through this.
    #[serde(default)]
    pub lr_decay_steps: Option<u64>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_eps: f64,
    /// Clip the global gradient norm to this (`torch.nn.utils.clip_grad_norm_`); none in the
    /// official `train.py`, so off by default.
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    #[serde(default = "d_ema")]
    pub ema_decay: f64,
    /// Cap the EMA decay at `(1 + s) / (10 + s)` on update `s` (0-based), as diffusers'
    /// `EMAModel.get_decay` does: the average forgets the initial weights within the first
    /// hundreds of steps. The official `train.py` has no cap; its 0.9999 over 400k steps leaves
    /// nothing of them, but a short run with a fixed decay d keeps `d^steps` of its random
    /// initialisation in the export (docs/quality.md measures it).
    #[serde(default)]
    pub ema_warmup: bool,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_log_every")]
    pub log_every: u64,
    #[serde(default = "d_ckpt_every")]
    pub ckpt_every: u64,
    /// Checkpoints kept (older ones are deleted after a successful save).
    #[serde(default = "d_keep")]
    pub keep_last: usize,
    /// Write a sample grid from the EMA weights to `<out>/samples/step-<step>.png` every this
    /// many steps (0 = never; pixel models only).
    #[serde(default)]
    pub sample_every: u64,
    /// Data-loading threads; default one per core.
    #[serde(default)]
    pub num_workers: Option<usize>,
    /// Start from these weights (a model safetensors/.pt, validated against the model
    /// config) instead of the official initialisation, e.g. to fine-tune or to continue from
    /// shipped EMA weights. Ignored when resuming from a checkpoint.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Recompute each block's activations in the backward instead of keeping them
    /// (`crate::model::recompute`): memory for one block's activations instead of every
    /// block's, for a second forward of the blocks.
    #[serde(default)]
    pub recompute: bool,
    /// Keep the EMA weights in host memory instead of on the GPU: an f32 copy of every
    /// weight (4 bytes a parameter) that XL/2-8E2A's training state leaves no room for on an
    /// 80 GB card. Each update then copies the weights to the host (docs/training.md).
    #[serde(default)]
    pub ema_on_host: bool,
    /// Average every this many optimizer steps, with the product of their decays (the same
    /// time constant; exact while the weights stand still). With `ema_on_host`, each average
    /// copies every weight to the host, which at XL/2-8E2A's size takes longer than a step
    /// (docs/training.md); the official `train.py` averages every step (1).
    #[serde(default = "d_ema_every")]
    pub ema_every: u64,
}

impl TrainConfig {
    /// Reads a JSON config; an unknown key fails naming the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&s).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
    }

    /// The model configuration `model` names (a preset or a `config.json`).
    /// With `router: promoe`, `promoe` is set to `ProMoeConfig::released(hidden_size)`.
    pub fn model_config(&self) -> Result<DitConfig> {
        let p = Path::new(&self.model);
        let mut cfg = if p.extension().is_some_and(|e| e == "json") || p.is_file() {
            DitConfig::from_file(p)?
        } else if p.is_dir() {
            // a model folder, as `generate --model` takes (its config; start from its weights
            // with --init-from)
            DitConfig::from_file(&p.join("config.json"))?
        } else {
            presets::get(&self.model).map(|p| p.config).map_err(|e| {
                candle_core::Error::Msg(format!("model `{}` is neither a model folder, a config.json file nor a preset: {e}", self.model))
            })?
        };
        if self.router == Router::Promoe {
            cfg.promoe = Some(ProMoeConfig::released(cfg.hidden_size));
        }
        Ok(cfg)
    }

    pub fn micro_batch(&self) -> usize {
        self.micro_batch.unwrap_or(self.global_batch)
    }

    /// Micro-batches accumulated per optimizer step.
    pub fn accumulation(&self) -> usize {
        self.global_batch / self.micro_batch()
    }

    /// Checks what serde cannot: positive sizes, divisibility, ranges.
    pub fn validate(&self) -> Result<()> {
        let fail = |field: &str, why: String| -> Result<()> { bail!("train config field `{field}`: {why}") };
        if self.global_batch == 0 {
            return fail("global_batch", "must be at least 1".into());
        }
        let mb = self.micro_batch();
        if mb == 0 || !self.global_batch.is_multiple_of(mb) {
            return fail("micro_batch", format!("{mb} must divide global_batch {}", self.global_batch));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return fail("lr", format!("{} must be positive", self.lr));
        }
        if self.ema_every == 0 {
            return fail("ema_every", "must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.ema_decay) {
            return fail("ema_decay", format!("{} must be in [0, 1]", self.ema_decay));
        }
        for (f, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return fail(f, format!("{b} must be in [0, 1)"));
            }
        }
        if let Some(r) = self.min_lr_ratio.filter(|r| !(0.0..=1.0).contains(r)) {
            return fail("min_lr_ratio", format!("{r} must be in [0, 1]"));
        }
        if self.max_grad_norm.is_some_and(|g| g <= 0.0) {
            return fail("max_grad_norm", "must be positive".into());
        }
        if self.log_every == 0 || self.ckpt_every == 0 {
            return fail("log_every/ckpt_every", "must be at least 1".into());
        }
        if self.keep_last == 0 {
            return fail("keep_last", "must be at least 1".into());
        }
        Ok(())
    }

    /// The EMA decay of the update after optimizer step `step` (1-based).
    pub fn ema_decay_at(&self, step: u64) -> f64 {
        if self.ema_warmup {
            let s = step.saturating_sub(1) as f64;
            self.ema_decay.min((1.0 + s) / (10.0 + s))
        } else {
            self.ema_decay
        }
    }

    /// Learning rate at optimizer step `step` (1-based): linear warmup, then constant (official)
    /// or, with `min_lr_ratio`, the cosine decay over the steps left until `steps`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup_steps > 0 && step < self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        match self.min_lr_ratio {
            None => self.lr,
            Some(ratio) => {
                let span = self.lr_decay_steps.unwrap_or(self.steps).saturating_sub(self.warmup_steps).max(1) as f64;
                crate::train::lr_schedule::cosine_decay(self.lr, ratio, step.saturating_sub(self.warmup_steps) as f64 / span)
            }
        }
    }
}
