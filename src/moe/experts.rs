//! `SwigluExpert`: the official `MoeMLP`, `down_proj(silu(gate_proj(x)) * up_proj(x))`, no
//! bias. Routed experts use intermediate `mlp_ratio * D`, the shared expert `n_shared * D`.
//! (`pretraining_tp` only slices these matmuls: same maths, another summation order.)
use candle_core::{Module, Result, Tensor};
use crate::nn::Linear;
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct SwigluExpert {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl SwigluExpert {
    pub fn new(hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: crate::nn::linear_no_bias(hidden, intermediate, vb.pp("gate_proj"))?,
            up_proj: crate::nn::linear_no_bias(hidden, intermediate, vb.pp("up_proj"))?,
            down_proj: crate::nn::linear_no_bias(intermediate, hidden, vb.pp("down_proj"))?,
        })
    }

    /// The three weights, `[out, in]` as `nn.Linear` stores them (gate, up, down).
    pub fn weights(&self) -> [&Tensor; 3] {
        [self.gate_proj.weight(), self.up_proj.weight(), self.down_proj.weight()]
    }
}

impl Module for SwigluExpert {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}
