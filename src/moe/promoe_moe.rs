//! `ProMoeMoe`: ProMoE's MoE layer (official `models_ProMoE_TC.py::SparseMoeBlock`):
//! the [`PrototypicalRouter`] over E routed GELU experts plus the unconditional expert
//! `experts.<E>`, and one shared GELU expert added for every token, run by the same
//! [`routed_forward`] as DiT-MoE's layer. Official parameter names, in state-dict order:
//! `cluster_centers`, `experts.<e>.{up,down}_proj.{weight,bias}` (e = 0..=E), `shared_expert.*`.
//!
//! Training adds two router losses, returned separately (the official code folds them into one
//! gradient-only `AddAuxiliaryLoss`): the routing contrastive loss ([`RoutingContrastive`]) and
//! the optional balance loss on the conditional tokens (coefficient 0 in every released config).
use super::sparse_moe::{routed_forward, MoeOutput};
use super::experts::frozen_on_gpu;
use super::{balance_loss, stack_frozen, GeluMlp, PrototypicalRouter, Routing, RoutingContrastive, WeightMode};
use crate::kernels::ExpertStacks;
use crate::config::DitConfig;
use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct ProMoeMoe {
    router: PrototypicalRouter,
    /// The E routed experts, then the unconditional one (when enabled).
    experts: Vec<GeluMlp>,
    /// The experts' weights stacked for the fused kernels, when they are frozen on the GPU.
    stacked: Option<ExpertStacks>,
    shared: Option<GeluMlp>,
    balance_alpha: f64,
    seq_aux: bool,
    contrastive: RoutingContrastive,
}

impl ProMoeMoe {
    /// The layer of a ProMoE `cfg` (`cfg.promoe` set). Tokens of images labelled
    /// `cfg.null_class()` (`num_classes`; the official code hard-codes 1000, ImageNet's
    /// null class) go to the unconditional expert.
    pub fn new(cfg: &DitConfig, vb: VarBuilder) -> Result<Self> {
        let Some(p) = &cfg.promoe else {
            bail!("ProMoeMoe needs a config with a `promoe` section")
        };
        let d = cfg.hidden_size;
        let null_label = p.use_uncond_expert.then_some(cfg.null_class() as u32);
        let router = PrototypicalRouter::new(d, cfg.num_experts, cfg.num_experts_per_tok, p.router_weight_mode, null_label, vb.clone())?;
        let mut experts = (0..cfg.num_experts + usize::from(p.use_uncond_expert))
            .map(|e| GeluMlp::new(d, p.moe_intermediate_size, vb.pp(format!("experts.{e}"))))
            .collect::<Result<Vec<_>>>()?;
        // Frozen weights on the GPU (inference): stacked once for the fused kernels, the
        // experts kept as views into the stacks.
        let stacked = match frozen_on_gpu(experts[0].weights()[0]) {
            true => {
                let (stacks, views) = stack_frozen(&experts)?;
                experts = views;
                Some(stacks)
            }
            false => None,
        };
        let shared = match p.use_shared_expert {
            true => Some(GeluMlp::new(d, p.shared_expert_intermediate_size, vb.pp("shared_expert"))?),
            false => None,
        };
        let contrastive = RoutingContrastive {
            lambda: p.routing_contrastive_lam,
            temperature: p.routing_contrastive_temperature,
            top_k_assignment: p.use_top_k_for_routing_contrastive,
        };
        Ok(Self { router, experts, stacked, shared, balance_alpha: p.load_balance_loss_coef, seq_aux: cfg.seq_aux, contrastive })
    }

    pub fn router(&self) -> &PrototypicalRouter {
        &self.router
    }
    /// Routed experts `0..E`, then the unconditional expert `E`.
    pub fn experts(&self) -> &[GeluMlp] {
        &self.experts
    }
    pub fn shared_expert(&self) -> Option<&GeluMlp> {
        self.shared.as_ref()
    }
    pub fn contrastive(&self) -> &RoutingContrastive {
        &self.contrastive
    }

    /// x: (N, T, D), labels: (N,) after label dropout. Same in training and eval mode.
    pub fn forward(&self, x: &Tensor, labels: &Tensor) -> Result<MoeOutput> {
        routed_forward(&self.router, &self.experts, self.stacked.as_ref(), self.shared.as_ref(), x, Some(labels))
    }

    /// The routing contrastive loss of one call (x its input, `moe` its output), lambda
    /// included; None when lambda is 0 (the official `routing_contrastive_lam > 0` test).
    pub fn contrastive_loss(&self, x: &Tensor, moe: &MoeOutput) -> Result<Option<Tensor>> {
        if !self.contrastive.enabled() {
            return Ok(None);
        }
        let (n, t, d) = x.dims3()?;
        let loss = self.contrastive.loss(self.router.cluster_centers(), &x.reshape((n * t, d))?, &moe.routing.experts, dispatch_of(moe)?)?;
        Ok(Some(loss))
    }

    /// The official ProMoE balance loss of one call, None when its coefficient is 0 (every
    /// released config): DiT-MoE's formula (`super::balance_loss`) over the conditional tokens
    /// only, with scores `softmax(w)` (`w` itself in softmax mode) over the routed experts.
    pub fn balance_loss(&self, moe: &MoeOutput) -> Result<Option<Tensor>> {
        if self.balance_alpha == 0.0 {
            return Ok(None);
        }
        let r = &moe.routing;
        let (n, t, _) = moe.out.dims3()?;
        // The unconditional tokens are exactly those the router sent to expert E.
        let uncond = match self.router.uncond_expert() {
            Some(e) => dispatch_of(moe)?.tokens_of(e, true),
            None => Vec::new(),
        };
        let cond: Vec<u32> = (0..(n * t) as u32).filter(|tok| uncond.binary_search(tok).is_err()).collect();
        let dev = r.scores.device();
        if cond.is_empty() {
            // No conditional token, nothing to balance (the official code would fail here).
            return Ok(Some(Tensor::zeros((), r.scores.dtype(), dev)?));
        }
        let n_cond = cond.len();
        let idx = Tensor::from_vec(cond, n_cond, dev)?;
        let mode = self.router.weight_mode();
        let w = mode.apply(&r.scores.index_select(&idx, 0)?)?;
        let scores = match mode {
            WeightMode::Softmax => w,
            _ => crate::nn::softmax_last_dim(&w)?,
        };
        let cond_routing = Routing { experts: r.experts.index_select(&idx, 0)?, weights: r.weights.index_select(&idx, 0)?, scores };
        Ok(Some(balance_loss(&cond_routing, n_cond / t, self.balance_alpha, self.seq_aux)?))
    }
}

/// ProMoE layers run [`routed_forward`], which keeps the host-side expert dispatch (the
/// losses read its assignment) also where the experts run on the fused kernels (CUDA).
fn dispatch_of(moe: &MoeOutput) -> Result<&super::ExpertDispatch> {
    moe.dispatch.as_ref().ok_or_else(|| candle_core::Error::Msg("ProMoE losses need the host-side expert dispatch".into()))
}
