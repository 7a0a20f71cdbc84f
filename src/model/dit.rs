//! `DitMoe`: the official `models.DiT` with sparse-MoE blocks, in either family: DiT-MoE
//! (github:feizc/DiT-MoE `models.py`) or ProMoE (github:ali-vilab/ProMoE
//! `models_ProMoE_TC.py::DiT`, chosen by `DitConfig::promoe`), which share embeddings,
//! attention, adaLN and final layer and differ in the blocks' feed-forward layers.
use super::{DitBlock, FinalLayer, ForwardMode, LabelEmbedder, Modulation, PatchEmbed, TimestepEmbedder, Trace};
use crate::config::DitConfig;
use crate::nn::ops;
use crate::plan::ExecutionPlan;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct DitMoe {
    cfg: DitConfig,
    dtype: DType, // the weights' (compute) dtype
    x_embedder: PatchEmbed,
    pos_embed: crate::nn::F32Param, // (1, T, D): the fixed sin-cos table, stored in official checkpoints
    t_freq_table: Tensor, // (1, 128): the timestep embedding's frequencies, on the device
    t_embedder: TimestepEmbedder,
    y_embedder: LabelEmbedder,
    blocks: Vec<DitBlock>,
    /// Every block's adaLN map stacked into one `Linear(D, depth·6D)` (the blocks hold views of
    /// its rows): on the GPU with frozen weights, where one matmul replaces `depth` small ones
    /// (their input SiLU(c) is the same for every block).
    ada_all: Option<crate::nn::Linear>,
    final_layer: FinalLayer,
}

/// The model output plus what training and analysis need from the pass.
#[derive(Debug, Clone)]
pub struct DitOutput {
    /// (N, out_channels, H, W).
    pub out: Tensor,
    /// One balance loss per MoE layer in training mode, empty in eval mode (ProMoE: only when
    /// `load_balance_loss_coef > 0`, never in the released configs).
    pub aux_losses: Vec<Tensor>,
    /// ProMoE: one routing contrastive loss per MoE layer in training mode (lambda included),
    /// to add to the training loss beside `aux_losses` and log apart. Empty for DiT-MoE.
    pub contrastive_losses: Vec<Tensor>,
    /// Slots routed to each expert, per MoE block: `[E]` u32 tensors on the model's device.
    pub expert_counts: Vec<Tensor>,
}

impl DitOutput {
    /// The expert counts read back to the host, `[moe block][expert]`. This waits for the
    /// device, so call it where a sync is fine (logging), not inside a sampling loop.
    pub fn expert_counts_host(&self) -> Result<Vec<Vec<usize>>> {
        self.expert_counts.iter().map(|c| Ok(c.to_vec1::<u32>()?.into_iter().map(|v| v as usize).collect())).collect()
    }
}

/// The per-block losses and counts a forward collects into its [`DitOutput`].
#[derive(Default)]
pub(crate) struct Routed {
    aux_losses: Vec<Tensor>,
    contrastive_losses: Vec<Tensor>,
    expert_counts: Vec<Tensor>,
}

impl Routed {
    /// Keeps block output `b`'s losses and counts; returns its tokens.
    pub(crate) fn take(&mut self, b: super::BlockOutput) -> Tensor {
        self.aux_losses.extend(b.aux_loss);
        self.contrastive_losses.extend(b.contrastive_loss);
        self.expert_counts.extend(b.counts);
        b.x
    }

    pub(crate) fn into_output(self, out: Tensor) -> DitOutput {
        DitOutput { out, aux_losses: self.aux_losses, contrastive_losses: self.contrastive_losses, expert_counts: self.expert_counts }
    }
}

