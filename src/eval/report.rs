//! `ditmoe eval`: how class-faithful and how realistic a class-conditional pixel model's
//! samples are, judged by the scoring classifier: real-test accuracy (the ceiling), per-class
//! accuracy of generated samples (a sample of class c counts when classified as c), and the
//! Fréchet distance between classifier features of generated and real test images.
use super::classifier::{Classifier, SIDE};
use super::fit::per_class_accuracy;
use super::frechet::{frechet_distance, gaussian_stats};
use super::images::center_crop;
use crate::model::DitMoe;
use crate::sampling::{Guidance, GuidedModel, ImageNoise, Images, RectifiedFlowSampler, Sampler};
use candle_core::{bail, Device, Result, Tensor};
use serde::Serialize;

/// How samples are drawn.
#[derive(Debug, Clone, Serialize)]
pub struct SampleOptions {
    pub per_class: usize,
    pub steps: usize,
    pub cfg_scale: f64,
    pub seed: u64,
    /// Images per sampler call (before the guidance doubling).
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub class_names: Vec<String>,
    pub real_accuracy: f64,
    pub real_per_class: Vec<f64>,
    pub generated_accuracy: f64,
    pub generated_per_class: Vec<f64>,
    /// generated accuracy / real accuracy (target ≥ 0.95).
    pub relative_accuracy: f64,
    /// Fréchet distance, generated vs real test features.
    pub frechet_distance: f64,
    /// The same distance between two halves of the real test set: the noise floor at this
    /// sample size.
    pub frechet_distance_real_halves: f64,
    pub samples: SampleOptions,
    pub sampling_seconds: f64,
}

/// Samples `per_class` images of every class (rf-euler with CFG), class-major, as
/// (N, C, H, W) in [-1, 1].
pub fn generate(model: &DitMoe, opts: &SampleOptions, device: &Device) -> Result<Tensor> {
    let classes: Vec<usize> = (0..model.config().num_classes).flat_map(|c| std::iter::repeat_n(c, opts.per_class)).collect();
    let sampler = Sampler::RectifiedFlow(RectifiedFlowSampler::for_model(model.config(), opts.steps, false)?);
    let guidance = Guidance { scale: opts.cfg_scale, guide_all_channels: true };
    let mut out = Vec::new();
    for start in (0..classes.len()).step_by(opts.batch) {
        let end = (start + opts.batch).min(classes.len());
        let gm = GuidedModel::new(model, &classes[start..end], guidance, device)?;
        let mut noise = ImageNoise::new(opts.seed, start..end);
        out.push(sampler.sample_seeded(&gm, &mut noise, &mut |_| {})?);
    }
    Tensor::cat(&out, 0)
}

/// Scores `generated` (class-major, `samples.per_class` each, model resolution) against the real test
/// split (`real`, `real_labels`, already 28×28).
pub fn score(
    clf: &Classifier,
    real: &Tensor,
    real_labels: &[u32],
    generated: &Tensor,
    class_names: Vec<String>,
    samples: SampleOptions,
    sampling_seconds: f64,
) -> Result<EvalReport> {
    let (k, per_class) = (class_names.len(), samples.per_class);
    let (real_pred, real_feat) = clf.predict(real, 500)?;
    let real_per_class = per_class_accuracy(&real_pred, real_labels, k);
    let real_accuracy = real_pred.iter().zip(real_labels).filter(|(p, l)| p == l).count() as f64 / real_labels.len() as f64;
    let gen = center_crop(generated, SIDE)?;
    let gen_labels: Vec<u32> = (0..k as u32).flat_map(|c| std::iter::repeat_n(c, per_class)).collect();
    if gen.dim(0)? != gen_labels.len() {
        bail!("{} generated images for {k} classes × {per_class}", gen.dim(0)?);
    }
    let (gen_pred, gen_feat) = clf.predict(&gen, 500)?;
    let generated_per_class = per_class_accuracy(&gen_pred, &gen_labels, k);
    let generated_accuracy = gen_pred.iter().zip(&gen_labels).filter(|(p, l)| p == l).count() as f64 / gen_labels.len() as f64;
    let (mu_r, s_r) = gaussian_stats(&real_feat)?;
    let (mu_g, s_g) = gaussian_stats(&gen_feat)?;
    // Floor: a random-looking but fixed half split of the real set (even vs odd rows), with the
    // smaller half the size of the generated set so the bias matches.
    let n_real = real_feat.dim(0)?;
    let half = (n_real / 2).min(gen_labels.len());
    let idx = |offset: u32| Tensor::new((0..half as u32).map(|i| 2 * i + offset).collect::<Vec<_>>(), real_feat.device());
    let (mu_a, s_a) = gaussian_stats(&real_feat.index_select(&idx(0)?, 0)?)?;
    let (mu_b, s_b) = gaussian_stats(&real_feat.index_select(&idx(1)?, 0)?)?;
    Ok(EvalReport {
        class_names,
        real_accuracy,
        real_per_class,
        generated_accuracy,
        generated_per_class,
        relative_accuracy: generated_accuracy / real_accuracy,
        frechet_distance: frechet_distance(&mu_g, &s_g, &mu_r, &s_r),
        frechet_distance_real_halves: frechet_distance(&mu_a, &s_a, &mu_b, &s_b),
        samples,
        sampling_seconds,
    })
}

/// A grid with one row per class: the first `cols` samples of each class.
pub fn class_grid(generated: &Tensor, per_class: usize, num_classes: usize, cols: usize) -> Result<Images> {
    let cols = cols.min(per_class);
    let rows: Vec<Tensor> = (0..num_classes).map(|c| generated.narrow(0, c * per_class, cols)).collect::<Result<_>>()?;
    Images::from_tensor(&Tensor::cat(&rows, 0)?)?.grid(cols)
}
