//! Periodic sample grids from the EMA weights during training (the official `train.py` leaves
//! sampling to `sample.py`; a grid every few thousand steps shows progress without a second
//! tool): one row per class (at most 10 classes), 8 samples each, classifier-free guidance 4,
//! rf-euler 30 steps or DDIM 50 steps (eta 0) depending on the objective.
use super::Objective;
use crate::config::DitConfig;
use crate::model::DitMoe;
use crate::sampling::{DdimSampler, Guidance, GuidedModel, ImageNoise, Images, RectifiedFlowSampler, Sampler};
use crate::plan::ExecutionPlan;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

const PER_CLASS: usize = 8;
const MAX_CLASSES: usize = 10;
const CFG_SCALE: f64 = 4.0;

/// Samples a class grid with the `ema` weights (one row per class). Pixel models only: a
/// latent model's samples would need the VAE to be viewable. `plan`: the training run's,
/// frozen; under expert parallelism `ema` holds this rank's experts and every rank of the
/// group calls this together (the same noise on every rank, so the same grid).
pub fn sample_grid(cfg: &DitConfig, objective: Objective, ema: &[(String, Tensor)], seed: u64, plan: &ExecutionPlan) -> Result<Images> {
    let device = &plan.device;
    let vb = VarBuilder::from_tensors(ema.iter().cloned().collect(), plan.weight_dtype(), device);
    let model = DitMoe::new(cfg, plan, vb)?;
    let classes: Vec<usize> = (0..cfg.num_classes.min(MAX_CLASSES)).flat_map(|c| std::iter::repeat_n(c, PER_CLASS)).collect();
    let sampler = match objective {
        Objective::Rf => Sampler::RectifiedFlow(RectifiedFlowSampler::for_model(cfg, 30, false)?),
        Objective::Ddpm => Sampler::Ddim(DdimSampler::with_steps(50, cfg.learn_sigma, 0.0, true)?),
    };
    // Guidance needs the null class, which exists only when labels were dropped in training.
    let scale = if cfg.class_dropout_prob > 0.0 { CFG_SCALE } else { 1.0 };
    let guided = GuidedModel::new(&model, &classes, Guidance { scale, guide_all_channels: true }, device)?;
    let mut noise = ImageNoise::new(seed, 0..classes.len());
    let x = sampler.sample_seeded(&guided, &mut noise, &mut |_| {})?;
    Images::from_tensor(&x)?.grid(PER_CLASS)
}
