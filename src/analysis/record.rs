//! Recording a [`RoutingTrajectory`]: a seeded sampling run with the model's routing record
//! on, read back after every model evaluation.
use super::trajectory::{ImageRecord, RoutingTrajectory, TrajectoryMeta};
use crate::config::DitConfig;
use crate::model::DitMoe;
use crate::sampling::{Evaluation, Guidance, GuidanceInterval, GuidedModel, ImageNoise, SamplerKind};
use candle_core::{bail, DType, Device, Result, Tensor};

/// One recording run: which images, how they are sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordRequest {
    /// Class of each image (repeat a class for several images of it).
    pub classes: Vec<usize>,
    /// Image i draws its noise from the stream (seed, i), whatever the batching.
    pub seed: u64,
    pub sampler: SamplerKind,
    pub steps: usize,
    /// Classifier-free guidance scale; 1 = unguided.
    pub guidance: f64,
    /// The noise levels guidance is limited to, as `ditmoe generate` samples; None: every level.
    pub guidance_interval: Option<GuidanceInterval>,
    /// Images per forward (memory bound); the record is the same for any value.
    pub batch_size: usize,
}

/// Progress of a recording: model evaluations done out of the total, over all batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
}

/// Samples `req` with `model` (whose weights live on `device`) and records every routing
/// decision. `model_label` names the model in the metadata; `progress` is called after every
/// model evaluation.
pub fn record_trajectory(
    model: &DitMoe,
    model_label: &str,
    class_names: Option<Vec<String>>,
    req: &RecordRequest,
    device: &Device,
    progress: &mut dyn FnMut(Progress),
) -> Result<RoutingTrajectory> {
    if req.classes.is_empty() || req.batch_size == 0 {
        bail!("a recording needs at least one image and a batch size of at least 1")
    }
    let cfg = model.config();
    let sampler = req.sampler.build(req.steps, cfg, cfg.is_pixel_space())?;
    let batches: Vec<_> = (0..req.classes.len()).step_by(req.batch_size).map(|s| s..(s + req.batch_size).min(req.classes.len())).collect();
    let total = sampler.evaluations() * batches.len();
    let mut done = 0;
    // An interval that changes no step ([0, 1], or any at scale 1, which guides none) is the
    // run without one: recorded as none, so the two trajectories compare equal.
    let guidance_interval = req.guidance_interval.filter(|i| req.guidance != 1.0 && !i.is_everywhere());
    let mut trajectory: Option<RoutingTrajectory> = None;
    for range in batches {
        let classes = &req.classes[range.clone()];
        let guided = GuidedModel::new(model, classes, Guidance { scale: req.guidance, guide_all_channels: false }, device)?
            .guided_in(guidance_interval)
            .record_routing();
        let mut images = vec![ImageRecord::default(); classes.len()];
        let mut timesteps = Vec::with_capacity(sampler.evaluations());
        let mut failure = None;
        let mut noise = ImageNoise::new(req.seed, range);
        let samples = sampler.sample_seeded(&guided, &mut noise, &mut |ev: &Evaluation| {
            // The callback cannot return an error: keep the first and stop recording.
            if failure.is_none() {
                if let Err(e) = keep_evaluation(ev, &guided.take_routing(), cfg, &mut images, &mut timesteps) {
                    failure = Some(e);
                }
            }
            done += 1;
            progress(Progress { done, total });
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        for (img, sample) in images.iter_mut().zip(per_image(&samples)?) {
            img.sample = sample;
        }
        let meta = TrajectoryMeta {
            model: model_label.to_string(),
            config: cfg.clone(),
            class_names: class_names.clone(),
            classes: classes.to_vec(),
            seed: req.seed,
            sampler: req.sampler.name().to_string(),
            steps: req.steps,
            guidance: req.guidance,
            guidance_interval,
            timesteps,
        };
        let part = RoutingTrajectory::new(meta, images)?;
        match &mut trajectory {
            None => trajectory = Some(part),
            Some(t) => t.append(part)?,
        }
    }
    Ok(trajectory.expect("at least one batch"))
}

/// Appends one evaluation to the per-image records: the state, then each layer's rows of
/// the conditional images (the first N*T rows of every record, whether the forward was the
/// guided 2N rows or, outside the guidance interval, the conditional N alone).
fn keep_evaluation(
    ev: &Evaluation,
    routing: &[crate::model::LayerRouting],
    cfg: &DitConfig,
    images: &mut [ImageRecord],
    timesteps: &mut Vec<f64>,
) -> Result<()> {
    if routing.len() != cfg.moe_layers() {
        bail!("routing record of {} layers for a model with {} MoE layers", routing.len(), cfg.moe_layers())
    }
    let n = images.len();
    let t = cfg.num_patches();
    timesteps.push(ev.t.to_dtype(DType::F64)?.get(0)?.to_scalar::<f64>()?);
    for (img, state) in images.iter_mut().zip(per_image(ev.x)?) {
        img.states.extend(state);
    }
    for layer in routing {
        let rows = |x: &Tensor, dtype| x.narrow(0, 0, n * t)?.to_dtype(dtype)?.flatten_all();
        let experts = rows(&layer.experts, DType::U32)?.to_vec1::<u32>()?;
        let weights = rows(&layer.weights, DType::F32)?.to_vec1::<f32>()?;
        let scores = rows(&layer.scores, DType::F32)?.to_vec1::<f32>()?;
        let (k, e) = (experts.len() / (n * t), scores.len() / (n * t));
        for (i, img) in images.iter_mut().enumerate() {
            img.experts.extend_from_slice(&experts[i * t * k..(i + 1) * t * k]);
            img.weights.extend_from_slice(&weights[i * t * k..(i + 1) * t * k]);
            img.scores.extend_from_slice(&scores[i * t * e..(i + 1) * t * e]);
        }
    }
    Ok(())
}

/// (N, ...) -> N flat f32 vectors.
fn per_image(x: &Tensor) -> Result<Vec<Vec<f32>>> {
    let n = x.dim(0)?;
    x.to_dtype(DType::F32)?.reshape((n, ()))?.to_vec2::<f32>()
}
