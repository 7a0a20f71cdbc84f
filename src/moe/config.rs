//! `MoeConfig`: everything that defines one MoE layer, independent of the model around it.
//! A model's own config builds one per MoE layer (`crate::DitConfig::moe_config`).
use super::{RoutingContrastive, WeightMode};
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

/// The experts' MLP form (routed and shared experts alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertForm {
    /// `down(silu(gate x) * up x)`, no biases (DiT-MoE's `MoeMLP`, LLaMA-style experts).
    Swiglu,
    /// `down(gelu_tanh(up x + b_up)) + b_down` (ProMoE's `MoeMLP`, a timm `Mlp`).
    GeluBias,
    /// `down(gelu_erf(up x + b_up)) + b_down`, the exact GELU (Megatron's `ParallelMLP`, the
    /// experts of DeepSpeed-MoE).
    GeluErfBias,
}

impl ExpertForm {
    /// The GELU of a GELU form (None for SwiGLU).
    pub fn gelu(self) -> Option<crate::moe::kernels::expert_act::GeluKind> {
        use crate::moe::kernels::expert_act::GeluKind;
        match self {
            Self::Swiglu => None,
            Self::GeluBias => Some(GeluKind::Tanh),
            Self::GeluErfBias => Some(GeluKind::Erf),
        }
    }
}

/// How tokens choose experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RouterConfig {
    /// A linear gate (no bias), softmax over all routed experts, top-k of the scores
    /// (DiT-MoE's `MoEGate`); gate weights the chosen scores, renormalised to sum to one when
    /// `norm_topk_prob`.
    TopK {
        #[serde(default)]
        norm_topk_prob: bool,
    },
    /// ProMoE's prototypical router: cosine similarity to learnable prototypes, top-k of
    /// `weight_mode(cos)`; with `unconditional_expert`, tokens the caller marks unconditional
    /// go to one extra expert (id `num_experts`). Training adds the routing contrastive loss.
    Prototypical {
        #[serde(default)]
        weight_mode: WeightMode,
        #[serde(default)]
        unconditional_expert: bool,
        contrastive: RoutingContrastive,
    },
}

/// How the balance loss groups the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceForm {
    /// One group: every token of the call (DiT-MoE's default).
    #[default]
    Batch,
    /// Per sequence, then averaged (DiT-MoE's `seq_aux`); sequences are the caller's.
    PerSequence,
    /// DeepSpeed-MoE's `l_aux` (`sharded_moe.py`, `top1gating`/`top2gating`): one group, and
    /// the fractions `f_e` count first choices only, before any capacity drop:
    /// `E · sum_e mean_s(p_{s,e}) · mean_s(first_s == e)` (top-2 writes it
    /// `mean(me · ce) · E²`, the same number).
    FirstChoice,
}

/// The expert-level balance loss `coefficient * sum_e P_e f_e` (see [`super::balance_loss`]).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceLossConfig {
    /// 0 = no balance loss.
    pub coefficient: f64,
    #[serde(default)]
    pub form: BalanceForm,
}

/// What happens to tokens beyond an expert's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CapacityPolicy {
    /// Every token reaches every expert it picks (DiT-MoE, ProMoE, MegaBlocks, the HF MoE LMs).
    #[default]
    Dropless,
    /// DeepSpeed-MoE's capacity (`sharded_moe.py`, top-1 and top-2): each expert takes at most
    /// `max(ceil(S / E · factor · k), min_capacity)` slots of a call's S tokens; slots are
    /// filled choice by choice (every first choice before any second), in token order within
    /// a choice, and a slot past the capacity is dropped (its gate weight becomes 0, the
    /// remaining weights are renormalised when the router renormalises). With `drop_tokens`
    /// false nothing is dropped (DeepSpeed's capacity = the largest expert count).
    Capacity {
        /// The training capacity factor.
        capacity_factor: f64,
        /// The evaluation capacity factor (DeepSpeed's `eval_capacity_factor`).
        eval_capacity_factor: f64,
        min_capacity: usize,
        drop_tokens: bool,
    },
}

impl CapacityPolicy {
    /// Slots each expert takes for `tokens` tokens routed to `experts` experts `top_k` times;
    /// None when nothing is dropped.
    pub fn capacity(&self, tokens: usize, experts: usize, top_k: usize, train: bool) -> Option<usize> {
        match *self {
            Self::Capacity { capacity_factor, eval_capacity_factor, min_capacity, drop_tokens: true } => {
                let factor = if train { capacity_factor } else { eval_capacity_factor };
                // `_capacity`: ceil(num_tokens / num_experts * capacity_factor), in f64 as torch
                // computes it in double on the host
                let c = (tokens as f64 / experts as f64 * (factor * top_k as f64)).ceil() as usize;
                Some(c.max(min_capacity))
            }
            _ => None,
        }
    }
}

