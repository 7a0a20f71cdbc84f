//! The DiT's own fused kernels: the block's memory-bound passes around its matmuls (LayerNorm +
//! adaLN modulate, gated residuals), the q/k/v split with the flash form's q/k norms, and
//! attention, each with a CPU reference; and the training ops with their own backward (adaLN,
//! attention).
pub mod adaln_grad;
pub mod attention_grad;
pub mod block_ops;
#[cfg(feature = "cuda")]
mod cuda;
