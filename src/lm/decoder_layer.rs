//! `DecoderLayer`: transformers' `MixtralDecoderLayer` / `Qwen2MoeDecoderLayer` /
//! `OlmoeDecoderLayer`: `x = x + attn(input_layernorm(x))`, then
//! `x = x + mlp(post_attention_layernorm(x))`, the MLP a dense SwiGLU (`Qwen2MoeMLP`) or the
//! engine's [`MoeLayer`] (`MixtralSparseMoeBlock`, `Qwen2MoeSparseMoeBlock`,
//! `OlmoeSparseMoeBlock`).
use super::{KvCache, LayerMlp, LmAttention, LmConfig, RmsNorm, RotaryEmbedding, StaticKvCache};
use crate::moe::{MoeInput, MoeLayer, MoeOutput, ParamNames, SwigluExpert};
use crate::plan::ExecutionPlan;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A layer's MLP.
#[derive(Debug, Clone)]
pub enum LmMlp {
    /// `mlp.{gate,up,down}_proj`, `down(silu(gate x) * up x)`.
    Dense(SwigluExpert),
    /// Boxed: a layer with its config is much larger than a dense MLP.
    Moe(Box<MoeLayer>),
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: LmAttention,
    post_attention_layernorm: RmsNorm,
    mlp: LmMlp,
}

impl DecoderLayer {
    /// Layer `index` under `vb` (`model.layers.<index>`).
    pub fn new(cfg: &LmConfig, plan: &ExecutionPlan, index: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let input_layernorm = RmsNorm::new(d, cfg.rms_norm_eps, plan.trainable(), vb.pp("input_layernorm"))?;
        let self_attn = LmAttention::new(cfg, plan, vb.pp("self_attn"))?;
        let post_attention_layernorm = RmsNorm::new(d, cfg.rms_norm_eps, plan.trainable(), vb.pp("post_attention_layernorm"))?;
        let mlp = match cfg.layers.get(index) {
            Some(LayerMlp::Moe(m)) => LmMlp::Moe(Box::new(MoeLayer::new(m, plan, vb.pp(&cfg.moe_prefix))?)),
            Some(LayerMlp::Dense) => LmMlp::Dense(SwigluExpert::named(d, cfg.intermediate_size, &ParamNames::default(), vb.pp("mlp"))?),
            None => candle_core::bail!("lm: layer {index} of a {}-layer plan", cfg.layers.len()),
        };
        Ok(Self { input_layernorm, self_attn, post_attention_layernorm, mlp })
    }

    pub fn mlp(&self) -> &LmMlp {
        &self.mlp
    }

    /// The MoE layer, when this layer has one.
    pub fn moe(&self) -> Option<&MoeLayer> {
        match &self.mlp {
            LmMlp::Moe(m) => Some(m),
            LmMlp::Dense(_) => None,
        }
    }

    /// x `[B, T, d]` f32 at positions `offset ..` -> the layer's output and, for an MoE layer,
    /// the MoE layer's output record (router logits, counts, losses).
    pub fn forward(&self, x: &Tensor, rope: &RotaryEmbedding, offset: usize, cache: Option<(&mut KvCache, usize)>, train: bool) -> Result<(Tensor, Option<MoeOutput>)> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, rope, offset, cache)?;
        self.mlp_residual(&(x + h)?, train)
    }

    /// One decoding step of layer `layer` on a [`StaticKvCache`], the position on the device
    /// (see [`LmAttention::forward_static`]).
    pub fn forward_static(&self, x: &Tensor, rope: &RotaryEmbedding, pos: &Tensor, cache: &StaticKvCache, layer: usize) -> Result<Tensor> {
        let h = self.self_attn.forward_static(&self.input_layernorm.forward(x)?, rope, pos, cache, layer)?;
        Ok(self.mlp_residual(&(x + h)?, false)?.0)
    }

    /// `x + mlp(post_attention_layernorm(x))`.
    fn mlp_residual(&self, x: &Tensor, train: bool) -> Result<(Tensor, Option<MoeOutput>)> {
        let (b, t, d) = x.dims3()?;
        let h = self.post_attention_layernorm.forward(x)?;
        let (h, moe) = match &self.mlp {
            LmMlp::Dense(mlp) => (mlp.forward(&h)?, None),
            LmMlp::Moe(moe) => {
                let tokens = h.reshape((b * t, d))?;
                let o = moe.forward(&MoeInput { tokens: &tokens, seq_len: t, unconditional: None, train })?;
                (o.out.to_dtype(x.dtype())?.reshape((b, t, d))?, Some(o))
            }
        };
        Ok(((x + h)?, moe))
    }
}
