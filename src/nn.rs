//! Layers shared by every model: a `Linear` that computes in its weights' dtype and hands
//! back the caller's dtype. This is what `torch.autocast` does for the official bf16 runs:
//! matmuls run in bf16 (f32 accumulation), while the residual stream, LayerNorms, modulation
//! and softmaxes stay in f32. Keeping the activations in f32 is what keeps a bf16 model within
//! 1e-2 of the f32 reference.
use candle_core::{Module, Result, Tensor};
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

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let compute = self.inner.weight().dtype();
        if x.dtype() == compute {
            return self.inner.forward(x);
        }
        self.inner.forward(&x.to_dtype(compute)?)?.to_dtype(x.dtype())
    }
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear { inner: candle_nn::linear(in_dim, out_dim, vb)? })
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear { inner: candle_nn::linear_no_bias(in_dim, out_dim, vb)? })
}
