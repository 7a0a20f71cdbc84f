//! `RmsNorm`: transformers' `MixtralRMSNorm` / `Qwen2MoeRMSNorm` / `OlmoeRMSNorm` (all the same
//! `LlamaRMSNorm`): the statistics in f32, `weight * (x * rsqrt(mean(x²) + eps))`.
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[size]`, read in f32 like the activations.
    weight: crate::nn::F32Param,
    eps: f64,
}

impl RmsNorm {
    /// `<vb>.weight` of `[size]`; `trainable`: the plan's.
    pub fn new(size: usize, eps: f64, trainable: bool, vb: VarBuilder) -> Result<Self> {
        let weight = crate::nn::F32Param::new(vb.get(size, "weight")?, trainable)?;
        Ok(Self { weight, eps })
    }

    pub fn weight(&self) -> Result<Tensor> {
        self.weight.get()
    }
}

impl Module for RmsNorm {
    /// `LlamaRMSNorm.forward`: `x.to(float32)`, `variance = x.pow(2).mean(-1, keepdim)`,
    /// `x * rsqrt(variance + eps)`, times the weight; hands back x's dtype. candle's fused
    /// kernel for inference; under autograd (it has no backward) the same maths in candle ops.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let weight = self.weight()?;
        let y = if xf.track_op() || weight.track_op() {
            let var = xf.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            xf.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?.broadcast_mul(&weight)?
        } else {
            candle_nn::ops::rms_norm(&xf.contiguous()?, &weight, self.eps as f32)?
        };
        y.to_dtype(dtype)
    }
}
