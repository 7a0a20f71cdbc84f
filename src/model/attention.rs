//! Multi-head self-attention in both official forms, sharing one implementation:
//! - timm `Attention` (S/B checkpoints): `qkv` -> SDPA -> `proj`;
//! - `FlashSelfMHAModified` (XL/G checkpoints): `Wqkv` -> LayerNorm on q and k over the head
//!   dimension (`q_norm`, `k_norm`, affine, eps 1e-6) -> q, k cast to float16 (`.half()`) ->
//!   attention -> `out_proj`.
use crate::config::DitConfig;
use crate::model::kernels::block_ops;
use crate::nn::ops;
use candle_core::{DType, Module, Result, Tensor};
use crate::nn::Linear;
use crate::nn::{F32Param, LayerNorm};
use crate::plan::ExecutionPlan;
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
    pub fn new(cfg: &DitConfig, plan: &ExecutionPlan, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let hd = cfg.head_dim();
        let ln = |name: &str| -> Result<LayerNorm> {
            // Norms run in f32 like the rest of the activations (autocast keeps layer_norm in f32).
            let w = F32Param::new(vb.pp(name).get(hd, "weight")?, plan.trainable())?;
            let b = F32Param::new(vb.pp(name).get(hd, "bias")?, plan.trainable())?;
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

    /// (N, T, D) -> (N, T, D), in x's dtype (the plan's matmul input dtype,
    /// [`ExecutionPlan::matmul_input_dtype`], or f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.add_out_bias(&self.forward_before_out_bias(x)?, x.dtype())
    }

    /// The packed `qkv` projection `(N, T, 3D)` without its bias (the bias goes in with the split).
    pub fn qkv_projection(&self, x: &Tensor) -> Result<Tensor> {
        self.qkv.matmul(x)
    }

    /// softmax(q kᵀ / √hd) v of the heads of a packed projection, merged back to (N, T, D) in
    /// the projection's dtype (the weights' dtype, in which the attention matmuls run, as SDPA
    /// does under autocast). The bias, the flash form's q/k norms (then the official float16
    /// rounding of q and k), the head split and the attention are `block_ops::qkv_attention`:
    /// on the GPU one fused kernel reading the projection, with the softmax in f32 as
    /// SDPA/flash-attention accumulate it.
    pub fn attend(&self, qkv: &Tensor) -> Result<Tensor> {
        let norm_weights = match &self.qk_norm {
            QkNorm::None => None,
            QkNorm::LayerNormHalf { q, k } => Some((q.weight()?, q.bias()?, k.weight()?, k.bias()?, q.eps())),
        };
        // `self.q_norm(q).half()`: the official code rounds q and k to float16 even in an f32
        // run (torch.stack promotes back), so we round them the same way.
        let norm = norm_weights.as_ref().map(|(q_weight, q_bias, k_weight, k_bias, eps)| block_ops::QkNormWeights { q_weight, q_bias, k_weight, k_bias, eps: *eps });
        block_ops::qkv_attention(qkv, self.qkv.bias(), norm, self.num_heads, 1.0 / (self.head_dim as f64).sqrt())
    }

    /// The output projection (`proj` / `out_proj`).
    pub fn project_out(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(x)
    }

    /// The output projection without its bias, in the weights' dtype; the block adds
    /// [`Self::out_bias`] in its gated-residual pass (`block_ops::residual_ln_modulate`), which
    /// saves a pass over the attention output.
    pub fn project_out_before_bias(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.matmul(x)
    }

    /// The output projection's bias.
    pub fn out_bias(&self) -> Option<&Tensor> {
        self.proj.bias()
    }

    /// [`Self::project_out_before_bias`]'s result with the bias added, in `dtype`: what
    /// [`Self::forward`] returns.
    pub fn add_out_bias(&self, y: &Tensor, dtype: DType) -> Result<Tensor> {
        ops::bias_cast(y, self.out_bias(), dtype)
    }

    /// [`Self::forward`] without the output projection's bias (see
    /// [`Self::project_out_before_bias`]).
    pub fn forward_before_out_bias(&self, x: &Tensor) -> Result<Tensor> {
        self.project_out_before_bias(&self.attend(&self.qkv_projection(x)?)?)
    }
}
