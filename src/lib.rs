//! ditmoe: DiT-MoE (Fei et al. 2024) mixture-of-experts diffusion transformers on candle.
#[macro_use]
pub mod runtime;
pub mod analysis;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod diffusion;
pub mod dist;
pub mod eval;
pub mod lm;
pub mod model;
pub mod moe;
pub mod nn;
pub mod plan;
pub mod presets;
pub mod progress;
pub mod sampling;
pub mod text;
pub mod train;

pub use config::DitConfig;
pub use model::{DitMoe, DitOutput, ForwardMode, Trace};
pub use plan::{ExecutionPlan, Precision, Weights};
