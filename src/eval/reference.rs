//! The real side of `ditmoe eval`, computed once per run (and once per `--sweep`): the
//! classifier's predictions and features of the real split, and two disjoint real subsets the
//! size of the generated set.
//!
//! A Fréchet distance estimated from N samples is biased upwards by a term that shrinks with
//! N, so "23.9" alone does not say how far from real the samples are. Two disjoint real
//! subsets of N images each give the distance a perfect generator would score at this N; a
//! generated set scored against one of them at the same N reads as a ratio of that floor.
//! Precision and recall take the same subset as their real set, as Kynkäänniemi et al. 2019
//! compare sets of equal size.
use super::classifier::Classifier;
use super::fit::per_class_accuracy;
use super::frechet::{frechet_between, gaussian_stats, per_class_frechet};
use super::precision_recall::{precision_recall, PrecisionRecall, DEFAULT_K};
use candle_core::{bail, Result, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

/// Seed of the real-subset draw. Fixed, not the sampling seed, so that every model, seed and
/// sweep point is compared against the same real images.
pub const SUBSET_SEED: u64 = 0;

/// Two disjoint, class-stratified subsets of a real split: for each class, its images are
/// shuffled by a generator seeded with `seed` (one generator, classes in label order); `a`
/// takes the first `per_class[c]` and `b` the next `per_class[c]`, where `per_class[c]` is
/// the generated count per class, capped at half the class's real images.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RealSubsets {
    pub seed: u64,
    /// Images of each class in each subset.
    pub per_class: Vec<usize>,
    /// Row indices into the split, class by class.
    #[serde(skip)]
    pub a: Vec<u32>,
    #[serde(skip)]
    pub b: Vec<u32>,
}

impl RealSubsets {
    /// Draws the subsets from the split's `labels` (values below `num_classes`).
    pub fn draw(labels: &[u32], num_classes: usize, per_class: usize, seed: u64) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut a, mut b, mut sizes) = (Vec::new(), Vec::new(), Vec::with_capacity(num_classes));
        for c in 0..num_classes as u32 {
            let mut rows: Vec<u32> = (0..labels.len() as u32).filter(|&i| labels[i as usize] == c).collect();
            let n = per_class.min(rows.len() / 2);
            if n < 2 {
                bail!("class {c} has {} real images: two disjoint real subsets need at least 4", rows.len());
            }
            rows.shuffle(&mut rng);
            a.extend_from_slice(&rows[..n]);
            b.extend_from_slice(&rows[n..2 * n]);
            sizes.push(n);
        }
        Ok(Self { seed, per_class: sizes, a, b })
    }

    /// The labels of `a` (and of `b`): class-major, `per_class[c]` of each.
    pub fn labels(&self) -> Vec<u32> {
        self.per_class.iter().enumerate().flat_map(|(c, &n)| std::iter::repeat_n(c as u32, n)).collect()
    }
}

/// Everything about the real split that does not depend on the generated samples.
pub struct RealReference {
    pub class_names: Vec<String>,
    /// Classifier accuracy on the whole split, overall and per class.
    pub accuracy: f64,
    pub per_class_accuracy: Vec<f64>,
    /// Mean and covariance of the whole split's features.
    pub stats: (Vec<f64>, Vec<f64>),
    pub subsets: RealSubsets,
    /// Features of subset `b`, the set generated samples are compared with at equal size.
    pub b_features: Tensor,
    /// Fréchet distance between the subsets: the floor at this sample size.
    pub frechet_real: f64,
    /// The same per class.
    pub frechet_real_per_class: Vec<f64>,
    /// Precision and recall of subset `a` against subset `b`: what a perfect generator scores.
    pub precision_recall_real: PrecisionRecall,
}

impl RealReference {
    /// Scores the real split (`real` (N, 1, 28, 28), `labels`) with `clf` and draws the subsets
    /// for a generated set of `per_class` images per class.
    pub fn new(clf: &Classifier, real: &Tensor, labels: &[u32], class_names: Vec<String>, per_class: usize) -> Result<Self> {
        let k = class_names.len();
        let (pred, features) = clf.predict(real, 500)?;
        let accuracy = pred.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64;
        let subsets = RealSubsets::draw(labels, k, per_class, SUBSET_SEED)?;
        let select = |rows: &[u32]| features.index_select(&Tensor::new(rows, features.device())?, 0);
        let (a, b) = (select(&subsets.a)?, select(&subsets.b)?);
        let sub_labels = subsets.labels();
        Ok(Self {
            per_class_accuracy: per_class_accuracy(&pred, labels, k),
            accuracy,
            stats: gaussian_stats(&features)?,
            frechet_real: frechet_between(&a, &b)?,
            frechet_real_per_class: per_class_frechet(&a, &sub_labels, &b, &sub_labels, k)?,
            precision_recall_real: precision_recall(&b, &a, DEFAULT_K)?,
            b_features: b,
            subsets,
            class_names,
        })
    }
}
