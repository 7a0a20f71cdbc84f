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
use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
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
    /// the MoE inputs `h` (S, D) and the assignment of the layer's `dispatch` (expert ids
    /// `>= E`, the unconditional expert, are not prototypes and are skipped). Reusing the
    /// dispatch's expert-sorted token lists costs no extra host read of the routing.
    pub fn loss(&self, centers: &Tensor, h: &Tensor, dispatch: &ExpertDispatch) -> Result<Tensor> {
        let dev = h.device();
        let dtype = h.dtype();
        let mut valid = Vec::new();
        let mut means = Vec::new();
        for e in 0..centers.dim(0)? {
            let tokens = dispatch.tokens_of(e, !self.top_k_assignment);
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let rows = h.index_select(&Tensor::from_vec(tokens, n, dev)?, 0)?;
            means.push(rows.mean_keepdim(0)?);
            valid.push(e as u32);
        }
        let v = valid.len();
        if v < 2 {
            return Tensor::zeros((), dtype, dev);
        }
        let means = normalize_rows(&Tensor::cat(&means, 0)?)?;
        let centers = centers.to_dtype(dtype)?.index_select(&Tensor::from_vec(valid, v, dev)?, 0)?;
        let logits = (normalize_rows(&centers)?.matmul(&means.t()?)? / self.temperature)?;
        let targets = Tensor::arange(0u32, v as u32, dev)?;
        let ce = candle_nn::loss::cross_entropy(&logits, &targets)?;
        (ce * self.lambda)?.to_dtype(dtype)
    }
}

