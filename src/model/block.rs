//! `DitBlock`: the official adaLN-Zero `DiTBlock` with the MoE in place of the MLP:
//! `x = x + gate_msa * attn(modulate(norm1(x)))`, `x = x + gate_mlp * moe(modulate(norm2(x)))`.
use super::{layer_norm_no_affine, modulate, Attention, ForwardMode, LayerRouting, Trace};
use crate::config::DitConfig;
use crate::moe::SharedExpertMoe;
use candle_core::{Module, Result, Tensor};
use crate::nn::Linear;
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct DitBlock {
    attn: Attention,
    moe: SharedExpertMoe,
    ada_ln: Linear,
}

/// What a block hands back besides its output.
pub struct BlockOutput {
    pub x: Tensor,
    /// The balance loss in training mode.
    pub aux_loss: Option<Tensor>,
    /// Tokens per expert.
    pub counts: Vec<usize>,
}

impl DitBlock {
    pub fn new(cfg: &DitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            attn: Attention::new(cfg, vb.pp("attn"))?,
            moe: SharedExpertMoe::new(cfg, vb.pp("moe"))?,
            ada_ln: crate::nn::linear(d, 6 * d, vb.pp("adaLN_modulation.1"))?,
        })
    }

    pub fn moe(&self) -> &SharedExpertMoe {
        &self.moe
    }

    /// x: (N, T, D), c: (N, D). `layer` names the trace entries (`blocks.<layer>.*`).
    pub fn forward(&self, x: &Tensor, c: &Tensor, mode: ForwardMode, layer: usize, trace: &mut Trace) -> Result<BlockOutput> {
        let n = x.dim(0)?;
        let ada = self.ada_ln.forward(&candle_nn::ops::silu(c)?)?;
        // Chunk order of the official code: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
        let m = ada.chunk(6, 1)?;
        let attn_in = modulate(&layer_norm_no_affine(x)?, &m[0], &m[1])?;
        let attn_out = self.attn.forward(&attn_in)?;
        let x_mid = (x + attn_out.broadcast_mul(&m[2].unsqueeze(1)?)?)?;
        let moe_in = modulate(&layer_norm_no_affine(&x_mid)?, &m[3], &m[4])?;
        let moe = self.moe.forward(&moe_in)?;
        let out = (&x_mid + moe.out.broadcast_mul(&m[5].unsqueeze(1)?)?)?;

        let aux_loss = match mode {
            ForwardMode::Train => Some(self.moe.balance_loss(&moe.routing, n)?),
            ForwardMode::Eval => None,
        };
        let name = |what: &'static str| move || format!("blocks.{layer}.{what}");
        trace.keep(name("adaln"), &ada);
        trace.keep(name("attn_in"), &attn_in);
        trace.keep(name("attn_out"), &attn_out);
        trace.keep(name("x_mid"), &x_mid);
        trace.keep(name("moe_in"), &moe_in);
        trace.keep(name("moe_routed"), &moe.routed);
        if let Some(shared) = &moe.shared {
            trace.keep(name("moe_shared"), shared);
        }
        trace.keep(name("moe_out"), &moe.out);
        trace.keep(name("out"), &out);
        if trace.record_routing {
            let r = moe.routing;
            trace.routing.push(LayerRouting { experts: r.experts, weights: r.weights, scores: r.scores });
        }
        Ok(BlockOutput { x: out, aux_loss, counts: moe.counts })
    }
}
