//! `MoeLayer`: one mixture-of-experts layer for any model. Tokens `[S, d]` (and, for routers
//! that route by condition, a per-token mask) go in; the output `[S, d]`, the routing record
//! and, in training, the auxiliary losses come out.
//!
//! The layer runs one of two forwards, chosen by its execution plan:
//! - the CPU reference ([`MoeLayer::forward`] on a CPU plan): the router's candle ops, a host
//!   counting sort ([`ExpertDispatch`]) and each expert once on its rows, the structure of the
//!   official `moe_infer`; every step is differentiable;
//! - the kernel pipeline (the plan's `moe_kernels`, on by default on CUDA; on the CPU it runs
//!   the kernels' CPU references): the kernels of [`crate::moe::kernels`]. With frozen weights the top-k router
//!   runs the fused gating + sort and SwiGLU experts the grouped GEMMs with the gather fused in,
//!   the shared expert on a second stream and added inside the combine, with no host read (so a
//!   forward can be captured as a CUDA graph); with trainable weights (or other routers and
//!   expert forms) the routed experts run as one differentiable op
//!   ([`crate::moe::kernels::routed_experts`]) whose backward runs on the kernels too;
//! - expert parallelism (the plan's `expert_parallel`, a group of more than one rank): the
//!   layer builds only its rank's contiguous block of routed experts, under their global names
//!   (`<experts>.<global id>.<proj>`, so a checkpoint loads the same way into every layout),
//!   routes its own tokens with the replicated router and runs the routed experts through
//!   [`crate::dist::ExpertParallel::routed_experts`] (all-to-all out, the grouped experts, the
//!   all-to-all back, the combine here); the shared expert and every other weight are
//!   replicated. The balance loss (and ProMoE's contrastive loss) covers the rank's own
//!   tokens, as DeepSpeed-MoE's and Megatron-Core's per-rank auxiliary losses do: data
//!   parallelism averages it over the ranks with the rest of the loss. A capacity
//!   ([`CapacityPolicy::Capacity`]) counts the rank's own tokens too, as DeepSpeed's gating does.
use super::config::{CapacityPolicy, MoeConfig, RouterConfig};
use super::experts::{stack_frozen, Experts, GeluMlp, SharedExpert, SwigluExpert};
use super::{balance_loss, ExpertDispatch, PrototypicalRouter, Routing, TopKRouter, WeightMode};
use crate::dist::ExpertParallel;
use crate::moe::kernels::{self, ExpertStacks, GemmConfig, SwigluWeights};
use crate::nn::Linear;
use crate::plan::ExecutionPlan;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::ops::Range;

/// The layer's router.
#[derive(Debug, Clone)]
pub enum MoeRouter {
    TopK(TopKRouter),
    Prototypical(PrototypicalRouter),
}

impl MoeRouter {
    /// Routes the tokens x `[S, d]`; `unconditional` `[S]` marks the tokens that go to the
    /// prototypical router's unconditional expert.
    pub fn route(&self, x: &Tensor, unconditional: Option<&Tensor>) -> Result<Routing> {
        match self {
            Self::TopK(r) => r.forward(x),
            Self::Prototypical(r) => r.forward(x, unconditional),
        }
    }
}

/// One call's input.
#[derive(Debug, Clone, Copy)]
pub struct MoeInput<'a> {
    /// `[S, d]`, the tokens of `S / seq_len` sequences, sequence-major.
    pub tokens: &'a Tensor,
    /// Tokens per sequence, for the per-sequence balance loss.
    pub seq_len: usize,
    /// `[S]` u8, 1 for a token the router must treat as unconditional (ProMoE: a token of a
    /// sample whose label was dropped). Required by a router with an unconditional expert.
    pub unconditional: Option<&'a Tensor>,
    /// Compute the auxiliary losses (training mode).
    pub train: bool,
}

/// Everything one call produces; the caller decides what to keep.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// routed + shared, `[S, d]`: f32 (or the tokens' dtype) except on the fused inference
    /// path, whose combine writes the weights' dtype.
    pub out: Tensor,
    /// The weighted routed sum alone, `[S, d]`; None on the fused inference path, whose
    /// combine adds the shared expert in the same pass.
    pub routed: Option<Tensor>,
    /// The shared expert's output, `[S, d]`, when there is one.
    pub shared: Option<Tensor>,
    pub routing: Routing,
    /// Slots routed to each expert, `[E]` u32 on the layer's device (the unconditional expert
    /// last). Read it back only when needed: the CUDA path never waits on the device.
    pub expert_counts: Tensor,
    /// The balance loss, in training mode when its coefficient is > 0.
    pub aux_loss: Option<Tensor>,
    /// The prototypical router's routing contrastive loss (lambda included), in training mode.
    pub contrastive_loss: Option<Tensor>,
    /// Slots dropped by the capacity ([`CapacityPolicy::Capacity`]); None when dropless.
    pub dropped_slots: Option<usize>,
}