/// The parameter names of a layer under its own prefix, so that every checkpoint layout loads
/// by its own names. The prototypical router's `cluster_centers` sits at the layer's root, as
/// in ProMoE's state dict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParamNames {
    /// The top-k router's gate (`<router>.weight`).
    pub router: String,
    /// The routed experts (`<experts>.<e>.<proj>`).
    pub experts: String,
    /// The shared expert (`<shared_expert>.<proj>`).
    pub shared_expert: String,
    /// The shared expert's sigmoid gate (`<shared_expert_gate>.weight`, `[1, d]`).
    pub shared_expert_gate: String,
    /// The projections inside an expert: SwiGLU's gate, up and down (Mixtral: `w1`, `w3`,
    /// `w2`); the GELU forms' up and down (ProMoE: `up_proj`, `down_proj`; Megatron:
    /// `dense_h_to_4h`, `dense_4h_to_h`).
    pub gate_proj: String,
    pub up_proj: String,
    pub down_proj: String,
    /// PR-MoE's residual dense MLP and its mixing coefficient (`<residual_coefficient>.weight`,
    /// `.bias`), DeepSpeed's `mlp` and `coefficient`.
    pub residual_mlp: String,
    pub residual_coefficient: String,
}

impl Default for ParamNames {
    /// DiT-MoE's `SparseMoeBlock` names (and DeepSpeed's residual names).
    fn default() -> Self {
        Self {
            router: "gate".into(),
            experts: "experts".into(),
            shared_expert: "shared_experts".into(),
            shared_expert_gate: "shared_expert_gate".into(),
            gate_proj: "gate_proj".into(),
            up_proj: "up_proj".into(),
            down_proj: "down_proj".into(),
            residual_mlp: "mlp".into(),
            residual_coefficient: "coefficient".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Token width `d`.
    pub hidden_size: usize,
    /// Routed experts `E` (an unconditional expert, if any, comes on top).
    pub num_experts: usize,
    /// Experts per token `k`.
    pub top_k: usize,
    /// The routed experts' intermediate width.
    pub expert_intermediate_size: usize,
    pub expert_form: ExpertForm,
    /// The always-on shared expert's intermediate width (same form as the routed ones);
    /// 0 = no shared expert.
    #[serde(default)]
    pub shared_expert_intermediate_size: usize,
    /// Scale the shared expert's output per token by `sigmoid(x · w_g)` (Qwen2-MoE's
    /// `shared_expert_gate`).
    #[serde(default)]
    pub shared_expert_gate: bool,
    /// PR-MoE's residual MoE (Rajbhandari et al. 2022, sec. 4.1; DeepSpeed `MoE(use_residual)`):
    /// a dense MLP of this intermediate width, in the experts' form, beside the MoE, mixed per
    /// token as `moe(x) c_0 + mlp(x) c_1`, `c = softmax(Linear(d, 2)(x))`; 0 = none.
    #[serde(default)]
    pub residual_intermediate_size: usize,
    pub router: RouterConfig,
    #[serde(default)]
    pub balance_loss: BalanceLossConfig,
    #[serde(default)]
    pub capacity: CapacityPolicy,
    #[serde(default)]
    pub names: ParamNames,
}

impl MoeConfig {
    /// Expert ids the routing can produce: the routed experts plus the unconditional one.
    pub fn total_experts(&self) -> usize {
        self.num_experts + usize::from(self.unconditional_expert())
    }

    pub fn unconditional_expert(&self) -> bool {
        matches!(self.router, RouterConfig::Prototypical { unconditional_expert: true, .. })
    }

    /// Sizes the kernels and the routing support (the gating kernel takes up to 256 experts,
    /// the counting sort 1024).
    pub fn validate(&self) -> Result<()> {
        if self.hidden_size == 0 || self.expert_intermediate_size == 0 {
            bail!("moe: hidden_size and expert_intermediate_size must be positive")
        }
        if self.num_experts == 0 || self.total_experts() > 256 {
            bail!("moe: num_experts must be in 1..=256 (with an unconditional expert, 255), got {}", self.num_experts)
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            bail!("moe: top_k {} must be in 1..={}", self.top_k, self.num_experts)
        }
        if let CapacityPolicy::Capacity { capacity_factor, eval_capacity_factor, .. } = self.capacity {
            if self.top_k > 2 || !matches!(self.router, RouterConfig::TopK { .. }) {
                bail!("moe: capacity (DeepSpeed's top-1/top-2 gating) takes a top_k router with top_k 1 or 2")
            }
            if !(capacity_factor.is_finite() && capacity_factor > 0.0 && eval_capacity_factor.is_finite() && eval_capacity_factor > 0.0) {
                bail!("moe: capacity factors must be finite and > 0, got {capacity_factor} and {eval_capacity_factor}")
            }
        }
        if self.shared_expert_gate && self.shared_expert_intermediate_size == 0 {
            bail!("moe: shared_expert_gate needs a shared expert (shared_expert_intermediate_size > 0)")
        }
        if !self.balance_loss.coefficient.is_finite() || self.balance_loss.coefficient < 0.0 {
            bail!("moe: balance_loss.coefficient must be finite and >= 0, got {}", self.balance_loss.coefficient)
        }
        Ok(())
    }
}
