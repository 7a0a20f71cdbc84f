//! `PrototypicalRouter`: ProMoE's router (official `models_ProMoE_TC.py`,
//! `SparseMoeBlock.compute_router`; docs/promoe.md "Router").
//!
//! 1. Conditional routing: every token the caller marks unconditional (the DiT: a token of an
//!    image whose label, after label dropout, is the null class) goes to the unconditional
//!    expert, id `E` (one past the routed experts), in all k slots, with weights `[1, 0, ..., 0]`.
//! 2. Prototypical routing of the other tokens: `cos = normalize(h) normalize(C)^T` against the
//!    E learnable prototypes `cluster_centers` [E, D]; weights `w = cos` (identity, released),
//!    `softmax(cos)` or `sigmoid(cos)`; `topk(w, k)` sorted descending, no renormalisation.
use super::router::Routing;
use super::RoutingContrastive;
use candle_core::{bail, DType, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// How the router weights follow from the cosines (official `router_weight_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightMode {
    /// `w = cos` (the released configs): weights may be negative.
    #[default]
    Identity,
    /// `w = softmax(cos)` over the E prototypes.
    Softmax,
    /// `w = sigmoid(cos)` (official `sigmoid_scale` is 1).
    Sigmoid,
}

impl WeightMode {
    /// The weights of every prototype from the cosines (S, E).
    pub fn apply(self, cos: &Tensor) -> Result<Tensor> {
        match self {
            Self::Identity => Ok(cos.clone()),
            Self::Softmax => crate::nn::softmax_last_dim(cos),
            Self::Sigmoid => candle_nn::ops::sigmoid(cos),
        }
    }
}

/// Row-wise `F.normalize(x, p=2, dim=1, eps=1e-12)`, `x / max(||x||, eps)`, written as
/// `x / sqrt(max(||x||^2, eps^2))`: the same value, and a finite gradient for a zero row
/// (candle's `sqrt` backward at 0 would give 0 * inf).
pub fn normalize_rows(x: &Tensor) -> Result<Tensor> {
    let sq = x.sqr()?.sum_keepdim(D::Minus1)?.maximum(1e-24)?;
    x.broadcast_div(&sq.sqrt()?)
}

#[derive(Debug, Clone)]
pub struct PrototypicalRouter {
    cluster_centers: Tensor, // [E, D]
    top_k: usize,
    mode: WeightMode,
    /// Whether tokens marked unconditional go to the extra expert `E` (official
    /// `use_uncond_expert`).
    unconditional_expert: bool,
    contrastive: RoutingContrastive,
}

impl PrototypicalRouter {
    /// Reads `cluster_centers` [num_routed, hidden] from `vb` (the MoE block's own prefix, as in
    /// the official state dict). A fresh variable starts as the official `N(0, 0.02^2)`.
    pub fn new(hidden: usize, num_routed: usize, top_k: usize, mode: WeightMode, unconditional_expert: bool, contrastive: RoutingContrastive, vb: VarBuilder) -> Result<Self> {
        if top_k == 0 || top_k > num_routed {
            bail!("prototypical router: top_k {top_k} must be in 1..={num_routed}")
        }
        let init = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        let cluster_centers = vb.get_with_hints((num_routed, hidden), "cluster_centers", init)?;
        Ok(Self { cluster_centers, top_k, mode, unconditional_expert, contrastive })
    }

    /// The prototypes [E, D].
    pub fn cluster_centers(&self) -> &Tensor {
        &self.cluster_centers
    }
    /// E, the routed experts (prototypes).
    pub fn num_routed(&self) -> usize {
        self.cluster_centers.dim(0).unwrap_or(0)
    }
    pub fn has_unconditional_expert(&self) -> bool {
        self.unconditional_expert
    }
    /// The unconditional expert's id (`E`), when there is one.
    pub fn uncond_expert(&self) -> Option<usize> {
        self.unconditional_expert.then(|| self.num_routed())
    }
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    pub fn weight_mode(&self) -> WeightMode {
        self.mode
    }
    pub fn contrastive(&self) -> &RoutingContrastive {
        &self.contrastive
    }

    /// Cosines between the tokens x (S, D) and the prototypes, (S, E), computed in f32 whatever
    /// the model dtype (as the top-k router's softmax), so bf16 models route like f32 ones on
    /// all but near ties.
    pub fn cosines(&self, x: &Tensor) -> Result<Tensor> {
        let x = normalize_rows(&x.to_dtype(DType::F32)?)?;
        let c = normalize_rows(&self.cluster_centers.to_dtype(DType::F32)?)?;
        x.matmul(&c.t()?)
    }

    /// Routes the tokens x (S, D); `unconditional` (S,) any integer dtype, nonzero for a token
    /// that goes to the unconditional expert (required when there is one). Every token gets
    /// prototype cosines in `scores` (unconditional rows included, for analysis); only the
    /// conditional tokens are routed by them. No host synchronisation.
    pub fn forward(&self, x: &Tensor, unconditional: Option<&Tensor>) -> Result<Routing> {
        let cos = self.cosines(x)?;
        let w = self.mode.apply(&cos)?;
        // All three modes are increasing in cos, so this is `torch.topk(w, k)` (sorted).
        let experts = w.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, self.top_k)?.contiguous()?;
        let weights = w.gather(&experts, D::Minus1)?;
        if !self.unconditional_expert {
            return Ok(Routing { experts, weights, logits: cos.clone(), scores: cos });
        }
        let Some(unconditional) = unconditional else {
            bail!("prototypical router: the unconditional expert needs the unconditional-token mask")
        };
        let (s, k) = experts.dims2()?;
        if unconditional.elem_count() != s {
            bail!("prototypical router: the unconditional-token mask has {} entries for {s} tokens", unconditional.elem_count())
        }
        let dev = x.device();
        let mask = unconditional.flatten_all()?.to_dtype(DType::U8)?.reshape((s, 1))?.broadcast_as((s, k))?;
        let uncond_ids = Tensor::full(self.num_routed() as u32, (s, k), dev)?;
        let first_slot: Vec<f32> = (0..k).map(|j| if j == 0 { 1.0 } else { 0.0 }).collect();
        let uncond_w = Tensor::from_vec(first_slot, (1, k), dev)?.broadcast_as((s, k))?;
        Ok(Routing {
            experts: mask.where_cond(&uncond_ids, &experts)?,
            weights: mask.where_cond(&uncond_w, &weights)?,
            logits: cos.clone(),
            scores: cos,
        })
    }
}
