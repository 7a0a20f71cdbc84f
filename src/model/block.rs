//! `DitBlock`: the official adaLN-Zero `DiTBlock` with a feed-forward layer that is, per
//! family and block index, the engine's [`MoeLayer`] (DiT-MoE: `moe`, every block; ProMoE:
//! `mlp`, odd blocks with `interleave`) or ProMoE's dense timm `Mlp` (`mlp.fc1/fc2`, even blocks):
//! `x = x + gate_msa * attn(modulate(norm1(x)))`, `x = x + gate_mlp * ffn(modulate(norm2(x)))`.
use super::{Attention, ForwardMode, LayerRouting, Trace};
use crate::model::kernels::block_ops;
use crate::config::DitConfig;
use crate::moe::{GeluMlp, MoeInput, MoeLayer, MoeOutput};
use crate::plan::ExecutionPlan;
use crate::nn::Linear;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// The block's feed-forward layer.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// The MoE layer, built from `DitConfig::moe_config` (DiT-MoE: `blocks.<i>.moe`; ProMoE:
    /// `blocks.<i>.mlp`).
    /// Boxed: a layer with its config is much larger than a dense MLP.
    Moe(Box<MoeLayer>),
    /// ProMoE's dense blocks: timm `Mlp(D, mlp_ratio D)`, GELU-tanh (`blocks.<i>.mlp`).
    Dense(GeluMlp),
}

#[derive(Debug, Clone)]
pub struct DitBlock {
    attn: Attention,
    ffn: Ffn,
    ada_ln: Linear,
    /// The dtype of the attention's input ([`ExecutionPlan::matmul_input_dtype`]).
    attn_dtype: DType,
}

/// What a block hands back besides its output.
pub struct BlockOutput {
    pub x: Tensor,
    /// The balance loss in training mode (DiT-MoE always; ProMoE when its coefficient is > 0).
    pub aux_loss: Option<Tensor>,
    /// ProMoE's routing contrastive loss in training mode (lambda included).
    pub contrastive_loss: Option<Tensor>,
    /// Slots per expert, `[E]` u32 on the device (ProMoE: the unconditional expert last);
    /// None for a dense block.
    pub counts: Option<Tensor>,
    /// The next block's attention input, `modulate(norm1(x))`, when [`Modulation::next`] asked
    /// for it: computed in the same pass as this block's last residual.
    pub next_attn_in: Option<Tensor>,
}

/// Where a block finds its adaLN output: chunks `first .. first + 6` (of width D) of `mods`
/// (N, C·D), in the official order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
/// gate_mlp. `next`: the first chunk of the following block in the same `mods`, if any; the
/// block then also computes that block's attention input (its `norm1` + modulate) in its last
/// residual pass, which saves a read and write of the residual stream per block.
#[derive(Clone, Copy)]
pub struct Modulation<'a> {
    pub mods: &'a Tensor,
    pub first: usize,
    pub next: Option<usize>,
}

impl DitBlock {
    /// Block `index` of the model (ProMoE alternates dense and MoE blocks).
    pub fn new(cfg: &DitConfig, plan: &ExecutionPlan, index: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = Attention::new(cfg, plan, vb.pp("attn"))?;
        let ffn = match (&cfg.promoe, cfg.is_moe_block(index)) {
            (None, _) => Ffn::Moe(Box::new(MoeLayer::new(&cfg.moe_config(), plan, vb.pp("moe"))?)),
            (Some(_), true) => Ffn::Moe(Box::new(MoeLayer::new(&cfg.moe_config(), plan, vb.pp("mlp"))?)),
            (Some(_), false) => Ffn::Dense(GeluMlp::timm(d, cfg.mlp_ratio * d, vb.pp("mlp"))?),
        };
        let ada_ln = crate::nn::linear(d, 6 * d, vb.pp("adaLN_modulation.1"))?;
        Ok(Self { attn, ffn, ada_ln, attn_dtype: plan.matmul_input_dtype() })
    }

    pub fn attention(&self) -> &Attention {
        &self.attn
    }

    /// The adaLN modulation `Linear(D, 6D)` (applied to SiLU(c)).
    pub fn ada_ln(&self) -> &Linear {
        &self.ada_ln
    }

    /// Replaces the adaLN map by the same weights held elsewhere (rows of the model's stacked
    /// modulation weights).
    pub(crate) fn set_ada_ln(&mut self, ada_ln: Linear) {
        self.ada_ln = ada_ln;
    }

    pub fn ffn(&self) -> &Ffn {
        &self.ffn
    }

