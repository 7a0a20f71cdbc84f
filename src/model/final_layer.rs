//! `FinalLayer`: adaLN (shift, scale) modulation of a LayerNorm, then a linear map to
//! `patch * patch * out_channels` values per token (official `FinalLayer`).
use crate::model::kernels::block_ops;
use crate::config::DitConfig;
use crate::plan::ExecutionPlan;
use candle_core::{DType, Module, Result, Tensor};
use crate::nn::Linear;
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct FinalLayer {
    linear: Linear,
    ada_ln: Linear,
    /// The dtype of `linear`'s input ([`ExecutionPlan::matmul_input_dtype`]).
    input_dtype: DType,
}

impl FinalLayer {
    pub fn new(cfg: &DitConfig, plan: &ExecutionPlan, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        Ok(Self {
            linear: crate::nn::linear(d, p * p * cfg.out_channels(), vb.pp("linear"))?,
            ada_ln: crate::nn::linear(d, 2 * d, vb.pp("adaLN_modulation.1"))?,
            input_dtype: plan.matmul_input_dtype(),
        })
    }

    /// x (N, T, D) f32, c (N, D) -> (N, T, p*p*out_channels) f32.
    pub fn forward(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let mods = self.ada_ln.forward(&candle_nn::ops::silu(c)?)?; // shift, scale
        self.linear.forward(&block_ops::ln_modulate(x, &mods, 0, 1, self.input_dtype)?)?.to_dtype(DType::F32)
    }
}
