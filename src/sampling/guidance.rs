//! Classifier-free guidance shared by every sampler: the model, the batch's class labels and
//! the guidance scale, run in the official layouts.
//!
//! * Gaussian samplers (DDPM/DDIM) mirror the official `sample.py` + `DiT.forward_with_cfg`: one
//!   doubled batch `cat[x, x]` with labels `cat[classes, null]`, guidance
//!   `uncond + s (cond - uncond)` on the first 3 output channels only (or on every eps channel
//!   with `guide_all_channels`); the learned-sigma channels keep each half's own values.
//! * Rectified flow mirrors `RectifiedFlow.sample(z, cond, null_cond, cfg)`: guidance on
//!   **all** velocity channels. The official code runs the unconditional forward separately;
//!   a doubled batch computes the same per-image maths (attention, routing and experts act on
//!   each image alone), in one forward instead of two.
//!
//! A scale of exactly 1 is `cond` itself, so the unconditional half is never run: the forward
//! batch is N, not 2N.
use crate::config::DitConfig;
use crate::model::dit::apply_cfg;
use crate::model::{DitMoe, ForwardMode, LayerRouting, Trace};
use crate::runtime::graph::GraphedForward;
use candle_core::{bail, Device, Result, Tensor};
use std::sync::Mutex;

/// The model's eval forward `(x, t, labels) -> out` as [`GraphedForward`] replays it.
type ForwardFn<'a> = Box<dyn FnMut(&[&Tensor]) -> Result<Tensor> + Send + 'a>;

/// The official `forward_with_cfg` guides `eps[:, :3]` (kept from DiT for reproducibility).
const OFFICIAL_GUIDED_CHANNELS: usize = 3;

/// How the conditional and unconditional predictions are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    /// `uncond + scale (cond - uncond)`; 1 = plain conditional sampling (no null-class forward).
    pub scale: f64,
    /// Gaussian samplers: guide every eps channel instead of the official first 3 (for a
    /// 4-channel latent the official layout leaves channel 3 conditional-only). Rectified flow
    /// always guides every channel, as officially.
    pub guide_all_channels: bool,
}

impl Guidance {
    /// Whether the null-class half is run at all.
    pub fn is_guided(&self) -> bool {
        self.scale != 1.0
    }
}

/// What a sampler reports after each model evaluation: progress, and the values the model was
/// fed (so replays can be checked step by step).
#[derive(Debug)]
pub struct Evaluation<'a> {
    /// 0-based index of this evaluation.
    pub index: usize,
    /// Evaluations of the whole run ([`super::Sampler::evaluations`]).
    pub total: usize,
    /// The state the model was evaluated on, (N, C, H, W): the N conditional images.
    pub x: &'a Tensor,
    /// The timesteps fed to the model, (N,): i64 original DDPM steps or f32 flow times.
    pub t: &'a Tensor,
    /// Rows of the model forward: 2N with guidance, N without.
    pub forward_batch: usize,
}

/// The model bound to one batch of classes and a guidance setting.
#[derive(Debug)]
pub struct GuidedModel<'a> {
    model: &'a DitMoe,
    /// `classes` (N), or `cat[classes, null]` (2N) when guided.
    labels: Tensor,
    n: usize,
    guidance: Guidance,
    /// The routing record of the latest forward, when [`Self::record_routing`] asked for it: a
    /// Mutex because the sampler holds `&GuidedModel` while the per-evaluation callback takes
    /// the record out through another shared borrow.
    routing: Option<Mutex<Vec<LayerRouting>>>,
    /// The forward, replayed as one CUDA graph per step on a GPU (every step of a sampling
    /// run has the same shapes; plain calls on the CPU); None where the forward reads from the
    /// device ([`DitMoe::forward_is_capturable`]).
    graphed: Option<Mutex<GraphedForward<ForwardFn<'a>>>>,
}