impl DitMoe {
    /// The model of `cfg`, run as `plan` says (device, frozen or trainable weights, precision);
    /// `vb` holds the weights (in `plan`'s weight dtype).
    pub fn new(cfg: &DitConfig, plan: &ExecutionPlan, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        // `pos_embed` first: the official state dict lists the module's own parameter first.
        // Activations (and so the position table) stay f32 whatever the weights' dtype.
        let dtype = vb.dtype();
        let pos_embed = crate::nn::F32Param::new(vb.get((1, cfg.num_patches(), cfg.hidden_size), "pos_embed")?, plan.trainable())?;
        // Built in the official state-dict order, which the recorded parameter lists follow.
        let x_embedder = PatchEmbed::new(cfg, vb.pp("x_embedder"))?;
        let t_embedder = TimestepEmbedder::new(cfg, vb.pp("t_embedder"))?;
        let y_embedder = LabelEmbedder::new(cfg, vb.pp("y_embedder"))?;
        let mut blocks = (0..cfg.depth).map(|i| DitBlock::new(cfg, plan, i, vb.pp(format!("blocks.{i}")))).collect::<Result<Vec<_>>>()?;
        let final_layer = FinalLayer::new(cfg, plan, vb.pp("final_layer"))?;
        let ada_all = match plan.fused_inference() {
            true => Some(Self::stack_ada_ln(&mut blocks)?),
            false => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            dtype,
            pos_embed,
            t_freq_table: TimestepEmbedder::frequency_table(vb.device())?,
            x_embedder,
            t_embedder,
            y_embedder,
            blocks,
            ada_all,
            final_layer,
        })
    }

    /// See [`Self::ada_all`]: only for frozen weights on a GPU (training keeps one variable
    /// per block; the CPU path stays as checked against the official code).
    fn stack_ada_ln(blocks: &mut [DitBlock]) -> Result<crate::nn::Linear> {
        let rows = blocks[0].ada_ln().weight().dim(0)?;
        let weight = Tensor::cat(&blocks.iter().map(|b| b.ada_ln().weight()).collect::<Vec<_>>(), 0)?;
        let bias = blocks.iter().map(|b| b.ada_ln().bias().cloned()).collect::<Option<Vec<_>>>();
        let bias = bias.map(|b| Tensor::cat(&b, 0)).transpose()?;
        for (i, block) in blocks.iter_mut().enumerate() {
            let b = bias.as_ref().map(|b| b.narrow(0, i * rows, rows)).transpose()?;
            block.set_ada_ln(crate::nn::Linear::from_weights(weight.narrow(0, i * rows, rows)?, b));
        }
        Ok(crate::nn::Linear::from_weights(weight, bias))
    }

    pub fn config(&self) -> &DitConfig {
        &self.cfg
    }
    pub fn blocks(&self) -> &[DitBlock] {
        &self.blocks
    }
    /// Whether an eval forward never reads from the device, so that it can be captured as a
    /// CUDA graph: every MoE layer runs the fused inference path (DiT-MoE, frozen weights on a
    /// GPU; see `MoeLayer::is_fused`).
    pub fn forward_is_capturable(&self) -> bool {
        self.ada_all.is_some() && self.blocks.iter().all(|b| b.moe().is_none_or(|m| m.is_fused()))
    }

    /// `[N·T]` u8, 1 for the tokens of samples labelled with the null class, when a block's
    /// router needs it (ProMoE's unconditional expert); None otherwise.
    pub fn unconditional_tokens(&self, y: &Tensor) -> Result<Option<Tensor>> {
        if !self.blocks.iter().any(|b| b.moe().is_some_and(|m| m.needs_unconditional_mask())) {
            return Ok(None);
        }
        let n = y.elem_count();
        let null = Tensor::full(self.cfg.null_class() as u32, n, y.device())?;
        let is_null = y.flatten_all()?.to_dtype(DType::U32)?.eq(&null)?;
        let t = self.cfg.num_patches();
        Ok(Some(is_null.reshape((n, 1))?.broadcast_as((n, t))?.flatten_all()?.contiguous()?))
    }

    /// The weights' dtype, in which the matmuls run.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// x: (N, C, H, W) in any float dtype, t: (N,) integer steps or float t, y: (N,) labels
    /// (`num_classes` = null class; after label dropout, which ProMoE's routers also read).
    /// Activations and the output are f32; matmuls run in the weights' dtype.
    pub fn forward_full(&self, x: &Tensor, t: &Tensor, y: &Tensor, mode: ForwardMode, trace: &mut Trace) -> Result<DitOutput> {
        let (x, c) = self.embed(x, t, y, trace)?;
        let unconditional = self.unconditional_tokens(y)?;
        let mut routed = Routed::default();
        // Every block's modulation in one matmul where the weights are stacked (GPU inference).
        let mods_all = match &self.ada_all {
            Some(ada) => Some(ada.forward(&candle_nn::ops::silu(&c)?)?),
            None => None,
        };
        let (mut x, mut attn_in) = (x, None);
        for (i, block) in self.blocks.iter().enumerate() {
            let mut b = match &mods_all {
                Some(mods) => {
                    let next = (i + 1 < self.blocks.len()).then_some(6 * (i + 1));
                    block.forward_modulated(&x, attn_in.take(), Modulation { mods, first: 6 * i, next }, unconditional.as_ref(), mode, i, trace)?
                }
                None => block.forward(&x, &c, unconditional.as_ref(), mode, i, trace)?,
            };
            attn_in = b.next_attn_in.take();
            x = routed.take(b);
        }
        Ok(routed.into_output(self.head(&x, &c, trace)?))
    }

    /// The token embeddings `patch(x) + pos_embed` (N, T, D) and the conditioning `t_emb +
    /// y_emb` (N, D), both f32, after checking the inputs' shapes.
    pub(crate) fn embed(&self, x: &Tensor, t: &Tensor, y: &Tensor, trace: &mut Trace) -> Result<(Tensor, Tensor)> {
        let (n, c, h, w) = x.dims4()?;
        let cfg = &self.cfg;
        if c != cfg.in_channels || h != cfg.input_size || w != cfg.input_size {
            candle_core::bail!(
                "input x has shape ({n}, {c}, {h}, {w}) but the model expects (N, {}, {s}, {s})",
                cfg.in_channels,
                s = cfg.input_size
            )
        }
        if t.dims() != [n] || y.dims() != [n] {
            candle_core::bail!("t {:?} and y {:?} must both have shape [{n}] to match x", t.dims(), y.dims())
        }
        let x = x.to_dtype(DType::F32)?;
        let patch = self.x_embedder.forward(&x)?;
        let x = (&patch + ops::broadcast_contiguous(&self.pos_embed.get()?, patch.dims())?)?;
        let t_freq = TimestepEmbedder::frequencies_with(t, &self.t_freq_table)?;
        let t_emb = self.t_embedder.forward_freq(&t_freq)?;
        let y_emb = self.y_embedder.forward(y)?;
        let c = (&t_emb + &y_emb)?;
        trace.keep(|| "embed.patch".into(), &patch);
        trace.keep(|| "embed.x".into(), &x);
        trace.keep(|| "embed.t_freq".into(), &t_freq);
        trace.keep(|| "embed.t".into(), &t_emb);
        trace.keep(|| "embed.y".into(), &y_emb);
        trace.keep(|| "embed.c".into(), &c);
        Ok((x, c))
    }

    /// The final layer and `unpatchify`: the last block's tokens (N, T, D) -> (N, C, H, W).
    pub(crate) fn head(&self, x: &Tensor, c: &Tensor, trace: &mut Trace) -> Result<Tensor> {
        let out = self.final_layer.forward(x, c)?;
        trace.keep(|| "final.out".into(), &out);
        self.unpatchify(&out)
    }

    /// Eval-mode forward (official `DiT.forward` with `model.eval()`).
    pub fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(self.forward_full(x, t, y, ForwardMode::Eval, &mut Trace::default())?.out)
    }

    /// Official `forward_with_cfg`: runs `cat[x[:N/2], x[:N/2]]` (the caller puts conditional
    /// labels in the first half of y and the null class in the second), then guides the first
    /// `guided_channels` output channels (official: 3; `in_channels` for the usual "all
    /// channels" form) and writes the guided values to both halves.
    pub fn forward_with_cfg(&self, x: &Tensor, t: &Tensor, y: &Tensor, cfg_scale: f64, guided_channels: usize, trace: &mut Trace) -> Result<Tensor> {
        let n = x.dim(0)?;
        if n % 2 != 0 {
            candle_core::bail!("forward_with_cfg needs an even batch (conditional half + null half), got {n}")
        }
        let half = x.narrow(0, 0, n / 2)?;
        let combined = Tensor::cat(&[&half, &half], 0)?;
        let out = self.forward_full(&combined, t, y, ForwardMode::Eval, trace)?.out;
        apply_cfg(&out, cfg_scale, guided_channels)
    }

    /// (N, T, p*p*C) -> (N, C, H, W), official `unpatchify` (einsum nhwpqc->nchpwq).
    pub fn unpatchify(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _, _) = x.dims3()?;
        let (g, p, c) = (self.cfg.grid_size(), self.cfg.patch_size, self.cfg.out_channels());
        ops::contiguous(&x.reshape((n, g, g, p, p, c))?.permute((0, 5, 1, 3, 2, 4))?)?.reshape((n, c, g * p, g * p))
    }
}

/// Guidance on a doubled batch (first half conditional, second half unconditional):
/// `uncond + s (cond - uncond)` on the first `guided_channels` channels, written to both
/// halves; the remaining channels keep each half's own values (official `forward_with_cfg`).
pub fn apply_cfg(out: &Tensor, cfg_scale: f64, guided_channels: usize) -> Result<Tensor> {
    let (n, c, _, _) = out.dims4()?;
    let g = guided_channels.min(c);
    let eps = out.narrow(1, 0, g)?;
    let cond = eps.narrow(0, 0, n / 2)?;
    let uncond = eps.narrow(0, n / 2, n / 2)?;
    let guided = (&uncond + ((&cond - &uncond)? * cfg_scale)?)?;
    let eps = Tensor::cat(&[&guided, &guided], 0)?;
    if g == c {
        return Ok(eps);
    }
    Tensor::cat(&[&eps, &out.narrow(1, g, c - g)?], 1)
}