/// PR-MoE's residual form: a dense MLP beside the MoE and the per-token mixing coefficient
/// (DeepSpeed `MoE.forward` with `use_residual`: `output * coef[..., 0:1] + output_mlp *
/// coef[..., 1:]`, `coef = softmax(coefficient(x))`).
#[derive(Debug, Clone)]
pub struct ResidualMlp {
    mlp: SharedExpert,
    coefficient: Linear,
}

impl ResidualMlp {
    fn mix(&self, x: &Tensor, moe_out: &Tensor) -> Result<Tensor> {
        let c = crate::nn::softmax_last_dim(&self.coefficient.forward(x)?)?;
        let mlp = self.mlp.forward(x)?;
        let moe_out = moe_out.to_dtype(mlp.dtype())?;
        moe_out.broadcast_mul(&c.narrow(1, 0, 1)?)? + mlp.broadcast_mul(&c.narrow(1, 1, 1)?)?
    }
}

#[derive(Debug, Clone)]
pub struct MoeLayer {
    cfg: MoeConfig,
    /// The layer's parameter prefix, which names it in the static expert-parallel dispatch's
    /// overflow report.
    name: String,
    router: MoeRouter,
    /// The routed experts (then the unconditional one), as modules: the CPU reference runs
    /// them; on the fused path they are views into `stacks`. Under expert parallelism, this
    /// rank's block only (`local_experts`).
    experts: Experts,
    /// The global ids of `experts`: all of them, or this rank's block.
    local_experts: Range<usize>,
    /// The expert-parallel group, when it has more than one rank.
    parallel: Option<ExpertParallel>,
    /// Frozen experts on CUDA, stacked once for the grouped kernels.
    stacks: Option<ExpertStacks>,
    shared: Option<SharedExpert>,
    /// Qwen2-MoE's shared-expert gate, `Linear(d, 1)` without bias.
    shared_gate: Option<Linear>,
    residual: Option<ResidualMlp>,
    /// Run the kernel pipeline (else the reference dispatch).
    kernels: bool,
    frozen: bool,
    gemm: GemmConfig,
    /// The dtype the layer takes its tokens in ([`Self::input_dtype`]).
    input_dtype: DType,
}

