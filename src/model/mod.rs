//! The DiT-MoE backbone (official `models.py`) and the ProMoE family built from the same parts
//! (`models_ProMoE_TC.py`, selected by `DitConfig::promoe`), one concept per file.
pub mod attention;
pub mod block;
pub mod dit;
pub mod embed;
pub mod final_layer;
pub mod record;

pub use attention::Attention;
pub use block::{BlockOutput, DitBlock, Ffn};
pub use dit::{DitMoe, DitOutput};
pub use embed::{get_2d_sincos_pos_embed, LabelEmbedder, PatchEmbed, TimestepEmbedder};
pub use final_layer::FinalLayer;
pub use record::{ForwardMode, LayerRouting, Trace};

use candle_core::{Result, Tensor};

/// `modulate(x, shift, scale) = x * (1 + scale) + shift`, with (N, D) modulation broadcast
/// over the tokens of (N, T, D) x (official `models.modulate`).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let scale = (scale.unsqueeze(1)? + 1.0)?;
    x.broadcast_mul(&scale)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// LayerNorm without affine parameters, eps 1e-6 (`nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)`).
pub fn layer_norm_no_affine(x: &Tensor) -> Result<Tensor> {
    crate::nn::layer_norm(x, None, None, 1e-6)
}
