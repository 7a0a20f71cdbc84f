//! Routing: the decision record every router produces ([`Routing`]) and DiT-MoE's router. The
//! prototypical router of ProMoE is [`super::PrototypicalRouter`]; both feed the same dispatch
//! and experts ([`super::MoeLayer`]).
//!
//! `TopKRouter`: the official `MoEGate` scoring: `logits = h W^T` (no bias), softmax over
//! **all** routed experts, top-k; the weights are the chosen softmax scores, not renormalised
//! unless `norm_topk_prob` (official default false).
use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct TopKRouter {
    weight: Tensor, // [E, D]
    top_k: usize,
    norm_topk_prob: bool,
}

/// Routing decisions for S = N*T tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// (S, k) u32, sorted by descending weight.
    pub experts: Tensor,
    /// (S, k) f32 gate weights.
    pub weights: Tensor,
    /// (S, E) f32 router scores over the E routed experts: softmax probabilities for
    /// [`TopKRouter`] (what the balance loss averages), prototype cosines for
    /// [`super::PrototypicalRouter`].
    pub scores: Tensor,
    /// (S, E) the router's logits before the softmax, in the model dtype (HF's
    /// `router_logits`); the prototype cosines for [`super::PrototypicalRouter`].
    pub logits: Tensor,
}

impl TopKRouter {
    pub fn new(hidden: usize, num_experts: usize, top_k: usize, norm_topk_prob: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((num_experts, hidden), "weight")?;
        Ok(Self { weight, top_k, norm_topk_prob })
    }

    pub fn num_experts(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// x: (S, D) -> logits (S, E) in the model dtype (`F.linear(h, W)`).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        x.to_dtype(self.weight.dtype())?.matmul(&self.weight.t()?)
    }

    /// Softmax and top-k of the logits. The softmax runs in f32 whatever the model dtype, as
    /// autocast does for `softmax`, so bf16 models pick the same experts as f32 ones on all
    /// but near ties.
    pub fn route(&self, logits: &Tensor) -> Result<Routing> {
        let scores = crate::nn::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        let experts = scores.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, self.top_k)?.contiguous()?;
        let weights = self.gate_weights(scores.gather(&experts, D::Minus1)?)?;
        Ok(Routing { experts, weights, scores, logits: logits.clone() })
    }

    /// The chosen experts' softmax scores (S, k) as gate weights: renormalised to sum to one
    /// when `norm_topk_prob` (official `topk_weight / (topk_weight.sum(-1) + 1e-20)`), else
    /// as they are.
    pub fn gate_weights(&self, top_scores: Tensor) -> Result<Tensor> {
        match self.top_k > 1 && self.norm_topk_prob {
            true => top_scores.broadcast_div(&(top_scores.sum_keepdim(D::Minus1)? + 1e-20)?),
            false => Ok(top_scores),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Routing> {
        self.route(&self.logits(x)?)
    }
}