    /// The MoE layer, when this block has one.
    pub fn moe(&self) -> Option<&MoeLayer> {
        match &self.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        }
    }

    /// x: (N, T, D), c: (N, D), `unconditional` (N·T,) u8: the tokens of samples whose label
    /// was dropped (ProMoE's router sends them to its unconditional expert; see
    /// [`super::DitMoe::unconditional_tokens`]). `layer` names the trace entries
    /// (`blocks.<layer>.*`).
    pub fn forward(&self, x: &Tensor, c: &Tensor, unconditional: Option<&Tensor>, mode: ForwardMode, layer: usize, trace: &mut Trace) -> Result<BlockOutput> {
        let ada = self.ada_ln.forward(&candle_nn::ops::silu(c)?)?;
        self.forward_modulated(x, None, Modulation { mods: &ada, first: 0, next: None }, unconditional, mode, layer, trace)
    }

    /// [`Self::forward`] with this block's adaLN output already computed (see [`Modulation`]);
    /// the model computes every block's modulation in one matmul on the GPU
    /// ([`super::DitMoe`]). `attn_in`: this block's attention input, if the previous block
    /// computed it ([`BlockOutput::next_attn_in`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_modulated(
        &self,
        x: &Tensor,
        attn_in: Option<Tensor>,
        m: Modulation,
        unconditional: Option<&Tensor>,
        mode: ForwardMode,
        layer: usize,
        trace: &mut Trace,
    ) -> Result<BlockOutput> {
        let (n, t, d) = x.dims3()?;
        let (ada, first, attn_dtype) = (m.mods, m.first, self.attn_dtype);
        let attn_in = match attn_in {
            Some(a) => a,
            None => block_ops::ln_modulate(x, ada, first, first + 1, attn_dtype)?,
        };
        // the attention output before its projection's bias, which goes into the residual pass
        let attn_y = self.attn.forward_before_out_bias(&attn_in)?;
        let ffn_dtype = match &self.ffn {
            Ffn::Moe(m) => m.input_dtype(),
            Ffn::Dense(_) => DType::F32,
        };
        // x_mid = x + gate_msa * attn_out, and the MLP's input from it, in one pass.
        let (x_mid, ffn_in) = block_ops::residual_ln_modulate(x, &attn_y, self.attn.out_bias(), ada, first + 2, first + 3, first + 4, ffn_dtype)?;
        let train = mode == ForwardMode::Train;
        let (ffn_out, moe) = match &self.ffn {
            Ffn::Moe(moe) => {
                let tokens = ffn_in.reshape((n * t, d))?;
                let o = moe.forward(&MoeInput { tokens: &tokens, seq_len: t, unconditional, train })?;
                (o.out.reshape((n, t, d))?, Some(o))
            }
            Ffn::Dense(mlp) => (mlp.forward(&ffn_in)?, None),
        };
        let aux_loss = moe.as_ref().and_then(|o| o.aux_loss.clone());
        let contrastive_loss = moe.as_ref().and_then(|o| o.contrastive_loss.clone());
        let (out, next_attn_in) = match m.next {
            // the next block's x is `out`, as f32 as this block's x, so its input dtype is ours
            Some(next) => {
                let (out, h) = block_ops::residual_ln_modulate(&x_mid, &ffn_out, None, ada, first + 5, next, next + 1, attn_dtype)?;
                (out, Some(h))
            }
            None => (block_ops::gated_residual(&x_mid, &ffn_out, None, ada, first + 5)?, None),
        };

        let name = |what: &'static str| move || format!("blocks.{layer}.{what}");
        trace.keep(name("adaln"), &ada.narrow(1, first * d, 6 * d)?);
        trace.keep(name("attn_in"), &attn_in);
        if trace.record_intermediates {
            trace.keep(name("attn_out"), &self.attn.add_out_bias(&attn_y, attn_in.dtype())?);
        }
        trace.keep(name("x_mid"), &x_mid);
        let counts = match moe {
            Some(moe) => Some(record_moe(moe, &ffn_in, layer, trace)?),
            None => {
                trace.keep(name("mlp_in"), &ffn_in);
                trace.keep(name("mlp_out"), &ffn_out);
                None
            }
        };
        trace.keep(name("out"), &out);
        Ok(BlockOutput { x: out, aux_loss, contrastive_loss, counts, next_attn_in })
    }
}

/// The trace entries (`[N, T, D]`, the block's token layout) and routing record of an MoE
/// layer; returns its expert counts.
fn record_moe(moe: MoeOutput, moe_in: &Tensor, layer: usize, trace: &mut Trace) -> Result<Tensor> {
    let name = |what: &'static str| move || format!("blocks.{layer}.{what}");
    let shape = moe_in.shape();
    trace.keep(name("moe_in"), moe_in);
    if let Some(routed) = &moe.routed {
        trace.keep(name("moe_routed"), &routed.reshape(shape)?);
    }
    if let Some(shared) = &moe.shared {
        trace.keep(name("moe_shared"), &shared.reshape(shape)?);
    }
    trace.keep(name("moe_out"), &moe.out.reshape(shape)?);
    if trace.record_routing {
        let r = moe.routing;
        trace.routing.push(LayerRouting { layer, experts: r.experts, weights: r.weights, scores: r.scores });
    }
    Ok(moe.expert_counts)
}
