//! `LmModel`: transformers' `MixtralForCausalLM` / `Qwen2MoeForCausalLM` / `OlmoeForCausalLM`:
//! `model.embed_tokens` → `model.layers.<i>` ([`DecoderLayer`]) → `model.norm` → `lm_head`
//! (or the embedding, tied), with the router logits of every MoE layer, the model-level
//! load-balancing loss (`load_balancing_loss_func`), the causal-LM loss (`ForCausalLMLoss`
//! plus `router_aux_loss_coef · aux_loss`) and greedy decoding with the KV cache.
use super::{DecoderLayer, KvCache, LmConfig, NamedParams, ParamRecorder, RmsNorm, RotaryEmbedding, StaticKvCache};
use crate::moe::hf_load_balancing_loss;
use crate::nn::Linear;
use crate::plan::ExecutionPlan;
use candle_core::{DType, IndexOp, Module, Result, Tensor, Var, D};
use candle_nn::VarBuilder;

/// What one forward produces.
#[derive(Debug, Clone)]
pub struct LmOutput {
    /// `[B, T, V]` f32.
    pub logits: Tensor,
    /// Per MoE layer (in layer order), the router logits `[B·T, E]` f32 (HF's `router_logits`).
    pub router_logits: Vec<Tensor>,
    /// Per MoE layer, tokens routed to each expert, `[E]` u32.
    pub expert_counts: Vec<Tensor>,
    /// transformers' `load_balancing_loss_func` over every MoE layer's router logits, without
    /// `router_aux_loss_coef`; layers of unequal expert counts or top-k are grouped by (E, k),
    /// each group's loss weighted by its share of the MoE layers. None without MoE layers. HF computes it whenever
    /// `output_router_logits` is set, in eval mode too.
    pub aux_loss: Option<Tensor>,
    /// The sum of the MoE layers' own balance losses, coefficients included (training mode,
    /// layers whose `MoeConfig::balance_loss` coefficient is > 0; None for the HF families).
    pub layer_aux_loss: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct LmModel {
    cfg: LmConfig,
    /// `[V, d]` in the weights' dtype.
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    /// Every parameter by its checkpoint name, in the order built.
    params: NamedParams,
    trainable: bool,
}

impl LmModel {
    /// The model of `cfg` from `vb` (names as transformers saves them: `model.embed_tokens`,
    /// `model.layers.<i>.…`, `model.norm`, `lm_head`), run as `plan` says. `vb` holds the
    /// weights in `plan.weight_dtype()` on `plan.device` (a `VarMap`'s for training).
    pub fn new(cfg: &LmConfig, plan: &ExecutionPlan, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (vb, seen) = ParamRecorder::wrap(vb);
        let m = vb.pp("model");
        let embed_tokens = m.pp("embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_layers).map(|i| DecoderLayer::new(cfg, plan, i, m.pp("layers").pp(i.to_string()))).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, plan.trainable(), m.pp("norm"))?;
        let lm_head = match cfg.tie_word_embeddings {
            true => Linear::from_weights(embed_tokens.clone(), None),
            false => crate::nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?,
        };
        let rope = RotaryEmbedding::new(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, &plan.device)?;
        let mut params = std::mem::take(&mut *seen.lock().map_err(|_| candle_core::Error::Msg("lm: parameter list poisoned".into()))?);
        list_expert_views(cfg, &layers, &mut params);
        Ok(Self { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, rope, params, trainable: plan.trainable() })
    }

    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    /// Where the weights live.
    pub fn device(&self) -> &candle_core::Device {
        self.embed_tokens.device()
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Under expert parallelism, per MoE layer whose routed experts are split over ranks: the
    /// experts' checkpoint-name prefix (`model.layers.<i>.<moe_prefix>.<experts>.`) and the
    /// global ids this rank holds there. Empty when every expert is here.
    pub fn split_experts(&self) -> Vec<(String, std::ops::Range<usize>)> {
        self.layers.iter().filter_map(|layer| layer.moe()?.split_experts()).collect()
    }

    /// Every parameter by its checkpoint name (the tied `lm_head` is not listed).
    pub fn named_params(&self) -> &NamedParams {
        &self.params
    }

    /// The trainable parameters (a training plan's), for the optimizer.
    pub fn vars(&self) -> Result<Vec<Var>> {
        self.params.iter().filter(|(_, t)| t.is_variable()).map(|(_, t)| Var::from_tensor(t)).collect()
    }

    /// input_ids `[B, T]` u32 -> logits and the routing record (`MixtralModel.forward` +
    /// `lm_head`). With a cache the tokens continue the cached context (positions
    /// `cache.len() ..`) and their keys and values are appended; a context past
    /// `max_position_embeddings` is an error. `train` asks the MoE layers for their own losses.
    pub fn forward(&self, input_ids: &Tensor, mut cache: Option<&mut KvCache>, train: bool) -> Result<LmOutput> {
        let (b, t) = input_ids.dims2()?;
        let offset = match &cache {
            Some(c) => {
                c.check_room(t)?;
                c.len()
            }
            None if t > self.cfg.max_position_embeddings => {
                candle_core::bail!("lm: {t} positions exceed max_position_embeddings {}", self.cfg.max_position_embeddings)
            }
            None => 0,
        };
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?.to_dtype(DType::F32)?.reshape((b, t, self.cfg.hidden_size))?;
        let (mut router_logits, mut expert_counts, mut layer_losses) = (vec![], vec![], vec![]);
        for (i, layer) in self.layers.iter().enumerate() {
            let (y, moe) = layer.forward(&x, &self.rope, offset, cache.as_deref_mut().map(|c| (c, i)), train)?;
            x = y;
            if let Some(o) = moe {
                router_logits.push(o.routing.logits.to_dtype(DType::F32)?);
                expert_counts.push(o.expert_counts);
                layer_losses.extend(o.aux_loss);
            }
        }
        let logits = self.lm_head.forward(&self.norm.forward(&x)?)?.to_dtype(DType::F32)?;
        let aux_loss = self.load_balancing_loss(&router_logits)?;
        let layer_aux_loss = match layer_losses.split_first() {
            None => None,
            Some((first, rest)) => Some(rest.iter().try_fold(first.clone(), |acc, l| acc + l)?),
        };
        Ok(LmOutput { logits, router_logits, expert_counts, aux_loss, layer_aux_loss })
    }

    /// transformers' `load_balancing_loss_func` over the MoE layers' router logits (in layer
    /// order). Layers of different expert counts or top-k (a pyramid; no HF family has them)
    /// are grouped by (E, k): each group's loss, weighted by its share of the MoE layers, summed;
    /// with one group this is exactly transformers' loss.
    fn load_balancing_loss(&self, router_logits: &[Tensor]) -> Result<Option<Tensor>> {
        let groups = router_groups(&self.cfg, router_logits);
        let total = router_logits.len() as f64;
        let mut loss: Option<Tensor> = None;
        for ((_, top_k), g) in &groups {
            let l = hf_load_balancing_loss(g, *top_k)?;
            let l = if groups.len() == 1 { l } else { (l * (g.len() as f64 / total))? };
            loss = Some(match loss {
                None => l,
                Some(acc) => (acc + l)?,
            });
        }
        Ok(loss)
    }

    /// One decoding step on a [`StaticKvCache`]: ids `[B, 1]` u32 at the position held on the
    /// device in `pos` (`[1]` u32) -> the logits `[B, V]` f32. The keys and values go into the
    /// cache; nothing on the host depends on the position (see [`super::Decoder`]).
    pub fn decode_step(&self, input_ids: &Tensor, pos: &Tensor, cache: &StaticKvCache) -> Result<Tensor> {
        let (b, _) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?.to_dtype(DType::F32)?.reshape((b, 1, self.cfg.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward_static(&x, &self.rope, pos, cache, i)?;
        }
        self.lm_head.forward(&self.norm.forward(&x)?)?.to_dtype(DType::F32)?.reshape((b, self.cfg.vocab_size))
    }

    /// transformers' causal-LM loss: the mean next-token cross-entropy of the shifted logits
    /// (`ForCausalLMLoss`; labels `[B, T]` u32, or i64 with -100 for ignored positions) plus
    /// `router_aux_loss_coef · aux_loss` (HF adds it when `output_router_logits` is set), plus
    /// the MoE layers' own balance losses if any. Runs a forward in training mode when the
    /// model's plan is a training plan.
    pub fn loss(&self, input_ids: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let out = self.forward(input_ids, None, self.trainable)?;
        self.loss_from_output(&out, labels)
    }

    /// [`Self::loss`] of a forward's output.
    pub fn loss_from_output(&self, out: &LmOutput, labels: &Tensor) -> Result<Tensor> {
        let mut loss = cross_entropy(&out.logits, labels)?;
        if let Some(aux) = &out.aux_loss {
            loss = (loss + (aux * self.cfg.router_aux_loss_coef)?)?;
        }
        if let Some(l) = &out.layer_aux_loss {
            loss = (loss + l)?;
        }
        Ok(loss)
    }

    /// Greedy decoding of `new_tokens` tokens after `prompt` with the KV cache (the prompt in
    /// one forward, then one token per forward), as `generate(do_sample=False)` without an EOS
    /// stop; the result starts with the prompt.
    pub fn generate_greedy(&self, prompt: &[u32], new_tokens: usize) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            candle_core::bail!("lm: generate_greedy needs a non-empty prompt")
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            candle_core::bail!("lm: prompt token {bad} is outside the vocabulary of {}", self.cfg.vocab_size)
        }
        let dev = self.embed_tokens.device();
        let mut cache = KvCache::for_config(&self.cfg);
        let mut tokens = prompt.to_vec();
        let mut input = Tensor::new(prompt, dev)?.unsqueeze(0)?;
        for _ in 0..new_tokens {
            let out = self.forward(&input, Some(&mut cache), false)?;
            let t = out.logits.dim(1)?;
            let next = out.logits.i((0, t - 1))?.argmax(D::Minus1)?.to_scalar::<u32>()?;
            tokens.push(next);
            input = Tensor::new(&[next], dev)?.unsqueeze(0)?;
        }
        Ok(tokens)
    }
}

/// On a frozen kernel plan an MoE layer stacks its experts once and keeps them as views into
/// the stacks: the parameter list takes those views in place of the tensors it was handed, so
/// the unstacked copies are freed (elsewhere the two are the same tensors).
fn list_expert_views(cfg: &LmConfig, layers: &[DecoderLayer], params: &mut NamedParams) {
    let mut at: std::collections::HashMap<String, usize> = params.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
    for (i, moe) in layers.iter().enumerate().filter_map(|(i, l)| l.moe().map(|m| (i, m))) {
        let (c, n) = (moe.config(), &moe.config().names);
        let projs = match c.expert_form.gelu() {
            None => vec![&n.gate_proj, &n.up_proj, &n.down_proj],
            Some(_) => vec![&n.up_proj, &n.down_proj],
        };
        for e in 0..moe.experts().len() {
            for (proj, w) in projs.iter().zip(moe.experts().weights(e)) {
                let name = format!("model.layers.{i}.{}.{}.{e}.{proj}.weight", cfg.moe_prefix, n.experts);
                if let Some(j) = at.remove(&name) {
                    params[j].1 = w.clone();
                }
            }
        }
    }
}

/// `ForCausalLMLoss`: logits `[B, T, V]` and labels `[B, T]` (u32; or i64, -100 ignored), the
/// labels shifted one left, `cross_entropy(reduction="mean")` over the positions not ignored,
/// in f32.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if labels.dims2()? != (b, t) {
        candle_core::bail!("lm loss: labels {:?} do not match logits {:?}", labels.dims(), logits.dims())
    }
    if t < 2 {
        candle_core::bail!("lm loss: a causal-LM loss needs at least 2 positions, got {t}")
    }
    let n = b * (t - 1);
    let logits = logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?.reshape((n, v))?;
    let labels = labels.narrow(1, 1, t - 1)?.contiguous()?.reshape(n)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let (targets, mask) = match labels.dtype() {
        DType::I64 => {
            let mask = labels.ge(0i64)?;
            (mask.where_cond(&labels, &labels.zeros_like()?)?.to_dtype(DType::U32)?, Some(mask.to_dtype(DType::F32)?))
        }
        _ => (labels.to_dtype(DType::U32)?, None),
    };
    let nll = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    match mask {
        None => nll.mean_all(),
        Some(m) => (nll * &m)?.sum_all()?.broadcast_div(&m.sum_all()?),
    }
}

/// The MoE layers' router logits grouped by (expert count, top-k), in layer order: the groups the
/// model-level load-balancing loss is taken over (one group for every HF family).
pub(crate) fn router_groups(cfg: &LmConfig, router_logits: &[Tensor]) -> Vec<((usize, usize), Vec<Tensor>)> {
    let mut groups: Vec<((usize, usize), Vec<Tensor>)> = vec![];
    for (m, logits) in cfg.layers.iter().filter_map(|l| l.moe()).zip(router_logits) {
        let key = (m.num_experts, m.top_k);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(logits.clone()),
            None => groups.push((key, vec![logits.clone()])),
        }
    }
    groups
}
