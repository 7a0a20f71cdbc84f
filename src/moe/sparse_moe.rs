//! The sparse MoE layer, shared by every router and expert form ([`routed_forward`]: route,
//! dispatch, run the experts, add the shared expert), and DiT-MoE's parameterisation of it.
//!
//! `SharedExpertMoe`: the official DiT-MoE `SparseMoeBlock`: top-k routed SwiGLU experts plus
//! an always-on shared SwiGLU expert (`moe_out = routed + shared`), parameter names
//! `gate.weight`, `experts.<i>.{gate,up,down}_proj.weight`, `shared_experts.*`.
use super::{balance_loss, ExpertDispatch, FusedSwiglu, Router, Routing, StackedExperts, SwigluExpert, TopKRouter};
use crate::config::DitConfig;
use crate::kernels::{self, ExpertStacks};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct SharedExpertMoe {
    gate: TopKRouter,
    experts: Vec<SwigluExpert>,
    shared: Option<SwigluExpert>,
    /// The fused CUDA kernels' view of the same weights, when they can serve this layer.
    fused: Option<FusedSwiglu>,
    alpha: f64,
    seq_aux: bool,
}

/// Everything one MoE call produces; the block decides what to keep.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// routed + shared, (N, T, D).
    pub out: Tensor,
    /// The weighted routed sum alone, (N, T, D); None on the fused GPU path, whose combine
    /// adds the shared expert in the same pass.
    pub routed: Option<Tensor>,
    /// The shared expert's output, (N, T, D), when there is one.
    pub shared: Option<Tensor>,
    pub routing: Routing,
    /// Slots routed to each expert this call, `[E]` u32 on the layer's device (read it back
    /// only when needed: the fused CUDA path never waits on the device).
    pub expert_counts: Tensor,
    /// The expert-sorted token lists (the routing read back once), for losses that need the
    /// assignment (ProMoE's routing contrastive loss); None on the fused path.
    pub dispatch: Option<ExpertDispatch>,
}

/// One MoE layer call on x (N, T, D): `router` routes the flattened tokens (`labels` (N,) for
/// conditional routers), `experts[id]` run on each token's picks and are summed with the router
/// weights, and `shared` (if any) is added for every token. The expert-sorted dispatch is read
/// back to the host (the routing losses use it); on CUDA the experts then run on the fused
/// kernels ([`fused_routed`]; `stacked`: the experts' weights stacked once, when they are
/// frozen), elsewhere on the candle dispatch.
pub fn routed_forward<R: Router, M: StackedExperts>(
    router: &R,
    experts: &[M],
    stacked: Option<&ExpertStacks>,
    shared: Option<&M>,
    x: &Tensor,
    labels: Option<&Tensor>,
) -> Result<MoeOutput> {
    let (n, t, d) = x.dims3()?;
    let flat = x.reshape((n * t, d))?;
    let routing = router.route(&flat, labels)?;
    let dispatch = ExpertDispatch::new(&routing.experts, router.num_experts())?;
    let routed = match flat.device().is_cuda() {
        true => fused_routed(&flat, &routing, experts, stacked)?.0,
        false => dispatch.run(&flat, &routing.weights, experts)?,
    }
    .reshape((n, t, d))?;
    let (out, shared) = add_shared(&routed, shared, x)?;
    let counts: Vec<u32> = dispatch.counts().into_iter().map(|c| c as u32).collect();
    let expert_counts = Tensor::from_vec(counts, router.num_experts(), x.device())?;
    Ok(MoeOutput { out, routed: Some(routed), shared, routing, expert_counts, dispatch: Some(dispatch) })
}

/// `routed + shared(x)` and the shared expert's output (the routed sum alone without one).
fn add_shared<M: Module>(routed: &Tensor, shared: Option<&M>, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    let shared = shared.map(|s| s.forward(x)).transpose()?;
    let out = match &shared {
        Some(s) => (routed + s)?,
        None => routed.clone(),
    };
    Ok((out, shared))
}

