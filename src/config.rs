//! `DitConfig`: every constructor argument of the official `models.DiT` plus the MoE attributes
//! the official `SparseMoeBlock`/`MoEGate` hard-code, in the fixtures' `config.json` layout.
//! An optional `promoe` section switches the model to the ProMoE family (`ProMoeConfig`).
use crate::moe::{BalanceForm, BalanceLossConfig, CapacityPolicy, ExpertForm, MoeConfig, ParamNames, RouterConfig, RoutingContrastive, WeightMode};
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn default_n_shared() -> usize {
    2
}
fn default_alpha() -> f64 {
    0.01
}
fn yes() -> bool {
    true
}
fn default_rcl_lam() -> f64 {
    1.0
}
fn default_rcl_tau() -> f64 {
    0.07
}

/// The ProMoE family (github:ali-vilab/ProMoE, `models_ProMoE_TC.py`): prototypical routing
/// with an unconditional expert, GELU experts with bias, MoE in odd blocks only. Field names
/// are the official `MoE_config` keys; the defaults are the released configs
/// (`configs/004_ProMoE_*.yaml`). The keys `DitConfig` already has keep their meaning:
/// `num_experts` = `num_routed_experts`, `num_experts_per_tok` = `top_k`, `seq_aux`; the
/// DiT-MoE-only keys (`n_shared_experts`, `aux_loss_alpha`, `pretraining_tp`, `norm_topk_prob`,
/// which the official ProMoE router ignores) have no effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProMoeConfig {
    /// Width of the routed and unconditional experts (released: D/2 * 4 = 2D).
    pub moe_intermediate_size: usize,
    /// Width of the shared expert (released: 2D).
    pub shared_expert_intermediate_size: usize,
    #[serde(default = "yes")]
    pub use_shared_expert: bool,
    /// Tokens of null-label images go to the extra expert `experts.<E>`.
    #[serde(default = "yes")]
    pub use_uncond_expert: bool,
    #[serde(default)]
    pub router_weight_mode: WeightMode,
    /// Routing contrastive loss weight (0 = off).
    #[serde(default = "default_rcl_lam")]
    pub routing_contrastive_lam: f64,
    /// Assign a token to all its k picks (true) or its first pick only, in that loss.
    #[serde(default = "yes")]
    pub use_top_k_for_routing_contrastive: bool,
    #[serde(default = "default_rcl_tau")]
    pub routing_contrastive_temperature: f64,
    /// The DiT-MoE balance loss on the conditional tokens (released: 0, off).
    #[serde(default)]
    pub load_balance_loss_coef: f64,
    /// MoE only in odd blocks (`i % 2 == 1`), dense GELU `Mlp(D, mlp_ratio D)` in even ones.
    #[serde(default = "yes")]
    pub interleave: bool,
}

