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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacityPolicy {
    /// Every token reaches every expert it picks (DiT-MoE, ProMoE, MegaBlocks).
    #[default]
    Dropless,
}

/// The parameter names of a layer under its own prefix, so that every checkpoint layout loads
/// by its own names. The prototypical router's `cluster_centers` sits at the layer's root, as
/// in ProMoE's state dict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamNames {
    /// The top-k router's gate (`<router>.weight`).
    pub router: String,
    /// The routed experts (`<experts>.<e>.<proj>`).
    pub experts: String,
    /// The shared expert (`<shared_expert>.<proj>`).
    pub shared_expert: String,
}

impl Default for ParamNames {
    /// DiT-MoE's `SparseMoeBlock` names.
    fn default() -> Self {
        Self { router: "gate".into(), experts: "experts".into(), shared_expert: "shared_experts".into() }
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
        if !self.balance_loss.coefficient.is_finite() || self.balance_loss.coefficient < 0.0 {
            bail!("moe: balance_loss.coefficient must be finite and >= 0, got {}", self.balance_loss.coefficient)
        }
        Ok(())
    }
}
