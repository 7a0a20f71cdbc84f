//! `LmAttention`: grouped-query causal self-attention of transformers' `MixtralAttention`,
//! `Qwen2MoeAttention` (q/k/v biases) and `OlmoeAttention` (q/k RMSNorm over the whole
//! projections, before the head split): q/k/v projections, RoPE, the KV cache, `repeat_kv`,
//! `softmax(q kᵀ / √head_dim + causal mask)` in f32 (`eager_attention_forward`), `o_proj`.
use super::{KvCache, LmConfig, RmsNorm, RotaryEmbedding, StaticKvCache};
use crate::nn::Linear;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct LmAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// OLMoE's `q_norm` (`[heads · head_dim]`) and `k_norm` (`[kv_heads · head_dim]`).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl LmAttention {
    /// `self_attn.{q,k,v,o}_proj` (and `self_attn.{q,k}_norm`) under `vb`.
    pub fn new(cfg: &LmConfig, plan: &crate::plan::ExecutionPlan, vb: VarBuilder) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let proj = |out: usize, name: &str| match cfg.attention_bias {
            true => crate::nn::linear(d, out, vb.pp(name)),
            false => crate::nn::linear_no_bias(d, out, vb.pp(name)),
        };
        let q_proj = proj(q_out, "q_proj")?;
        let k_proj = proj(kv_out, "k_proj")?;
        let v_proj = proj(kv_out, "v_proj")?;
        let o_proj = crate::nn::linear_no_bias(q_out, d, vb.pp("o_proj"))?;
        let qk_norm = match cfg.qk_norm {
            true => Some((RmsNorm::new(q_out, cfg.rms_norm_eps, plan.trainable(), vb.pp("q_norm"))?, RmsNorm::new(kv_out, cfg.rms_norm_eps, plan.trainable(), vb.pp("k_norm"))?)),
            false => None,
        };
        Ok(Self { q_proj, k_proj, v_proj, o_proj, qk_norm, num_heads: cfg.num_heads, num_kv_heads: cfg.num_kv_heads, head_dim: hd })
    }

    /// x `[B, T, d]` f32 at positions `offset .. offset + T` -> `[B, T, d]` f32. With a cache,
    /// this call's keys and values are appended to layer `layer`'s and the queries attend to
    /// all of them; `offset` is then the cache's length before the call.
    pub fn forward(&self, x: &Tensor, rope: &RotaryEmbedding, offset: usize, cache: Option<(&mut KvCache, usize)>) -> Result<Tensor> {
        let t = x.dim(1)?;
        let (q, k, v) = self.heads(x)?;
        let (q, k) = (rope.forward(&q, offset)?, rope.forward(&k, offset)?);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        if t > 1 && k.dim(2)? == t && !q.track_op() {
            return self.attend_causal(&q, &k, &v);
        }
        let mask = match t > 1 {
            true => Some(crate::nn::causal_mask(t, k.dim(2)?, offset, x.device())?),
            false => None,
        };
        self.attend(&q, &k, &v, mask.as_ref())
    }

    /// One decoding step on a [`StaticKvCache`]: x `[B, 1, d]` at the position held on the
    /// device in `pos` (`[1]` u32), its key and value written into layer `layer`'s slot `pos`,
    /// the query attending to every slot up to `pos`. No host value depends on the position,
    /// so the step can be captured once as a CUDA graph and replayed for every position.
    pub fn forward_static(&self, x: &Tensor, rope: &RotaryEmbedding, pos: &Tensor, cache: &StaticKvCache, layer: usize) -> Result<Tensor> {
        let (q, k, v) = self.heads(x)?;
        let (q, k) = (rope.forward_at(&q, pos)?, rope.forward_at(&k, pos)?);
        let (k, v) = cache.write(layer, &k, &v, pos)?;
        self.attend(&q, &k, &v, Some(&cache.visible_mask(pos)?))
    }

    /// The projections as heads: q `[B, H, T, hd]`, k and v `[B, kv, T, hd]` (v in f32), before
    /// the rotary embedding.
    fn heads(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (mut q, mut k) = (self.q_proj.forward(x)?, self.k_proj.forward(x)?);
        let v = self.v_proj.forward(x)?;
        if let Some((qn, kn)) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let heads = |x: Tensor, h: usize| x.reshape((b, t, h, self.head_dim))?.transpose(1, 2)?.contiguous();
        Ok((heads(q, self.num_heads)?, heads(k, self.num_kv_heads)?, heads(v, self.num_kv_heads)?.to_dtype(DType::F32)?))
    }

    /// A whole context in one call (a prefill), for inference: the causal attention in the
    /// weights' dtype, on the GPU one fused kernel (FlashAttention-2's online softmax, no T × T
    /// scores in memory, the key tiles past each block's last query skipped), as the DiT's
    /// attention runs. Training keeps the composite below, which has a backward.
    fn attend_causal(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let groups = self.num_heads / self.num_kv_heads;
        let dtype = self.o_proj.weight().dtype();
        let (k, v) = (repeat_kv(k, groups)?.to_dtype(dtype)?, repeat_kv(v, groups)?.to_dtype(dtype)?);
        let y = crate::model::kernels::block_ops::causal_attention(&q.to_dtype(dtype)?, &k, &v, 1.0 / (self.head_dim as f64).sqrt())?;
        // back to the residual stream's dtype, as the composite path hands o_proj its f32 rows
        self.o_proj.forward(&y.to_dtype(q.dtype())?)
    }

    /// `o_proj(softmax(q kᵀ / √hd + mask) v)` with the kv heads repeated; `mask` additive,
    /// broadcast over the batch and heads.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        let groups = self.num_heads / self.num_kv_heads;
        let (k, v) = (repeat_kv(k, groups)?, repeat_kv(v, groups)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let p = crate::nn::softmax_last_dim(&scores)?;
        let y = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&y)
    }
}

/// transformers' `repeat_kv`: `[B, kv, L, hd]` -> `[B, kv · n, L, hd]`, each kv head repeated
/// n times in place (heads `h · n .. (h + 1) · n` share kv head h).
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, l, hd) = x.dims4()?;
    Tensor::cat(&vec![x; n], 2)?.reshape((b, kv * n, l, hd))
}
