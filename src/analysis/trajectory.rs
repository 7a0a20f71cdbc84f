//! `RoutingTrajectory`: every routing decision of a sampling run, for every model evaluation
//! (timestep) x MoE layer x image x token, plus the states the model was fed, held on the
//! host so aggregations, the CLI and the explorer read it without a model or a device.
//!
//! Only the conditional images are kept: with classifier-free guidance the null-class half of
//! each forward is class-agnostic, and the official analysis (`analysis/expert_data.py` +
//! `heatmap_*.py`) reads the first half of every record too.
//!
//! Layout is image-major, (N, S, L, T, k): runs split into batches concatenate image by image,
//! and a subset of images (one class) is a set of contiguous slices.
use crate::config::DitConfig;
use crate::sampling::GuidanceInterval;
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

/// What produced a trajectory: enough to label every axis and to rerun it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrajectoryMeta {
    /// Where the model came from (informational: a trajectory reloads without it).
    pub model: String,
    pub config: DitConfig,
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// Class label of each image.
    pub classes: Vec<usize>,
    /// Image i drew its noise from the stream (seed, i) ([`crate::sampling::ImageNoise`]).
    pub seed: u64,
    /// Sampler name ([`super::SamplerKind`]).
    pub sampler: String,
    pub steps: usize,
    pub guidance: f64,
    /// The noise levels guidance was limited to, saved as `[lo, hi]`; None: every level (also
    /// in trajectories saved before intervals existed).
    #[serde(default)]
    pub guidance_interval: Option<GuidanceInterval>,
    /// The timestep fed to the model at each evaluation (DDPM/DDIM: original step in 0..1000;
    /// flow: t in (0, 1], 1 = noise). Heun evaluates twice per step, so there can be more
    /// evaluations than steps.
    pub timesteps: Vec<f64>,
}

impl TrajectoryMeta {
    pub fn class_name(&self, class: usize) -> String {
        self.class_names.as_ref().and_then(|n| n.get(class).cloned()).unwrap_or_else(|| class.to_string())
    }

    /// The guidance as `ditmoe generate` prints it: `cfg 2`, or `cfg 2 at levels [0, 0.7]`.
    pub fn guidance_label(&self) -> String {
        format!("cfg {}{}", self.guidance, GuidanceInterval::describe(self.guidance_interval))
    }
}

/// Sizes of a trajectory's axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub images: usize,
    /// Model evaluations (the timestep axis).
    pub steps: usize,
    pub layers: usize,
    pub tokens: usize,
    pub top_k: usize,
    pub experts: usize,
    /// Router scores per token (the routed experts; ProMoE's unconditional expert has none).
    pub score_width: usize,
    /// Tokens per side of the patch grid (tokens = grid * grid, row-major).
    pub grid: usize,
    /// (C, H, W) of a model state.
    pub state: (usize, usize, usize),
}

impl Dims {
    pub fn of(meta: &TrajectoryMeta) -> Self {
        let c = &meta.config;
        Self {
            images: meta.classes.len(),
            steps: meta.timesteps.len(),
            layers: c.moe_layers(),
            tokens: c.num_patches(),
            top_k: c.num_experts_per_tok,
            experts: c.expert_ids(),
            score_width: c.num_experts,
            grid: c.grid_size(),
            state: (c.in_channels, c.input_size, c.input_size),
        }
    }
    fn state_len(&self) -> usize {
        self.state.0 * self.state.1 * self.state.2
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingTrajectory {
    pub meta: TrajectoryMeta,
    dims: Dims,
    /// (N, S, L, T, k) expert ids, each token's sorted by descending gate weight.
    experts: Vec<u32>,
    /// (N, S, L, T, k) gate weights of those experts.
    weights: Vec<f32>,
    /// (N, S, L, T, E) full router softmax scores (near misses, score entropy).
    scores: Vec<f32>,
    /// (N, S, C, H, W) the state x_t each evaluation was fed.
    states: Vec<f32>,
    /// (N, C, H, W) the final samples.
    samples: Vec<f32>,
}

/// A trajectory's flat arrays in its (N, S, ...) layout.
pub(crate) struct RawArrays<'a> {
    pub experts: &'a [u32],
    pub weights: &'a [f32],
    pub scores: &'a [f32],
    pub states: &'a [f32],
    pub samples: &'a [f32],
}

/// One image's record, in the trajectory's layout: (S, L, T, k), (S, L, T, k), (S, L, T, E),
/// (S, C, H, W) and (C, H, W).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageRecord {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
    pub scores: Vec<f32>,
    pub states: Vec<f32>,
    pub sample: Vec<f32>,
}

