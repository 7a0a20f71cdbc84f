//! Named presets for every official size (`models.DiT_models`) and expert setting of the
//! released checkpoints. Names follow the paper: `DiT-MoE-<size>/<patch>-<E>E<k>A`. The ProMoE
//! family adds `ProMoE-<size>/2` (github:ali-vilab/ProMoE `config.py` sizes with the
//! `configs/004_ProMoE_<size>.yaml` MoE settings).
use crate::config::{DitConfig, ProMoeConfig};
use candle_core::{bail, Result};

/// (name, depth, hidden, heads, patches, flash-attention form of the released checkpoints)
type Size = (&'static str, usize, usize, usize, &'static [usize], bool);
const SIZES: &[Size] = &[
    ("S", 12, 384, 6, &[2, 4, 8], false),
    ("B", 12, 768, 12, &[2, 4, 8], false),
    ("L", 24, 1024, 16, &[2, 4, 8], false),
    ("XL", 28, 1152, 16, &[2, 4, 8], true),
    ("G", 40, 1408, 16, &[2], true),
];
/// Expert settings of the released checkpoints: (routed experts, active per token).
const EXPERTS: &[(usize, usize)] = &[(8, 2), (16, 2)];

#[derive(Debug, Clone)]
pub struct Preset {
    pub name: String,
    pub config: DitConfig,
}

/// Every preset, ImageNet 256 px latent settings (input 32, 4 channels, 1000 classes,
/// learned sigma), as the official `train.py`/`sample.py` build them.
pub fn all() -> Vec<Preset> {
    let mut out = Vec::new();
    for &(size, depth, hidden, heads, patches, flash) in SIZES {
        for &patch in patches {
            for &(e, k) in EXPERTS {
                out.push(Preset {
                    name: format!("DiT-MoE-{size}/{patch}-{e}E{k}A"),
                    config: DitConfig {
                        input_size: 32,
                        patch_size: patch,
                        in_channels: 4,
                        hidden_size: hidden,
                        depth,
                        num_heads: heads,
                        mlp_ratio: 4,
                        class_dropout_prob: 0.1,
                        num_classes: 1000,
                        num_experts: e,
                        num_experts_per_tok: k,
                        // official sample.py: 2 for S/B, 1 for XL/G (same maths either way)
                        pretraining_tp: if flash { 1 } else { 2 },
                        learn_sigma: true,
                        use_flash_attn: flash,
                        n_shared_experts: 2,
                        aux_loss_alpha: 0.01,
                        seq_aux: false,
                        norm_topk_prob: false,
                        promoe: None,
                    },
                });
            }
        }
    }
    out.extend(PROMOE_SIZES.iter().map(|&(size, depth, hidden, heads)| promoe_preset(size, depth, hidden, heads)));
    out
}

/// ProMoE sizes (official `config.py` `DiT_<size>_config`): (name, depth, hidden, heads).
const PROMOE_SIZES: &[(&str, usize, usize, usize)] = &[("S", 12, 384, 6), ("B", 12, 768, 12), ("L", 24, 1024, 16), ("XL", 28, 1152, 16)];

/// ProMoE-<size>/2 (`ProMoE_TC_<size>`): 12 routed experts + the unconditional one, top-1,
/// ImageNet 256 px latents, learned sigma (the official `DiT` default; rectified flow ignores
/// the sigma half).
fn promoe_preset(size: &str, depth: usize, hidden: usize, heads: usize) -> Preset {
    Preset {
        name: format!("ProMoE-{size}/2"),
        config: DitConfig {
            input_size: 32,
            patch_size: 2,
            in_channels: 4,
            hidden_size: hidden,
            depth,
            num_heads: heads,
            mlp_ratio: 4,
            class_dropout_prob: 0.1,
            num_classes: 1000,
            num_experts: 12,
            num_experts_per_tok: 1,
            pretraining_tp: 1,
            learn_sigma: true,
            use_flash_attn: false,
            // DiT-MoE-only keys: no effect with `promoe` (see `ProMoeConfig`).
            n_shared_experts: 0,
            aux_loss_alpha: 0.0,
            seq_aux: false,
            norm_topk_prob: false,
            promoe: Some(ProMoeConfig::released(hidden)),
        },
    }
}

/// Looks a preset up by name; accepts `DiT-MoE-S/2-8E2A`, `S/2-8E2A` or `S-2-8E2A`, any case
/// (ProMoE: `ProMoE-S/2` or `promoe-s-2`).
pub fn get(name: &str) -> Result<Preset> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('/', "-").trim_start_matches("dit-moe-").to_string();
    let want = norm(name);
    match all().into_iter().find(|p| norm(&p.name) == want) {
        Some(p) => Ok(p),
        None => bail!(
            "unknown preset `{name}`; known: {}",
            all().iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}
