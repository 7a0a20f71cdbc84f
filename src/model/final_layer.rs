//! `FinalLayer`: adaLN (shift, scale) modulation of a LayerNorm, then a linear map to
//! `patch * patch * out_channels` values per token (official `FinalLayer`).
use super::{layer_norm_no_affine, modulate};
use crate::config::DitConfig;
use candle_core::{Module, Result, Tensor};
use crate::nn::Linear;
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct FinalLayer {
    linear: Linear,
    ada_ln: Linear,
}

impl FinalLayer {
    pub fn new(cfg: &DitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        Ok(Self {
            linear: crate::nn::linear(d, p * p * cfg.out_channels(), vb.pp("linear"))?,
            ada_ln: crate::nn::linear(d, 2 * d, vb.pp("adaLN_modulation.1"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let m = self.ada_ln.forward(&candle_nn::ops::silu(c)?)?.chunk(2, 1)?;
        self.linear.forward(&modulate(&layer_norm_no_affine(x)?, &m[0], &m[1])?)
    }
}
