//! The forward of an autograd node whose value was computed before the node was made.
//!
//! candle's custom ops see storages, while the fused kernels take tensors; so the ops with
//! their own backward over the kernels ([`super::routed_grad`], [`super::attention_grad`])
//! compute their value first and keep it, and their `cpu_fwd`/`cuda_fwd` only hand over a copy
//! of its storage (the inputs' storages are not read: the value came from the same tensors).
use candle_core::{bail, CpuStorage, Result, Shape, Storage, Tensor};

/// A copy of `value`'s storage (only its layout's elements) and its shape.
fn storage_copy(value: &Tensor) -> Result<(Storage, Shape)> {
    let (storage, layout) = value.storage_and_layout();
    Ok((storage.try_clone(layout)?, value.shape().clone()))
}

/// `value` as op `op`'s CPU output.
pub(crate) fn cpu_value(op: &str, value: &Tensor) -> Result<(CpuStorage, Shape)> {
    match storage_copy(value)? {
        (Storage::Cpu(s), shape) => Ok((s, shape)),
        _ => bail!("{op}: the value is not on the CPU"),
    }
}

/// `value` as op `op`'s CUDA output.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_value(op: &str, value: &Tensor) -> Result<(candle_core::CudaStorage, Shape)> {
    match storage_copy(value)? {
        (Storage::Cuda(s), shape) => Ok((s, shape)),
        _ => bail!("{op}: the value is not on the GPU"),
    }
}
