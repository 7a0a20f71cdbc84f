//! The optimizer step's multi-tensor kernels (gradient norm, AdamW, EMA), with the candle ops
//! of the CPU path as their reference.
pub mod foreach;
#[cfg(feature = "cuda")]
mod cuda;
