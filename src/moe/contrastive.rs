//! ProMoE's routing contrastive loss (official `SparseMoeBlock.compute_routing_contrastive_loss`
//! and its call in `forward`, training mode; docs/promoe.md "Routing contrastive loss").
//!
//! Over the conditional tokens (the unconditional expert's tokens never reach a prototype):
//! for every prototype e with at least one assigned token, `m_e` = mean of those tokens' MoE
//! inputs h (not normalised); V = those prototypes in ascending id; if |V| < 2 the loss is 0;
//! otherwise `L = lambda * CE(cos(c_{V_a}, m_{V_b}) / tau, targets = arange(V))`: each prototype
//! must pick its own cluster mean among the valid clusters' means (InfoNCE). The assignment is
//! a constant (no gradient through the routing); the loss reaches the prototypes directly and
//! the token features through the means.
use super::prototypical::normalize_rows;
use super::ExpertDispatch;
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingContrastive {
    /// `routing_contrastive_lam` (0 = off, as the official `lam > 0` test).
    pub lambda: f64,
    /// `routing_contrastive_temperature`.
    pub temperature: f64,
    /// `use_top_k_for_routing_contrastive`: a token belongs to every prototype among its k
    /// picks (released); otherwise only to its first pick (`expert_indices[:, 0]`).
    pub top_k_assignment: bool,
}

impl RoutingContrastive {
    pub fn enabled(&self) -> bool {
        self.lambda > 0.0
    }

    /// The loss (a scalar in h's dtype, lambda included) for the prototypes `centers` [E, D],
    /// the MoE inputs `h` (S, D) and the layer's assignment: its expert ids `experts` (S, k)
    /// and their `dispatch` (ids `>= E`, the unconditional expert, are not prototypes and are
    /// skipped). The dispatch's host-side token lists say which prototypes have tokens (no
    /// extra host read of the routing); the cluster means are one masked matmul on the device.
    pub fn loss(&self, centers: &Tensor, h: &Tensor, experts: &Tensor, dispatch: &ExpertDispatch) -> Result<Tensor> {
        let dev = h.device();
        let dtype = h.dtype();
        let e = centers.dim(0)?;
        let valid: Vec<u32> = (0..e).filter(|&p| !dispatch.tokens_of(p, !self.top_k_assignment).is_empty()).map(|p| p as u32).collect();
        let v = valid.len();
        if v < 2 {
            return Tensor::zeros((), dtype, dev);
        }
        // (S, V) 0/1: token t belongs to valid prototype V_j (a token's k picks are distinct
        // routed experts; the unconditional expert fills all k slots with id E, which lands in
        // a column past the prototypes). The means as `maskᵀ h / counts`: an index_select per
        // prototype would put candle's CUDA index_add, which loops over every token per
        // column, into the backward.
        let picks = match self.top_k_assignment {
            true => experts.clone(),
            false => experts.narrow(1, 0, 1)?,
        }
        .to_dtype(DType::U32)?
        .contiguous()?;
        let ones = Tensor::ones(picks.dims(), dtype, dev)?;
        let idx = Tensor::from_vec(valid, v, dev)?;
        let mask = Tensor::zeros((picks.dim(0)?, e + 1), dtype, dev)?.scatter_add(&picks, &ones, 1)?.index_select(&idx, 1)?;
        let means = mask.t()?.matmul(h)?.broadcast_div(&mask.sum(0)?.unsqueeze(1)?)?;
        let means = normalize_rows(&means)?;
        let centers = centers.to_dtype(dtype)?.index_select(&idx, 0)?;
        let logits = (normalize_rows(&centers)?.matmul(&means.t()?)? / self.temperature)?;
        let targets = Tensor::arange(0u32, v as u32, dev)?;
        let ce = candle_nn::loss::cross_entropy(&logits, &targets)?;
        (ce * self.lambda)?.to_dtype(dtype)
    }
}

