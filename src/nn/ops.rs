//! The tensor operations every layer uses around its matmuls: a Linear's bias and output cast
//! and a strided view made contiguous.
//! On CUDA, when no input records autograd history, each is one kernel (`kernels/tensor_ops.cu`)
//! that takes its layout as scalar arguments, so a CUDA graph can replay it; elsewhere, candle
//! ops (the CPU reference).
use candle_core::{DType, Result, Tensor};

/// Whether the fused kernels serve these tensors: all on a CUDA device, none tracked by autograd.
pub fn fused(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cuda() && !t.track_op())
}

/// `y + bias` over the last axis, converted to `out_dtype` (a Linear's bias and output cast).
pub fn bias_cast(y: &Tensor, bias: Option<&Tensor>, out_dtype: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(&[y]) && bias.is_none_or(|b| fused(&[b])) && matches!((y.dtype(), out_dtype), (DType::BF16, _) | (DType::F32, DType::F32)) {
        return super::cuda::bias_cast(y, bias, out_dtype);
    }
    match bias {
        Some(b) => y.broadcast_add(b)?.to_dtype(out_dtype),
        None => y.to_dtype(out_dtype),
    }
}

/// `t.contiguous()`, through a kernel that takes the view's layout as arguments on CUDA (any
/// permute, narrow or broadcast of up to 6 dims, 2- or 4-byte elements).
pub fn contiguous(t: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if !t.is_contiguous() && fused(&[t]) && t.rank() <= 6 && matches!(t.dtype().size_in_bytes(), 2 | 4) {
        return super::cuda::strided_copy(t);
    }
    t.contiguous()
}

/// `x` broadcast to `shape` and made contiguous (see [`contiguous`]).
pub fn broadcast_contiguous(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    contiguous(&x.broadcast_as(shape)?)
}