impl MoeLayer {
    pub fn new(cfg: &MoeConfig, plan: &ExecutionPlan, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, names) = (cfg.hidden_size, &cfg.names);
        let experts_vb = vb.pp(&names.experts);
        let parallel = plan.expert_parallel.clone().filter(|ep| ep.world_size() > 1);
        let local_experts = match &parallel {
            Some(ep) => ep.local_experts(cfg.total_experts())?,
            None => 0..cfg.total_experts(),
        };
        let build_experts = || match &parallel {
            Some(_) => expert_block(cfg, local_experts.clone(), experts_vb.clone()),
            None => Experts::new(cfg.expert_form, d, cfg.expert_intermediate_size, cfg.total_experts(), names, experts_vb.clone()),
        };
        // Parameters are created in each family's state-dict order (DiT-MoE: experts, gate,
        // shared experts; ProMoE: prototypes, experts, shared expert).
        let (router, mut experts) = match &cfg.router {
            RouterConfig::TopK { norm_topk_prob } => {
                let experts = build_experts()?;
                (MoeRouter::TopK(TopKRouter::new(d, cfg.num_experts, cfg.top_k, *norm_topk_prob, vb.pp(&names.router))?), experts)
            }
            RouterConfig::Prototypical { weight_mode, unconditional_expert, contrastive } => {
                let router = PrototypicalRouter::new(d, cfg.num_experts, cfg.top_k, *weight_mode, *unconditional_expert, *contrastive, vb.clone())?;
                (MoeRouter::Prototypical(router), build_experts()?)
            }
        };
        let shared = match cfg.shared_expert_intermediate_size {
            0 => None,
            width => Some(SharedExpert::new(cfg.expert_form, d, width, names, vb.pp(&names.shared_expert))?),
        };
        let shared_gate = match cfg.shared_expert_gate {
            true => Some(crate::nn::linear_no_bias(d, 1, vb.pp(&names.shared_expert_gate))?),
            false => None,
        };
        let residual = match cfg.residual_intermediate_size {
            0 => None,
            width => Some(ResidualMlp {
                mlp: SharedExpert::new(cfg.expert_form, d, width, names, vb.pp(&names.residual_mlp))?,
                coefficient: crate::nn::linear(d, 2, vb.pp(&names.residual_coefficient))?,
            }),
        };
        let frozen = !plan.trainable();
        let stacks = match plan.moe_kernels && frozen {
            true => {
                let (stacks, views) = stack_frozen(&experts)?;
                experts = views;
                Some(stacks)
            }
            false => None,
        };
        let mut layer = Self { cfg: cfg.clone(), name: vb.prefix(), router, experts, local_experts, parallel, stacks, shared, shared_gate, residual, kernels: plan.moe_kernels, frozen, gemm: plan.gemm, input_dtype: DType::F32 };
        // The plan's matmul dtype where the layer's path casts its tokens to it anyway: the fused
        // inference path (its grouped GEMMs run in it) and single-device training with the
        // top-k router (autocast keeps the experts' activations in bf16). ProMoE's routers
        // compare f32 token features with their prototypes, and the other inference paths
        // stay the f32 ones checked against the references.
        let takes_matmul_dtype = layer.is_fused() || (plan.trainable() && layer.parallel.is_none() && matches!(layer.router, MoeRouter::TopK(_)));
        if takes_matmul_dtype {
            layer.input_dtype = plan.matmul_input_dtype();
        }
        Ok(layer)
    }

    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }
    pub fn router(&self) -> &MoeRouter {
        &self.router
    }
    /// The routed experts, then the unconditional one; under expert parallelism this rank's
    /// block, whose global ids are [`Self::local_experts`].
    pub fn experts(&self) -> &Experts {
        &self.experts
    }
    /// The global ids of [`Self::experts`]: every expert, or this rank's block under expert
    /// parallelism.
    pub fn local_experts(&self) -> Range<usize> {
        self.local_experts.clone()
    }

    /// Under expert parallelism, the name prefix of this layer's routed experts
    /// (`<layer prefix>.<experts>.`, followed by the global id) and this rank's ids; None when
    /// the rank holds every expert. What checkpoints and gradient reductions key split experts by.
    pub fn split_experts(&self) -> Option<(String, Range<usize>)> {
        (self.local_experts != (0..self.cfg.total_experts())).then(|| (format!("{}.{}.", self.name, self.cfg.names.experts), self.local_experts()))
    }
    pub fn shared_expert(&self) -> Option<&SharedExpert> {
        self.shared.as_ref()
    }

    /// Whether a forward runs the fused inference path end to end: no host read, so on CUDA
    /// the caller may capture it as a CUDA graph, and its input is best given in the weights'
    /// dtype (the grouped GEMMs run in it).
    pub fn is_fused(&self) -> bool {
        !self.drops_tokens() && self.parallel.is_none() && self.kernels && self.frozen && matches!(self.router, MoeRouter::TopK(_)) && matches!(self.stacks, Some(ExpertStacks::Swiglu(_)))
    }

    /// The dtype in which the layer is best given its tokens: the plan's matmul dtype where
    /// every path inside casts them to it (see [`ExecutionPlan::matmul_input_dtype`]), else
    /// f32. Its output comes back in the tokens' dtype.
    pub fn input_dtype(&self) -> DType {
        self.input_dtype
    }

    /// Whether the capacity may drop slots (the drop decision reads the routing on the host).
    fn drops_tokens(&self) -> bool {
        matches!(self.cfg.capacity, CapacityPolicy::Capacity { drop_tokens: true, .. })
    }

    /// Whether a call needs [`MoeInput::unconditional`].
    pub fn needs_unconditional_mask(&self) -> bool {
        self.cfg.unconditional_expert()
    }

    pub fn forward(&self, input: &MoeInput) -> Result<MoeOutput> {
        let (s, _) = input.tokens.dims2()?;
        if input.seq_len == 0 || s % input.seq_len != 0 {
            candle_core::bail!("moe: {s} tokens do not split into sequences of {}", input.seq_len)
        }
        if self.needs_unconditional_mask() && input.unconditional.is_none() {
            candle_core::bail!("moe: a router with an unconditional expert needs the unconditional-token mask")
        }
        let (mut o, dispatch) = match (&self.parallel, self.kernels) {
            (Some(ep), _) => (self.forward_expert_parallel(ep, input)?, None),
            (None, true) => (self.forward_kernels(input)?, None),
            (None, false) => {
                let (o, dispatch) = self.forward_reference(input)?;
                (o, Some(dispatch))
            }
        };
        if input.train {
            o.aux_loss = self.balance_loss(&o.routing, input)?;
            o.contrastive_loss = self.contrastive_loss(input, &o.routing, dispatch)?;
        }
        if let Some(r) = &self.residual {
            o.out = r.mix(input.tokens, &o.out)?;
        }
        Ok(o)
    }

    /// The CPU reference: router, host counting sort, each expert once on its rows. The sort is
    /// handed back for the losses that read the assignment.
    fn forward_reference(&self, input: &MoeInput) -> Result<(MoeOutput, ExpertDispatch)> {
        let x = input.tokens;
        let (routing, dropped) = self.route(input)?;
        let dispatch = ExpertDispatch::new(&routing.experts, self.cfg.total_experts())?;
        let routed = self.experts.run(&dispatch, x, &routing.weights)?;
        let counts: Vec<u32> = dispatch.counts().into_iter().map(|c| c as u32).collect();
        let expert_counts = Tensor::from_vec(counts, self.cfg.total_experts(), x.device())?;
        Ok((self.finish(x, routed, routing, expert_counts, dropped)?, dispatch))
    }

    /// The router's decision, then the capacity's drops (see [`Self::apply_capacity`]).
    fn route(&self, input: &MoeInput) -> Result<(Routing, Option<usize>)> {
        let routing = self.router.route(input.tokens, input.unconditional)?;
        self.apply_capacity(routing, input.train)
    }

    /// DeepSpeed's capacity (`top1gating`/`top2gating` with `drop_tokens`, see
    /// [`super::capacity`]): a dropped slot keeps its expert id (so the expert counts are
    /// DeepSpeed's `exp_counts`, before dropping) and gets gate weight 0, and the router
    /// renormalises what is kept (top-2's `gates1_s / denom_s`). One host read of the ids.
    fn apply_capacity(&self, routing: Routing, train: bool) -> Result<(Routing, Option<usize>)> {
        let (s, k) = routing.experts.dims2()?;
        let Some(capacity) = self.cfg.capacity.capacity(s, self.cfg.num_experts, k, train) else { return Ok((routing, None)) };
        let ids: Vec<u32> = routing.experts.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        let keep: Vec<f32> = super::capacity::kept_slots(&ids, k, self.cfg.total_experts(), capacity).into_iter().map(f32::from).collect();
        let dropped = keep.iter().filter(|&&m| m == 0.0).count();
        if dropped == 0 {
            return Ok((routing, Some(0)));
        }
        let keep = Tensor::from_vec(keep, (s, k), routing.weights.device())?.to_dtype(routing.weights.dtype())?;
        let kept = (&routing.weights * keep)?;
        let weights = match &self.router {
            MoeRouter::TopK(r) => r.gate_weights(kept)?,
            MoeRouter::Prototypical(_) => kept,
        };
        Ok((Routing { weights, ..routing }, Some(dropped)))
    }

    /// Expert parallelism: the replicated router on this rank's tokens, the routed experts
    /// across the group ([`ExpertParallel::routed_experts`], this rank's block on the
    /// differentiable grouped op), the replicated shared expert here.
    fn forward_expert_parallel(&self, ep: &ExpertParallel, input: &MoeInput) -> Result<MoeOutput> {
        let x = input.tokens;
        let stacks = self.expert_stacks()?;
        let stacks = stacks.as_ref();
        let (routing, dropped) = self.route(input)?;
        let (routed, expert_counts) = ep.routed_experts(&self.name, &x.to_dtype(stacks.dtype())?, &routing.experts, &routing.weights, stacks, self.cfg.total_experts(), &self.gemm)?;
        self.finish(x, routed.to_dtype(x.dtype())?, routing, expert_counts, dropped)
    }

    /// The routed experts stacked for the grouped kernels: the stacks made once for frozen
    /// weights, else a differentiable copy made for this call.
    fn expert_stacks(&self) -> Result<std::borrow::Cow<'_, ExpertStacks>> {
        Ok(match &self.stacks {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(self.experts.stack()?),
        })
    }

    /// The kernel pipeline (the CUDA forward; on the CPU, the kernels' references). A frozen top-k
    /// SwiGLU layer ([`Self::is_fused`]) runs whole on the fused kernels with no host read; any
    /// other runs the router's candle ops (its gradient reaches the router), the expert sort on
    /// the device and the routed experts as one differentiable op, whose backward reads the
    /// per-expert offsets once.
    fn forward_kernels(&self, input: &MoeInput) -> Result<MoeOutput> {
        let x = input.tokens;
        let stacks = self.expert_stacks()?;
        let stacks = stacks.as_ref();
        // The grouped GEMMs run in the weights' dtype (bf16 on tensor cores), like every other
        // matmul of the model (`crate::nn::Linear`).
        let tokens = x.to_dtype(stacks.dtype())?;
        if let (true, MoeRouter::TopK(router), ExpertStacks::Swiglu(w)) = (self.is_fused(), &self.router, stacks) {
            // The shared expert needs no routing: it runs on a second stream while the router,
            // gating and sort (small, latency-bound launches) run on the main one.
            let shared = self.shared_swiglu_weights().map(|sw| kernels::swiglu_mlp_start(&tokens, &sw, &self.gemm)).transpose()?;
            let logits = router.logits(&tokens)?;
            // The gating kernel reads bf16 or f32 logits and does its softmax in f32 either way.
            let logits = match logits.dtype() {
                DType::BF16 | DType::F32 => logits,
                _ => logits.to_dtype(DType::F32)?,
            };
            let (mut g, perm) = kernels::fused_gating_permute(&logits, router.top_k())?;
            // the kernel keeps the chosen scores; `norm_topk_prob` renormalises them on the device
            g.weights = router.gate_weights(g.weights)?;
            let h = kernels::grouped_gate_up_gather(&tokens, &perm, &w.gate, &w.up, &self.gemm)?;
            let y = kernels::grouped_matmul(&h, &perm.offsets, &w.down, &self.gemm)?;
            let shared = shared.map(|p| p.join()).transpose()?.map(|s| self.gate_shared(&tokens, s)).transpose()?;
            // the combine adds the shared expert's output while it sums the routed rows, in f32,
            // rounding once
            let out = kernels::combine(&y, &perm, &g.weights, shared.as_ref())?;
            let routing = Routing { experts: g.ids, weights: g.weights, scores: g.scores, logits };
            return Ok(MoeOutput { out, routed: None, shared, routing, expert_counts: g.expert_counts, aux_loss: None, contrastive_loss: None, dropped_slots: None });
        }
        let (routing, dropped) = self.route(input)?;
        let e = self.cfg.total_experts();
        let perm = kernels::permute_by_expert(&routing.experts.to_dtype(DType::U32)?, e)?;
        let routed = kernels::routed_experts(&tokens, &routing.weights, stacks, &perm, &self.gemm)?.to_dtype(x.dtype())?;
        let expert_counts = (perm.offsets.narrow(0, 1, e)? - perm.offsets.narrow(0, 0, e)?)?;
        self.finish(x, routed, routing, expert_counts, dropped)
    }

    /// routed + shared.
    fn finish(&self, x: &Tensor, routed: Tensor, routing: Routing, expert_counts: Tensor, dropped_slots: Option<usize>) -> Result<MoeOutput> {
        let shared = self.shared.as_ref().map(|s| self.gate_shared(x, s.forward(x)?)).transpose()?;
        let out = match &shared {
            Some(s) => (&routed + s)?,
            None => routed.clone(),
        };
        Ok(MoeOutput { out, routed: Some(routed), shared, routing, expert_counts, aux_loss: None, contrastive_loss: None, dropped_slots })
    }

    /// The shared expert's output scaled by its gate, `sigmoid(x · w_g) * shared` (Qwen2-MoE's
    /// `F.sigmoid(self.shared_expert_gate(hidden_states)) * shared_expert_output`).
    fn gate_shared(&self, x: &Tensor, shared: Tensor) -> Result<Tensor> {
        match &self.shared_gate {
            Some(g) => shared.broadcast_mul(&candle_nn::ops::sigmoid(&g.forward(x)?)?.to_dtype(shared.dtype())?),
            None => Ok(shared),
        }
    }

    fn shared_swiglu_weights(&self) -> Option<SwigluWeights> {
        match &self.shared {
            Some(SharedExpert::Swiglu(s)) => {
                let [gate, up, down] = s.weights().map(Tensor::clone);
                Some(SwigluWeights { gate, up, down })
            }
            _ => None,
        }
    }

    /// The balance loss of one call (None when its coefficient is 0). Top-k router: over every
    /// token. Prototypical router: over the conditional tokens only, with scores
    /// `softmax(weight_mode(cos))` (`weight_mode(cos)` itself in softmax mode), as ProMoE's
    /// `SparseMoeBlock.forward`. A call without tokens (an expert-parallel rank with none this
    /// step) has nothing to balance: 0, not the mean of nothing.
    fn balance_loss(&self, routing: &Routing, input: &MoeInput) -> Result<Option<Tensor>> {
        let bl = self.cfg.balance_loss;
        if bl.coefficient == 0.0 {
            return Ok(None);
        }
        if routing.scores.dim(0)? == 0 {
            return Ok(Some(Tensor::zeros((), routing.scores.dtype(), routing.scores.device())?));
        }
        let MoeRouter::Prototypical(router) = &self.router else {
            return Ok(Some(balance_loss(routing, input.seq_len, bl.coefficient, bl.form)?));
        };
        let dev = routing.scores.device();
        let cond: Vec<u32> = match input.unconditional.filter(|_| router.has_unconditional_expert()) {
            Some(mask) => mask.to_dtype(DType::U32)?.to_vec1::<u32>()?.iter().enumerate().filter(|(_, &m)| m == 0).map(|(t, _)| t as u32).collect(),
            None => (0..routing.scores.dim(0)? as u32).collect(),
        };
        if cond.is_empty() {
            // No conditional token, nothing to balance (the official code would fail here).
            return Ok(Some(Tensor::zeros((), routing.scores.dtype(), dev)?));
        }
        let n_cond = cond.len();
        let idx = Tensor::from_vec(cond, n_cond, dev)?;
        let mode = router.weight_mode();
        let w = mode.apply(&routing.scores.index_select(&idx, 0)?)?;
        let scores = match mode {
            WeightMode::Softmax => w,
            _ => crate::nn::softmax_last_dim(&w)?,
        };
        let cond_routing = Routing { experts: routing.experts.index_select(&idx, 0)?, weights: routing.weights.index_select(&idx, 0)?, scores, logits: routing.logits.index_select(&idx, 0)? };
        Ok(Some(balance_loss(&cond_routing, input.seq_len, bl.coefficient, bl.form)?))
    }

    /// The prototypical router's routing contrastive loss (None for other routers or lambda 0).
    /// Which prototypes have tokens comes from the reference forward's sort, or on the kernel
    /// pipeline (which keeps the sort on the device) from the routing read back once.
    fn contrastive_loss(&self, input: &MoeInput, routing: &Routing, dispatch: Option<ExpertDispatch>) -> Result<Option<Tensor>> {
        let MoeRouter::Prototypical(router) = &self.router else { return Ok(None) };
        let contrastive = router.contrastive();
        if !contrastive.enabled() {
            return Ok(None);
        }
        let dispatch = match dispatch {
            Some(d) => d,
            None => ExpertDispatch::new(&routing.experts, self.cfg.total_experts())?,
        };
        Ok(Some(contrastive.loss(router.cluster_centers(), input.tokens, &routing.experts, &dispatch)?))
    }
}

/// Experts `ids` of the layer's form, each under its global id (`<experts>.<e>.<proj>`): an
/// expert-parallel rank's block loads from any checkpoint by the single-device names.
fn expert_block(cfg: &MoeConfig, ids: Range<usize>, vb: VarBuilder) -> Result<Experts> {
    let (d, width, names) = (cfg.hidden_size, cfg.expert_intermediate_size, &cfg.names);
    let pp = |e: usize| vb.pp(e.to_string());
    Ok(match cfg.expert_form.gelu() {
        None => Experts::Swiglu(ids.map(|e| SwigluExpert::named(d, width, names, pp(e))).collect::<Result<_>>()?),
        Some(act) => Experts::Gelu(ids.map(|e| GeluMlp::named(d, width, act, &names.up_proj, &names.down_proj, pp(e))).collect::<Result<_>>()?),
    })
}
