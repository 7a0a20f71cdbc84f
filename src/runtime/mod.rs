//! What every kernel family shares and no model owns: the CUDA runtime (NVRTC compilation of
//! `kernels/`, the compile target, tensor <-> kernel-argument helpers), CUDA-graph capture and
//! replay of a forward, CUDA-event timing, the peak of the memory in use, and the custom-op plumbing that hands a value the
//! kernels computed to candle's autograd.
//!
//! The kernel families live with their owners: the MoE ops with the engine
//! (`crate::moe::kernels`), the layers' tensor ops with `crate::nn`, the DiT's fused block ops
//! and attention with the model (`crate::model::kernels`), the optimizer's multi-tensor ops with
//! training (`crate::train::kernels`).

/// The NVRTC source of `kernels/<file>`: `kernels/common.cuh` (integer shorthands, bf16 bits,
/// element access, warp reductions) followed by the file, so no source needs an include path at
/// run time.
#[cfg(feature = "cuda")]
macro_rules! nvrtc_source {
    ($file:literal) => {
        concat!(
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/common.cuh")),
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/", $file))
        )
    };
}

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod graph;
pub mod memory;
pub(crate) mod precomputed;
pub mod timing;
