//! ditmoe: DiT-MoE (Fei et al. 2024) mixture-of-experts diffusion transformers on candle.
pub mod config;
pub mod data;
pub mod diffusion;
pub mod kernels;
