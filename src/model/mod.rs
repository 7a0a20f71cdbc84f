//! The DiT-MoE backbone (official `models.py`) and the ProMoE family built from the same parts
//! (`models_ProMoE_TC.py`, selected by `DitConfig::promoe`), one concept per file.
pub mod attention;
pub mod block;
pub mod dit;
pub mod embed;
pub mod final_layer;
pub mod kernels;
pub mod record;
pub mod recompute;

pub use attention::Attention;
pub use block::{BlockOutput, DitBlock, Ffn, Modulation};
pub use dit::{DitMoe, DitOutput};
pub use embed::{get_2d_sincos_pos_embed, LabelEmbedder, PatchEmbed, TimestepEmbedder};
pub use final_layer::FinalLayer;
pub use record::{ForwardMode, LayerRouting, Trace};
pub use recompute::BlockTape;
