//! Layers shared by every model: a `Linear` that computes in its weights' dtype and hands
//! back the caller's dtype. This is what `torch.autocast` does for the official bf16 runs:
//! matmuls run in bf16 (f32 accumulation), while the residual stream, LayerNorms, modulation
//! and softmaxes stay in f32. Keeping the activations in f32 is what keeps a bf16 model within
//! 1e-2 of the f32 reference.

#[cfg(feature = "cuda")]
mod cuda;
pub mod ops;
pub mod row_grad;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// A linear map over existing tensors (e.g. views into stacked expert weights).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { inner: candle_nn::Linear::new(weight, bias) }
    }
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Linear {
    /// `x · Wᵀ` without the bias, in the weights' dtype: one 2-D matmul over all rows of x
    /// (any leading shape), for callers that fuse the bias into their next pass.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.inner.weight();
        let (out_dim, in_dim) = w.dims2()?;
        let mut out_shape = x.dims().to_vec();
        let last = out_shape.len() - 1;
        if out_shape[last] != in_dim {
            candle_core::bail!("linear: input {:?} does not end in {in_dim} features", x.dims())
        }
        out_shape[last] = out_dim;
        let rows = x.elem_count() / in_dim.max(1);
        let xc = ops::contiguous(&x.to_dtype(w.dtype())?)?.reshape((rows, in_dim))?;
        xc.matmul(&w.t()?)?.reshape(out_shape)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The bias and the cast back in one pass ([`ops::bias_cast`]: a fused kernel on the
        // GPU, candle ops elsewhere).
        let y = self.matmul(x)?;
        match self.inner.bias() {
            None if x.dtype() == y.dtype() => Ok(y),
            bias => ops::bias_cast(&y, bias, x.dtype()),
        }
    }
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear { inner: candle_nn::linear(in_dim, out_dim, vb)? })
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear { inner: candle_nn::linear_no_bias(in_dim, out_dim, vb)? })
}

/// `[T, L]` f32: 0 where query i (position `offset + i`) may see key j (j <= offset + i),
/// -inf elsewhere. Built on the device from two position ranges: a host-built mask is T·L
/// floats uploaded per layer, which dominated a 2048-token prefill.
pub fn causal_mask(t: usize, l: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let queries = Tensor::arange(offset as u32, (offset + t) as u32, device)?.unsqueeze(1)?;
    let keys = Tensor::arange(0u32, l as u32, device)?.unsqueeze(0)?;
    let zero = Tensor::zeros((), DType::F32, device)?.broadcast_as((t, l))?;
    let hidden = Tensor::new(f32::NEG_INFINITY, device)?.broadcast_as((t, l))?;
    keys.broadcast_le(&queries)?.where_cond(&zero, &hidden)
}

// candle-nn's fused `softmax_last_dim` and `layer_norm` kernels have no backward pass: under
// autograd their outputs are constants, silently. So every softmax and LayerNorm of the
// models goes through these two functions, which take the fused kernel for inference and,
// whenever the input belongs to an autograd graph, ops with their own backward
// ([`row_grad`], f32) or a composite of differentiable candle ops (other dtypes).

/// Softmax over the last axis.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    match (x.track_op(), x.dtype()) {
        (true, candle_core::DType::F32) => row_grad::softmax_rows(x),
        (true, _) => candle_nn::ops::softmax(x, candle_core::D::Minus1),
        (false, _) => candle_nn::ops::softmax_last_dim(x),
    }
}

/// LayerNorm over the last axis with optional affine weight and bias.
pub fn layer_norm(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    use candle_core::D;
    if x.track_op() || weight.is_some_and(|w| w.track_op()) || bias.is_some_and(|b| b.track_op()) {
        let mut y = if x.dtype() == candle_core::DType::F32 {
            row_grad::layer_norm_rows(x, eps)?
        } else {
            let mean = x.mean_keepdim(D::Minus1)?;
            let centred = x.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
            centred.broadcast_div(&(var + eps)?.sqrt()?)?
        };
        if let Some(w) = weight {
            y = y.broadcast_mul(w)?;
        }
        if let Some(b) = bias {
            y = y.broadcast_add(b)?;
        }
        return Ok(y);
    }
    let d = x.dim(D::Minus1)?;
    let ones;
    let zeros;
    let w = match weight {
        Some(w) => w,
        None => {
            ones = Tensor::ones(d, x.dtype(), x.device())?;
            &ones
        }
    };
    let b = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(d, x.dtype(), x.device())?;
            &zeros
        }
    };
    candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32)
}

/// A parameter the forward reads in f32 whatever the weights' dtype (norm weights, the
/// position table), as autocast keeps norms in f32. Frozen weights are converted once, when
/// the model is built. Trained weights are converted at each use: the variable's value changes
/// every step (in a bf16 plan it is the bf16 copy refreshed from the f32 masters), and a copy
/// made at build time would keep the value the variable had then.
#[derive(Debug, Clone)]
pub struct F32Param {
    tensor: Tensor,
    convert_on_use: bool,
}

impl F32Param {
    /// `trainable`: the plan's ([`crate::ExecutionPlan::trainable`]).
    pub fn new(tensor: Tensor, trainable: bool) -> Result<Self> {
        match trainable && tensor.dtype() != DType::F32 {
            true => Ok(Self { tensor, convert_on_use: true }),
            false => Ok(Self { tensor: tensor.to_dtype(DType::F32)?, convert_on_use: false }),
        }
    }

    /// The parameter in f32 (differentiable in the variable when trained).
    pub fn get(&self) -> Result<Tensor> {
        match self.convert_on_use {
            true => self.tensor.to_dtype(DType::F32),
            false => Ok(self.tensor.clone()),
        }
    }
}

/// A LayerNorm with affine parameters (the flash-attention form's q/k norms), in f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: F32Param,
    bias: F32Param,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: F32Param, bias: F32Param, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl LayerNorm {
    pub fn weight(&self) -> Result<Tensor> {
        self.weight.get()
    }
    pub fn bias(&self) -> Result<Tensor> {
        self.bias.get()
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, Some(&self.weight()?), Some(&self.bias()?), self.eps)
    }
}
