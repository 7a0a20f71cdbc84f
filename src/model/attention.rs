//! Multi-head self-attention in both official forms, sharing one implementation:
//! - timm `Attention` (S/B checkpoints): `qkv` -> SDPA -> `proj`;
//! - `FlashSelfMHAModified` (XL/G checkpoints): `Wqkv` -> LayerNorm on q and k over the head
//!   dimension (`q_norm`, `k_norm`, affine, eps 1e-6) -> q, k cast to float16 (`.half()`) ->
//!   attention -> `out_proj`.
use crate::config::DitConfig;
use candle_core::{DType, Module, Result, Tensor};
use crate::nn::Linear;
use crate::nn::LayerNorm;
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
enum QkNorm {
    /// timm form: no normalisation.
    None,
    /// flash form: per-head LayerNorms, then the official float16 rounding of q and k.
    LayerNormHalf { q: LayerNorm, k: LayerNorm },
}

#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    qk_norm: QkNorm,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(cfg: &DitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let hd = cfg.head_dim();
        let ln = |name: &str| -> Result<LayerNorm> {
            // Norms run in f32 like the rest of the activations (autocast keeps layer_norm in f32).
            let w = vb.pp(name).get(hd, "weight")?.to_dtype(DType::F32)?;
            let b = vb.pp(name).get(hd, "bias")?.to_dtype(DType::F32)?;
            Ok(LayerNorm::new(w, b, 1e-6))
        };
        // Built in the official state-dict order so recorded names list like the checkpoints.
        let (qkv, qk_norm, proj) = if cfg.use_flash_attn {
            let qkv = crate::nn::linear(d, 3 * d, vb.pp("Wqkv"))?;
            let qk_norm = QkNorm::LayerNormHalf { q: ln("q_norm")?, k: ln("k_norm")? };
            (qkv, qk_norm, crate::nn::linear(d, d, vb.pp("out_proj"))?)
        } else {
            (crate::nn::linear(d, 3 * d, vb.pp("qkv"))?, QkNorm::None, crate::nn::linear(d, d, vb.pp("proj"))?)
        };
        Ok(Self {
            qkv,
            proj,
            qk_norm,
            num_heads: cfg.num_heads,
            head_dim: hd,
        })
    }

    /// (N, T, D) -> (N, T, D).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        // (B, T, 3, H, hd): the packed layout both official forms use.
        let qkv = self.qkv.forward(x)?.reshape((b, t, 3, self.num_heads, self.head_dim))?;
        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2); // (B, T, H, hd)
        let (mut q, mut k, v) = (part(0)?, part(1)?, part(2)?);
        if let QkNorm::LayerNormHalf { q: qn, k: kn } = &self.qk_norm {
            // `self.q_norm(q).half()`: the official code rounds q and k to float16 even in an
            // f32 run (torch.stack promotes back), so we round them the same way.
            let dtype = q.dtype();
            q = qn.forward(&q)?.to_dtype(DType::F16)?.to_dtype(dtype)?;
            k = kn.forward(&k)?.to_dtype(DType::F16)?.to_dtype(dtype)?;
        }
        // The attention matmuls run in the weights' dtype, as SDPA does under autocast.
        let compute = self.qkv.weight().dtype();
        let heads = |x: Tensor| x.to_dtype(compute)?.transpose(1, 2)?.contiguous(); // (B, H, T, hd)
        let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        // Softmax in f32 as SDPA/flash-attention accumulate it, whatever the storage dtype.
        let att = crate::nn::softmax_last_dim(&att.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?.to_dtype(x.dtype())?;
        self.proj.forward(&out)
    }
}