impl ProMoeConfig {
    /// The released `MoE_config` for width `hidden` (all four sizes use these settings).
    pub fn released(hidden: usize) -> Self {
        Self {
            moe_intermediate_size: 2 * hidden,
            shared_expert_intermediate_size: 2 * hidden,
            use_shared_expert: true,
            use_uncond_expert: true,
            router_weight_mode: WeightMode::Identity,
            routing_contrastive_lam: default_rcl_lam(),
            use_top_k_for_routing_contrastive: true,
            routing_contrastive_temperature: default_rcl_tau(),
            load_balance_loss_coef: 0.0,
            interleave: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitConfig {
    /// Latent/image side length (the official `input_size`, square inputs).
    pub input_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub hidden_size: usize,
    pub depth: usize,
    pub num_heads: usize,
    /// Routed-expert intermediate size = `mlp_ratio * hidden_size` (official `SparseMoeBlock`).
    pub mlp_ratio: usize,
    pub class_dropout_prob: f64,
    pub num_classes: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Only splits the official expert matmuls into slices (same maths); kept for round trips.
    #[serde(default = "one")]
    pub pretraining_tp: usize,
    pub learn_sigma: bool,
    /// `true`: the `FlashSelfMHAModified` form (XL/G checkpoints), `false`: timm `Attention`.
    #[serde(default)]
    pub use_flash_attn: bool,
    /// Shared-expert width multiplier; 0 = no shared expert (official hard-codes 2).
    #[serde(default = "default_n_shared")]
    pub n_shared_experts: usize,
    #[serde(default = "default_alpha")]
    pub aux_loss_alpha: f64,
    #[serde(default)]
    pub seq_aux: bool,
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// Present: the ProMoE family (prototypical router); absent: DiT-MoE (top-k router).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoe: Option<ProMoeConfig>,
}

fn one() -> usize {
    1
}

impl DitConfig {
    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }
    /// Whether the model works on pixels (1 or 3 channels) rather than VAE latents; the
    /// Gaussian samplers clamp x_0 for pixel models only.
    pub fn is_pixel_space(&self) -> bool {
        matches!(self.in_channels, 1 | 3)
    }
    /// Tokens per image side.
    pub fn grid_size(&self) -> usize {
        self.input_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// The label table has a null row (index `num_classes`) when labels can be dropped,
    /// as official `LabelEmbedder` (`num_classes + use_cfg_embedding`).
    pub fn label_table_rows(&self) -> usize {
        self.num_classes + usize::from(self.class_dropout_prob > 0.0)
    }
    pub fn null_class(&self) -> usize {
        self.num_classes
    }
    /// What a rectified-flow model is fed for the time t in [0, 1]: `t` itself for DiT-MoE
    /// (official `RectifiedFlow`), `t * 1000` for ProMoE (its flow-matching scheduler's
    /// `num_train_timesteps`; shift 1.0 as released, so the grid itself is the same).
    pub fn flow_time_scale(&self) -> f64 {
        if self.promoe.is_some() {
            1000.0
        } else {
            1.0
        }
    }

    /// Number of MoE blocks (ProMoE interleaves them with dense blocks).
    pub fn moe_layers(&self) -> usize {
        (0..self.depth).filter(|&i| self.is_moe_block(i)).count()
    }

    /// Expert ids a routing record can hold: the routed experts, plus ProMoE's unconditional
    /// expert (id `num_experts`).
    pub fn expert_ids(&self) -> usize {
        self.num_experts + usize::from(self.promoe.is_some())
    }

    /// The engine's description of this model's MoE layers (every MoE block has the same).
    /// DiT-MoE: top-k router, SwiGLU experts of width `mlp_ratio * D`, a shared SwiGLU expert of
    /// width `n_shared_experts * D`, the balance loss with `aux_loss_alpha` (per image with
    /// `seq_aux`). ProMoE: the prototypical router with its unconditional expert and contrastive
    /// loss, GELU experts with biases, its balance loss coefficient (0 as released).
    pub fn moe_config(&self) -> MoeConfig {
        let form = |seq_aux: bool| if seq_aux { BalanceForm::PerSequence } else { BalanceForm::Batch };
        let d = self.hidden_size;
        match &self.promoe {
            None => MoeConfig {
                hidden_size: d,
                num_experts: self.num_experts,
                top_k: self.num_experts_per_tok,
                expert_intermediate_size: self.mlp_ratio * d,
                expert_form: ExpertForm::Swiglu,
                shared_expert_intermediate_size: self.n_shared_experts * d,
                shared_expert_gate: false,
                residual_intermediate_size: 0,
                router: RouterConfig::TopK { norm_topk_prob: self.norm_topk_prob },
                balance_loss: BalanceLossConfig { coefficient: self.aux_loss_alpha, form: form(self.seq_aux) },
                capacity: CapacityPolicy::Dropless,
                names: ParamNames::default(),
            },
            Some(p) => MoeConfig {
                hidden_size: d,
                num_experts: self.num_experts,
                top_k: self.num_experts_per_tok,
                expert_intermediate_size: p.moe_intermediate_size,
                expert_form: ExpertForm::GeluBias,
                shared_expert_intermediate_size: if p.use_shared_expert { p.shared_expert_intermediate_size } else { 0 },
                shared_expert_gate: false,
                residual_intermediate_size: 0,
                router: RouterConfig::Prototypical {
                    weight_mode: p.router_weight_mode,
                    unconditional_expert: p.use_uncond_expert,
                    contrastive: RoutingContrastive {
                        lambda: p.routing_contrastive_lam,
                        temperature: p.routing_contrastive_temperature,
                        top_k_assignment: p.use_top_k_for_routing_contrastive,
                    },
                },
                balance_loss: BalanceLossConfig { coefficient: p.load_balance_loss_coef, form: form(self.seq_aux) },
                capacity: CapacityPolicy::Dropless,
                names: ParamNames { shared_expert: "shared_expert".into(), ..ParamNames::default() },
            },
        }
    }

    /// Whether block `i` has an MoE layer (official ProMoE `use_moe_flag`: odd blocks when
    /// `interleave`); the others have a dense MLP. Every DiT-MoE block is MoE.
    pub fn is_moe_block(&self, i: usize) -> bool {
        match &self.promoe {
            Some(p) if p.interleave => i % 2 == 1,
            _ => true,
        }
    }

    /// Checks the invariants the official constructor asserts (or silently relies on).
    pub fn validate(&self) -> Result<()> {
        let fail = |field: &str, why: String| -> Result<()> { bail!("config field `{field}`: {why}") };
        if self.patch_size == 0 || !self.input_size.is_multiple_of(self.patch_size) {
            return fail("patch_size", format!("{} must divide input_size {}", self.patch_size, self.input_size));
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return fail("num_heads", format!("{} must divide hidden_size {}", self.num_heads, self.hidden_size));
        }
        if !self.hidden_size.is_multiple_of(4) {
            return fail("hidden_size", format!("{} must be a multiple of 4 (2-D sin-cos position embedding)", self.hidden_size));
        }
        if self.num_experts == 0 {
            return fail("num_experts", "must be at least 1".into());
        }
        // Bounds far above every published model, below sizes whose parameter count could
        // overflow, and the MoE kernels' expert limit: a config beyond them is a typo, refused
        // before anything is built (the memory check then compares the weights' bytes with
        // what the device has).
        let experts_max = if self.promoe.as_ref().is_some_and(|p| p.use_uncond_expert) { 255 } else { 256 };
        for (field, v, max) in [
            ("num_experts", self.num_experts, experts_max),
            ("depth", self.depth, 512),
            ("hidden_size", self.hidden_size, 16384),
            ("mlp_ratio", self.mlp_ratio, 16),
            ("n_shared_experts", self.n_shared_experts, 16),
            ("in_channels", self.in_channels, 64),
            ("input_size", self.input_size, 4096),
            ("num_classes", self.num_classes, 1 << 20),
        ] {
            if v > max {
                return fail(field, format!("{v} is more than {max}, the most ditmoe builds"));
            }
        }
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
            return fail(
                "num_experts_per_tok",
                format!("{} must be in 1..={}", self.num_experts_per_tok, self.num_experts),
            );
        }
        for (field, v) in [("in_channels", self.in_channels), ("depth", self.depth), ("mlp_ratio", self.mlp_ratio), ("num_classes", self.num_classes)] {
            if v == 0 {
                return fail(field, "must be at least 1".into());
            }
        }
        if !(0.0..1.0).contains(&self.class_dropout_prob) {
            return fail("class_dropout_prob", format!("{} must be in [0, 1)", self.class_dropout_prob));
        }
        if let Some(p) = &self.promoe {
            if self.use_flash_attn {
                return fail("use_flash_attn", "ProMoE uses the timm attention (qkv/proj); must be false".into());
            }
            if p.moe_intermediate_size == 0 {
                return fail("promoe.moe_intermediate_size", "must be at least 1".into());
            }
            if p.use_shared_expert && p.shared_expert_intermediate_size == 0 {
                return fail("promoe.shared_expert_intermediate_size", "must be at least 1 with use_shared_expert".into());
            }
            if !(p.routing_contrastive_temperature > 0.0 && p.routing_contrastive_temperature.is_finite()) {
                return fail("promoe.routing_contrastive_temperature", format!("{} must be positive", p.routing_contrastive_temperature));
            }
            for (field, v) in [("promoe.routing_contrastive_lam", p.routing_contrastive_lam), ("promoe.load_balance_loss_coef", p.load_balance_loss_coef)] {
                if !(v >= 0.0 && v.is_finite()) {
                    return fail(field, format!("{v} must be finite and >= 0"));
                }
            }
        }
        Ok(())
    }

    pub fn from_json_str(s: &str, origin: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(s).map_err(|e| candle_core::Error::Msg(format!("{origin}: {e}")))?;
        cfg.validate().map_err(|e| candle_core::Error::Msg(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    /// Reads a `config.json`; an unknown key fails with the key's name (serde `deny_unknown_fields`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        Self::from_json_str(&s, &path.display().to_string())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// The parameters one rank holds when the routed experts are split over `expert_parallel`
    /// ranks (1: the whole model).
    pub fn params_per_rank(&self, expert_parallel: usize) -> usize {
        self.param_counts().0 - self.routed_experts_params() * (expert_parallel - 1) / expert_parallel
    }

    /// The bytes of one rank's weights stored in `dtype`, the routed experts split over
    /// `expert_parallel` ranks.
    pub fn weight_bytes(&self, dtype: candle_core::DType, expert_parallel: usize) -> u64 {
        self.params_per_rank(expert_parallel) as u64 * dtype.size_in_bytes() as u64
    }

    /// Parameters of one routed expert: ProMoE's GELU MLP with biases, else DiT-MoE's SwiGLU.
    fn routed_expert_params(&self) -> usize {
        let d = self.hidden_size;
        match &self.promoe {
            Some(pm) => 2 * d * pm.moe_intermediate_size + pm.moe_intermediate_size + d,
            None => 3 * d * self.mlp_ratio * d,
        }
    }

    /// Parameters of the routed experts of every MoE block: what expert parallelism splits over
    /// its ranks (the router, shared experts and everything else are replicated).
    pub fn routed_experts_params(&self) -> usize {
        let moe_blocks = match &self.promoe {
            Some(_) => (0..self.depth).filter(|&i| self.is_moe_block(i)).count(),
            None => self.depth,
        };
        moe_blocks * self.num_experts * self.routed_expert_params()
    }

    /// Total and activated (per token: shared + k routed experts) parameter counts. For ProMoE,
    /// "activated" counts a conditional token (an unconditional one runs 1 expert, not k).
    pub fn param_counts(&self) -> (usize, usize) {
        let d = self.hidden_size;
        let p = self.patch_size;
        let c = self.in_channels;
        let embed = self.num_patches() * d // pos_embed (a buffer-like parameter in the official state dict)
            + d * c * p * p + d // x_embedder
            + 256 * d + d + d * d + d // t_embedder
            + self.label_table_rows() * d;
        let attn = 3 * d * d + 3 * d + d * d + d + if self.use_flash_attn { 4 * self.head_dim() } else { 0 };
        let adaln = d * 6 * d + 6 * d;
        let final_layer = d * 2 * d + 2 * d + d * p * p * self.out_channels() + p * p * self.out_channels();
        if let Some(pm) = &self.promoe {
            let gelu = |i: usize| 2 * d * i + i + d; // up (with bias) + down (with bias)
            let expert = self.routed_expert_params();
            let shared = if pm.use_shared_expert { gelu(pm.shared_expert_intermediate_size) } else { 0 };
            let moe_common = attn + adaln + self.num_experts * d + shared;
            let moe_total = moe_common + (self.num_experts + usize::from(pm.use_uncond_expert)) * expert;
            let moe_active = moe_common + self.num_experts_per_tok * expert;
            let dense = attn + adaln + gelu(self.mlp_ratio * d);
            let n_moe = (0..self.depth).filter(|&i| self.is_moe_block(i)).count();
            let n_dense = self.depth - n_moe;
            let base = embed + n_dense * dense + final_layer;
            return (base + n_moe * moe_total, base + n_moe * moe_active);
        }
        let expert = self.routed_expert_params();
        let shared = 3 * d * self.n_shared_experts * d;
        let router = self.num_experts * d;
        let block_common = attn + shared + router + adaln;
        let total = embed + self.depth * (block_common + self.num_experts * expert) + final_layer;
        let active = embed + self.depth * (block_common + self.num_experts_per_tok * expert) + final_layer;
        (total, active)
    }
}