impl RoutingTrajectory {
    /// Builds a trajectory from one record per image (in `meta.classes` order), checking
    /// every length against the sizes the metadata implies.
    pub fn new(meta: TrajectoryMeta, images: Vec<ImageRecord>) -> Result<Self> {
        let d = Dims::of(&meta);
        if images.len() != d.images {
            bail!("{} image records for {} classes", images.len(), d.images)
        }
        let per_step = d.layers * d.tokens;
        for (i, r) in images.iter().enumerate() {
            let want = [
                ("experts", r.experts.len(), d.steps * per_step * d.top_k),
                ("weights", r.weights.len(), d.steps * per_step * d.top_k),
                ("scores", r.scores.len(), d.steps * per_step * d.score_width),
                ("states", r.states.len(), d.steps * d.state_len()),
                ("sample", r.sample.len(), d.state_len()),
            ];
            if let Some((name, got, want)) = want.iter().find(|(_, got, want)| got != want) {
                bail!("image {i}: {name} has {got} values, {} steps x {} layers x {} tokens need {want}", d.steps, d.layers, d.tokens)
            }
            if let Some(e) = r.experts.iter().find(|&&e| e as usize >= d.experts) {
                bail!("image {i}: expert id {e} out of range (the model has {} experts)", d.experts)
            }
        }
        if let Some(c) = meta.classes.iter().find(|&&c| c >= meta.config.num_classes) {
            bail!("class {c} out of range (the model has {} classes)", meta.config.num_classes)
        }
        let mut t = Self { meta, dims: d, experts: vec![], weights: vec![], scores: vec![], states: vec![], samples: vec![] };
        for r in images {
            t.experts.extend(r.experts);
            t.weights.extend(r.weights);
            t.scores.extend(r.scores);
            t.states.extend(r.states);
            t.samples.extend(r.sample);
        }
        Ok(t)
    }

    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// Offset of token `t`'s first slot in (N, S, L, T, width) data.
    fn at(&self, n: usize, s: usize, l: usize, t: usize, width: usize) -> usize {
        let d = &self.dims;
        (((n * d.steps + s) * d.layers + l) * d.tokens + t) * width
    }

    /// Expert ids chosen for token `t` (descending weight), k of them.
    pub fn token_experts(&self, n: usize, s: usize, l: usize, t: usize) -> &[u32] {
        let i = self.at(n, s, l, t, self.dims.top_k);
        &self.experts[i..i + self.dims.top_k]
    }

    /// Gate weights matching [`Self::token_experts`].
    pub fn token_weights(&self, n: usize, s: usize, l: usize, t: usize) -> &[f32] {
        let i = self.at(n, s, l, t, self.dims.top_k);
        &self.weights[i..i + self.dims.top_k]
    }

    /// Router softmax over all experts for token `t`.
    pub fn token_scores(&self, n: usize, s: usize, l: usize, t: usize) -> &[f32] {
        let i = self.at(n, s, l, t, self.dims.score_width);
        &self.scores[i..i + self.dims.score_width]
    }

    /// The state (C, H, W) image `n` was at when evaluation `s` ran.
    pub fn state(&self, n: usize, s: usize) -> &[f32] {
        let len = self.dims.state_len();
        let i = (n * self.dims.steps + s) * len;
        &self.states[i..i + len]
    }

    /// The final sample (C, H, W) of image `n`.
    pub fn sample(&self, n: usize) -> &[f32] {
        let len = self.dims.state_len();
        &self.samples[n * len..(n + 1) * len]
    }

    /// Image `n`'s whole record.
    pub fn image(&self, n: usize) -> ImageRecord {
        let d = &self.dims;
        let slice = |width: usize| n * d.steps * d.layers * d.tokens * width..(n + 1) * d.steps * d.layers * d.tokens * width;
        let (sk, se) = (slice(d.top_k), slice(d.score_width));
        let len = d.steps * d.state_len();
        ImageRecord {
            experts: self.experts[sk.clone()].to_vec(),
            weights: self.weights[sk].to_vec(),
            scores: self.scores[se].to_vec(),
            states: self.states[n * len..(n + 1) * len].to_vec(),
            sample: self.sample(n).to_vec(),
        }
    }

    /// The trajectory of the images `images` only (e.g. one class), in that order.
    pub fn select_images(&self, images: &[usize]) -> Result<Self> {
        if let Some(&bad) = images.iter().find(|&&n| n >= self.dims.images) {
            bail!("image {bad} of {}", self.dims.images)
        }
        let meta = TrajectoryMeta { classes: images.iter().map(|&n| self.meta.classes[n]).collect(), ..self.meta.clone() };
        Self::new(meta, images.iter().map(|&n| self.image(n)).collect())
    }

    /// Images of class `class`, in run order.
    pub fn images_of_class(&self, class: usize) -> Vec<usize> {
        (0..self.dims.images).filter(|&n| self.meta.classes[n] == class).collect()
    }

    /// The distinct classes of the run, ascending.
    pub fn classes(&self) -> Vec<usize> {
        let mut c = self.meta.classes.clone();
        c.sort_unstable();
        c.dedup();
        c
    }

    /// The flat arrays, for [`super::store`].
    pub(crate) fn raw(&self) -> RawArrays<'_> {
        RawArrays { experts: &self.experts, weights: &self.weights, scores: &self.scores, states: &self.states, samples: &self.samples }
    }

    /// Appends the images of `other`, a run of the same model and schedule (another batch).
    pub fn append(&mut self, other: Self) -> Result<()> {
        let same = TrajectoryMeta { classes: self.meta.classes.clone(), ..other.meta.clone() };
        if same != self.meta {
            bail!("cannot append a trajectory of another model, sampler, schedule or guidance")
        }
        self.meta.classes.extend(other.meta.classes);
        self.dims = Dims::of(&self.meta);
        self.experts.extend(other.experts);
        self.weights.extend(other.weights);
        self.scores.extend(other.scores);
        self.states.extend(other.states);
        self.samples.extend(other.samples);
        Ok(())
    }
}