/// The routed experts of `routing` on the fused kernels, trainable: the expert sort of its
/// picks (on the device) and [`kernels::routed_experts`] over the stacked expert weights, whose
/// backward runs on the kernels too. flat (S, D) → the weighted sum (S, D) and the sort.
fn fused_routed<M: StackedExperts>(flat: &Tensor, routing: &Routing, experts: &[M], stacked: Option<&ExpertStacks>) -> Result<(Tensor, kernels::Permutation)> {
    let perm = kernels::permute_by_expert(&routing.experts.to_dtype(DType::U32)?, experts.len())?;
    let routed = match stacked {
        Some(s) => kernels::routed_experts(flat, &routing.weights, s, &perm)?,
        None => kernels::routed_experts(flat, &routing.weights, &M::stack(experts)?, &perm)?,
    };
    Ok((routed, perm))
}

impl SharedExpertMoe {
    pub fn new(cfg: &DitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        // Official state-dict order: experts, gate, shared_experts.
        let mut experts = (0..cfg.num_experts)
            .map(|i| SwigluExpert::new(d, cfg.mlp_ratio * d, vb.pp(format!("experts.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let gate = TopKRouter::new(d, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob, vb.pp("gate"))?;
        let shared = match cfg.n_shared_experts {
            0 => None,
            n => Some(SwigluExpert::new(d, n * d, vb.pp("shared_experts"))?),
        };
        let fused = if FusedSwiglu::serves(&experts) {
            let (fused, views) = FusedSwiglu::stack(&experts, shared.as_ref())?;
            experts = views;
            Some(fused)
        } else {
            None
        };
        Ok(Self { gate, experts, shared, fused, alpha: cfg.aux_loss_alpha, seq_aux: cfg.seq_aux })
    }

    /// Whether this layer runs the fused GPU kernels (CUDA, frozen weights).
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    pub fn router(&self) -> &TopKRouter {
        &self.gate
    }
    pub fn experts(&self) -> &[SwigluExpert] {
        &self.experts
    }
    pub fn shared_expert(&self) -> Option<&SwigluExpert> {
        self.shared.as_ref()
    }

    /// x: (N, T, D).
    /// On CUDA this runs the fused kernels: with frozen weights (inference) the whole layer
    /// ([`FusedSwiglu`]), with trainable ones the routed experts as one differentiable op
    /// whose backward runs on the kernels too. On the CPU, the candle dispatch.
    pub fn forward(&self, x: &Tensor) -> Result<MoeOutput> {
        match &self.fused {
            Some(f) => f.forward(&self.gate, x),
            None if x.device().is_cuda() => self.trainable_fused_forward(x),
            None => routed_forward(&self.gate, &self.experts, None, self.shared.as_ref(), x, None),
        }
    }

    /// The router as in the candle path (its gate weights carry the gradient to the router and
    /// the balance loss) and [`fused_routed`] experts, without [`routed_forward`]'s host-side
    /// dispatch (DiT-MoE's losses need none): no host read-back in the forward; the backward
    /// reads the per-expert offsets once (weight gradients).
    fn trainable_fused_forward(&self, x: &Tensor) -> Result<MoeOutput> {
        let (n, t, d) = x.dims3()?;
        let flat = x.reshape((n * t, d))?;
        let routing = self.gate.forward(&flat)?;
        let (routed, perm) = fused_routed(&flat, &routing, &self.experts, None)?;
        let routed = routed.reshape((n, t, d))?;
        let (out, shared) = add_shared(&routed, self.shared.as_ref(), x)?;
        let e = self.experts.len();
        let expert_counts = (perm.offsets.narrow(0, 1, e)? - perm.offsets.narrow(0, 0, e)?)?;
        Ok(MoeOutput { out, routed: Some(routed), shared, routing, expert_counts, dispatch: None })
    }

    /// The balance loss of one call's routing (training mode), with this layer's alpha/seq_aux.
    pub fn balance_loss(&self, routing: &Routing, n_images: usize) -> Result<Tensor> {
        balance_loss(routing, n_images, self.alpha, self.seq_aux)
    }
}