impl<'a> GuidedModel<'a> {
    /// `classes` are the N conditional labels (each `< num_classes`); labels live on `device`.
    pub fn new(model: &'a DitMoe, classes: &[usize], guidance: Guidance, device: &Device) -> Result<Self> {
        let cfg = model.config();
        if classes.is_empty() {
            bail!("sampling needs at least one class label")
        }
        if let Some(bad) = classes.iter().find(|&&c| c >= cfg.num_classes) {
            bail!("class {bad} out of range: the model has {} classes (0..{})", cfg.num_classes, cfg.num_classes - 1)
        }
        if !guidance.scale.is_finite() {
            bail!("guidance scale {} is not finite", guidance.scale)
        }
        if guidance.is_guided() && cfg.label_table_rows() == cfg.num_classes {
            bail!(
                "guidance scale {} needs the null class, but this model has none (class_dropout_prob 0); use scale 1",
                guidance.scale
            )
        }
        let mut labels: Vec<u32> = classes.iter().map(|&c| c as u32).collect();
        if guidance.is_guided() {
            labels.extend(std::iter::repeat_n(cfg.null_class() as u32, classes.len()));
        }
        let labels = Tensor::new(labels, device)?;
        let graphed = model.forward_is_capturable().then(|| {
            let f: ForwardFn<'a> = Box::new(move |inputs: &[&Tensor]| match inputs {
                [x, t, y] => model.forward(x, t, y),
                _ => bail!("the model's forward takes x, t and labels"),
            });
            Mutex::new(GraphedForward::new(f))
        });
        Ok(Self { model, labels, n: classes.len(), guidance, routing: None, graphed })
    }

    /// Keeps the routing record of every forward for [`Self::take_routing`] (analysis).
    pub fn record_routing(mut self) -> Self {
        self.routing = Some(Mutex::new(Vec::new()));
        self
    }

    /// The routing of the latest forward, one entry per MoE layer with [`Self::forward_batch`]
    /// x T rows (conditional images first, then the null-class half when guided); empty when
    /// recording is off. Call it from the sampler's `on_eval`, which runs after each forward.
    pub fn take_routing(&self) -> Vec<LayerRouting> {
        match &self.routing {
            Some(r) => std::mem::take(&mut *r.lock().unwrap_or_else(|e| e.into_inner())),
            None => Vec::new(),
        }
    }

    pub fn config(&self) -> &DitConfig {
        self.model.config()
    }

    /// Forwards served by a CUDA graph replay so far, and why capturing failed if it did.
    pub fn graph_replays(&self) -> (usize, Option<String>) {
        match &self.graphed {
            Some(g) => {
                let g = g.lock().unwrap_or_else(|e| e.into_inner());
                (g.replays(), g.capture_error().map(str::to_string))
            }
            None => (0, None),
        }
    }

    /// The device the labels (and so the batch) live on.
    pub fn device(&self) -> Device {
        self.labels.device().clone()
    }

    /// Number of conditional images N.
    pub fn batch(&self) -> usize {
        self.n
    }

    /// Rows of each model forward (2N guided, N unguided).
    pub fn forward_batch(&self) -> usize {
        if self.guidance.is_guided() {
            2 * self.n
        } else {
            self.n
        }
    }

    /// The Gaussian samplers' model output `[eps | var values]` for the N images, guided as the
    /// official `forward_with_cfg` (first 3 channels) or on all eps channels. Fewer than 3
    /// image channels (a grayscale model) stop at `in_channels`: the official slice would
    /// reach into the learned-sigma channels there.
    pub fn gaussian_output(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let c = self.config().in_channels;
        let guided = if self.guidance.guide_all_channels { c } else { OFFICIAL_GUIDED_CHANNELS.min(c) };
        self.forward(x, t, guided)
    }

    /// Rectified flow's guided velocity (N, C, H, W): every channel guided (official
    /// `vu + cfg * (vc - vu)`), the learned-sigma half dropped (`chunk(2, dim=1)[0]`).
    pub fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let cfg = self.config();
        let out = self.forward(x, t, cfg.out_channels())?;
        out.narrow(1, 0, cfg.in_channels)
    }

    /// x (N, C, H, W), t (N,) -> guided raw output (N, C_out, H, W), f32.
    fn forward(&self, x: &Tensor, t: &Tensor, guided_channels: usize) -> Result<Tensor> {
        let n = x.dim(0)?;
        if n != self.n || t.dims() != [n] {
            bail!("guided forward: x {:?} and t {:?} must hold the {} images of the batch", x.dims(), t.dims(), self.n)
        }
        if !self.guidance.is_guided() {
            return self.model_forward(x, t);
        }
        let x2 = Tensor::cat(&[x, x], 0)?;
        let t2 = Tensor::cat(&[t, t], 0)?;
        let out = self.model_forward(&x2, &t2)?;
        // Both halves hold the guided values (official layout); the conditional one is ours.
        apply_cfg(&out, self.guidance.scale, guided_channels)?.narrow(0, 0, n)
    }

    /// One eval forward on the labels, keeping the routing record when asked to.
    fn model_forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let Some(slot) = &self.routing else {
            return match &self.graphed {
                Some(g) => g.lock().unwrap_or_else(|e| e.into_inner()).call(&[x, t, &self.labels]),
                None => self.model.forward(x, t, &self.labels),
            };
        };
        let mut trace = Trace::routing();
        let out = self.model.forward_full(x, t, &self.labels, ForwardMode::Eval, &mut trace)?.out;
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = trace.routing;
        Ok(out)
    }
}
