//! `ditmoe eval`: how class-faithful and how realistic a class-conditional pixel model's
//! samples are, judged by the scoring classifier: real-test accuracy (the ceiling), per-class
//! accuracy of generated samples (a sample of class c counts when classified as c), the
//! Fréchet distance between classifier features of generated and real images (overall, as a
//! ratio of the real-vs-real distance at the same sample size, and per class), and the
//! precision and recall of the generated features (Kynkäänniemi et al. 2019).
use super::classifier::{Classifier, SIDE};
use super::fit::per_class_accuracy;
use super::frechet::{frechet_between, frechet_distance, gaussian_stats, per_class_frechet};
use super::images::center_crop;
use super::precision_recall::{precision_recall, PrecisionRecall, DEFAULT_K};
use super::reference::{RealReference, RealSubsets};
use crate::model::DitMoe;
use crate::sampling::{Guidance, GuidanceInterval, GuidedModel, ImageNoise, Images, SamplerKind};
use candle_core::{bail, Device, Result, Tensor};
use serde::{Serialize, Serializer};

fn sampler_name<S: Serializer>(kind: &SamplerKind, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(kind.name())
}

/// How samples are drawn.
#[derive(Debug, Clone, Serialize)]
pub struct SampleOptions {
    pub per_class: usize,
    #[serde(serialize_with = "sampler_name")]
    pub sampler: SamplerKind,
    pub steps: usize,
    pub cfg_scale: f64,
    /// The noise levels guidance was limited to (Kynkäänniemi et al. 2024), `[lo, hi]`; None
    /// (null): every level.
    pub guidance_interval: Option<GuidanceInterval>,
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
    /// Fréchet distance, generated vs the whole real split.
    pub frechet_distance: f64,
    /// The two disjoint real subsets the equal-size measures below use.
    pub real_subsets: RealSubsets,
    /// Fréchet distance, generated vs real subset b.
    pub frechet_distance_subset: f64,
    /// Fréchet distance, real subset a vs real subset b: the floor at this sample size.
    pub frechet_distance_real: f64,
    /// `frechet_distance_subset / frechet_distance_real`: 1 is indistinguishable from real
    /// images at this sample size.
    pub frechet_ratio: f64,
    /// Per class: generated class c vs subset b's class c.
    pub frechet_per_class: Vec<f64>,
    /// Per class: subset a's class c vs subset b's class c.
    pub frechet_real_per_class: Vec<f64>,
    /// Generated vs real subset b.
    pub precision_recall: PrecisionRecall,
    /// Real subset a vs real subset b: what a perfect generator scores at this size.
    pub precision_recall_real: PrecisionRecall,
    pub samples: SampleOptions,
    pub sampling_seconds: f64,
}

/// Samples `per_class` images of every class with `opts.sampler` and classifier-free
/// guidance (in `opts.guidance_interval`), class-major, as (N, C, H, W) in [-1, 1]. Gaussian
/// samplers clamp x_0 to [-1, 1] (the models here are pixel-space).
pub fn generate(model: &DitMoe, opts: &SampleOptions, device: &Device) -> Result<Tensor> {
    let classes: Vec<usize> = (0..model.config().num_classes).flat_map(|c| std::iter::repeat_n(c, opts.per_class)).collect();
    let sampler = opts.sampler.build(opts.steps, model.config(), true)?;
    let guidance = Guidance { scale: opts.cfg_scale, guide_all_channels: true };
    let mut out = Vec::new();
    for start in (0..classes.len()).step_by(opts.batch) {
        let end = (start + opts.batch).min(classes.len());
        let gm = GuidedModel::new(model, &classes[start..end], guidance, device)?.guided_in(opts.guidance_interval);
        let mut noise = ImageNoise::new(opts.seed, start..end);
        out.push(sampler.sample_seeded(&gm, &mut noise, &mut |_| {})?);
    }
    Tensor::cat(&out, 0)
}

/// Scores `generated` (class-major, `samples.per_class` each, model resolution) against the
/// real split in `reference` (built for the same `per_class`).
pub fn score(clf: &Classifier, reference: &RealReference, generated: &Tensor, samples: SampleOptions, sampling_seconds: f64) -> Result<EvalReport> {
    let (k, per_class) = (reference.class_names.len(), samples.per_class);
    let gen = center_crop(generated, SIDE)?;
    let gen_labels: Vec<u32> = (0..k as u32).flat_map(|c| std::iter::repeat_n(c, per_class)).collect();
    if gen.dim(0)? != gen_labels.len() {
        bail!("{} generated images for {k} classes × {per_class}", gen.dim(0)?);
    }
    let (gen_pred, gen_feat) = clf.predict(&gen, 500)?;
    let generated_per_class = per_class_accuracy(&gen_pred, &gen_labels, k);
    let generated_accuracy = gen_pred.iter().zip(&gen_labels).filter(|(p, l)| p == l).count() as f64 / gen_labels.len() as f64;
    let (mu_g, s_g) = gaussian_stats(&gen_feat)?;
    let (mu_r, s_r) = &reference.stats;
    let b = &reference.b_features;
    let frechet_distance_subset = frechet_between(&gen_feat, b)?;
    Ok(EvalReport {
        class_names: reference.class_names.clone(),
        real_accuracy: reference.accuracy,
        real_per_class: reference.per_class_accuracy.clone(),
        generated_accuracy,
        generated_per_class,
        relative_accuracy: generated_accuracy / reference.accuracy,
        frechet_distance: frechet_distance(&mu_g, &s_g, mu_r, s_r),
        real_subsets: reference.subsets.clone(),
        frechet_distance_subset,
        frechet_distance_real: reference.frechet_real,
        frechet_ratio: frechet_distance_subset / reference.frechet_real,
        frechet_per_class: per_class_frechet(&gen_feat, &gen_labels, b, &reference.subsets.labels(), k)?,
        frechet_real_per_class: reference.frechet_real_per_class.clone(),
        precision_recall: precision_recall(b, &gen_feat, DEFAULT_K)?,
        precision_recall_real: reference.precision_recall_real,
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
