//! The memory-bound operations of a DiT block around its matmuls, each one fused pass on the
//! GPU (`kernels/block_ops.cu`) and the same maths as candle ops everywhere else.
//!
//! Every function takes the fused kernel only on CUDA and only when no input records autograd
//! history (the kernels are forward-only); otherwise it runs the candle composite, which is
//! also the CPU reference the GPU checks compare against. The composites are the exact op
//! sequences the model used before these kernels existed, so CPU results are unchanged.
//!
//! Besides saving passes over memory, the kernels take their layouts as scalar arguments:
//! candle's strided kernels copy dims and strides from the host on every call, which a CUDA
//! graph cannot replay (see [`crate::runtime::graph`]).
//!
//! Modulation vectors come from the adaLN output `mods` `(N, C·D)` f32: chunk `c` is columns
//! `c·D .. (c+1)·D` (official `adaLN_modulation(c).chunk(C, dim=1)`).
use crate::nn::ops::contiguous;
#[cfg(feature = "cuda")]
use crate::nn::ops::fused;
use candle_core::{DType, Result, Tensor, D};

/// The row kernels hold a row in one warp's registers, four elements at a time.
#[cfg(feature = "cuda")]
pub(super) fn rows_fit(d: usize) -> bool {
    d.is_multiple_of(4) && d <= 2048
}

fn chunk(mods: &Tensor, c: usize, d: usize) -> Result<Tensor> {
    mods.narrow(1, c * d, d)?.unsqueeze(1)
}

/// `modulate(LayerNorm(x), shift, scale) = LN(x) * (1 + scale) + shift` with LayerNorm
/// without affine parameters (eps 1e-6, official `norm1`/`norm2`/`norm_final`), shift and
/// scale chunks `shift`/`scale` of `mods`. x `(N, T, D)` f32 → `(N, T, D)` in `out_dtype`.
pub fn ln_modulate(x: &Tensor, mods: &Tensor, shift: usize, scale: usize, out_dtype: DType) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    #[cfg(feature = "cuda")]
    if fused(&[x, mods]) && rows_fit(d) {
        return super::cuda::ln_modulate(x, mods, shift * d, scale * d, 1e-6, out_dtype);
    }
    if in_training(&[x, mods], x) && x.dtype() == DType::F32 && mods.dtype() == DType::F32 {
        // training: one op with its own backward (the composite's values on the CPU)
        return super::adaln_grad::ln_modulate(x, mods, shift, scale, 1e-6, out_dtype);
    }
    let norm = crate::nn::layer_norm(x, None, None, 1e-6)?;
    let scale = (chunk(mods, scale, d)? + 1.0)?;
    norm.broadcast_mul(&scale)?.broadcast_add(&chunk(mods, shift, d)?)?.to_dtype(out_dtype)
}

/// Whether the training ops ([`super::adaln_grad`], [`super::attention_grad`]) serve a call:
/// some of its tensors `ts` are in an autograd graph (untracked tensors keep the composites, the
/// CPU reference) and its activations `a` are `(N, T, ·)`. Each op names the dtypes it takes.
fn in_training(ts: &[&Tensor], a: &Tensor) -> bool {
    ts.iter().any(|t| t.track_op()) && a.rank() == 3
}

/// `x + gate * (y + bias)`: the gated residual of a DiT block, gate = chunk `gate` of `mods`.
/// x `(N, T, D)` f32, y `(N, T, D)` any float dtype, bias `(D)` in y's dtype → f32.
pub fn gated_residual(x: &Tensor, y: &Tensor, bias: Option<&Tensor>, mods: &Tensor, gate: usize) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    #[cfg(feature = "cuda")]
    if fused(&[x, y, mods]) && bias.is_none_or(|b| fused(&[b])) && d % 4 == 0 {
        return super::cuda::gated_residual(x, y, bias, mods, gate * d);
    }
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y.clone(),
    };
    if in_training(&[x, &y, mods], x) && x.dtype() == DType::F32 && mods.dtype() == DType::F32 && matches!(y.dtype(), DType::F32 | DType::BF16) {
        // training: one op with its own backward that reads a bf16 y as it is (the values of the
        // composite below, which widens y first)
        return super::adaln_grad::gated_add(x, &y, &mods.narrow(1, gate * d, d)?);
    }
    let y = y.to_dtype(x.dtype())?;
    x + y.broadcast_mul(&chunk(mods, gate, d)?)?
}

/// [`gated_residual`] then [`ln_modulate`] of its result, one pass on the GPU: returns
/// `x_mid = x + gate * (y + bias)` (f32) and `modulate(LN(x_mid), shift, scale)` in
/// `out_dtype` (the step from a block's attention to its MLP; `y` is the attention's output
/// projection before its bias, which this pass adds).
#[allow(clippy::too_many_arguments)]
pub fn residual_ln_modulate(x: &Tensor, y: &Tensor, bias: Option<&Tensor>, mods: &Tensor, gate: usize, shift: usize, scale: usize, out_dtype: DType) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if fused(&[x, y, mods]) && bias.is_none_or(|b| fused(&[b])) && matches!(y.dtype(), DType::F32 | DType::BF16) && rows_fit(x.dim(D::Minus1)?) {
        let d = x.dim(D::Minus1)?;
        return super::cuda::residual_ln_modulate(x, y, bias, mods, (gate * d, shift * d, scale * d), 1e-6, out_dtype);
    }
    let x_mid = gated_residual(x, y, bias, mods, gate)?;
    let h = ln_modulate(&x_mid, mods, shift, scale, out_dtype)?;
    Ok((x_mid, h))
}

/// The flash-attention form's per-head LayerNorms on q and k (affine, f32 weights), after
/// which q and k are rounded to float16 as the official `.half()`.
#[derive(Debug, Clone, Copy)]
pub struct QkNormWeights<'a> {
    pub q_weight: &'a Tensor,
    pub q_bias: &'a Tensor,
    pub k_weight: &'a Tensor,
    pub k_bias: &'a Tensor,
    pub eps: f64,
}

/// Splits a packed `qkv` projection `(B, T, 3·H·hd)` (without its bias) into heads: adds
/// `bias` `(3·H·hd)`, applies the optional q/k norm, and returns q, k, v as `(B, H, T, hd)`
/// contiguous tensors in qkv's dtype.
pub fn split_qkv(qkv: &Tensor, bias: Option<&Tensor>, norm: Option<QkNormWeights>, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, d3) = qkv.dims3()?;
    let hd = d3 / 3 / heads;
    #[cfg(feature = "cuda")]
    if fused(&[qkv]) && bias.is_none_or(|b| fused(&[b])) && matches!(qkv.dtype(), DType::BF16 | DType::F32) && hd.is_multiple_of(2) && hd <= 256 {
        return super::cuda::split_qkv(qkv, bias, norm, heads);
    }
    let qkv = match bias {
        Some(bias) => qkv.broadcast_add(bias)?,
        None => qkv.clone(),
    };
    let dtype = qkv.dtype();
    let qkv = qkv.reshape((b, t, 3, heads, hd))?;
    let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2); // (B, T, H, hd)
    let (mut q, mut k, v) = (part(0)?, part(1)?, part(2)?);
    if let Some(n) = norm {
        // LayerNorm in f32, then `.half()`, then the matmul dtype.
        let ln = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
            crate::nn::layer_norm(&x.to_dtype(DType::F32)?, Some(w), Some(b), n.eps)?.to_dtype(DType::F16)?.to_dtype(dtype)
        };
        q = ln(&q, n.q_weight, n.q_bias)?;
        k = ln(&k, n.k_weight, n.k_bias)?;
    }
    let heads = |x: Tensor| x.transpose(1, 2)?.contiguous();
    Ok((heads(q)?, heads(k)?, heads(v)?))
}

/// `softmax(scale · s)` over the last axis, computed in f32 (as SDPA and flash attention
/// accumulate it) and returned in s's dtype.
pub fn softmax_scaled(s: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(&[s]) && matches!(s.dtype(), DType::BF16 | DType::F32) {
        return super::cuda::softmax_scaled(s, scale);
    }
    crate::nn::softmax_last_dim(&(s * scale)?.to_dtype(DType::F32)?)?.to_dtype(s.dtype())
}

/// Scaled dot-product attention `softmax(scale · q kᵀ) v` over q, k, v `(B, H, T, hd)`,
/// returned with the heads merged, `(B, T, H·hd)`, in v's dtype. On the GPU, for bf16 with an
/// even head size up to 128, one fused kernel (FlashAttention-2's online softmax, no T×T
/// scores in memory); elsewhere two matmuls around [`softmax_scaled`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_masked(q, k, v, scale, false)
}

/// [`attention`] with a causal mask (query i sees keys 0..=i), a decoder's prefill: on the GPU
/// the same fused kernel, which also skips the key tiles past a block's last query.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_masked(q, k, v, scale, true)
}

fn attention_masked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    #[cfg(feature = "cuda")]
    if fused(&[q, k, v]) && q.dtype() == DType::BF16 && hd % 2 == 0 && hd <= 128 {
        return super::cuda::flash_attention(q, k, v, scale, causal);
    }
    let mut scores = q.matmul(&k.t()?)?;
    if causal {
        let mask = crate::nn::causal_mask(t, k.dim(2)?, 0, q.device())?.to_dtype(scores.dtype())?;
        scores = scores.broadcast_add(&mask)?;
    }
    let att = softmax_scaled(&scores, scale)?;
    contiguous(&att.matmul(v)?.transpose(1, 2)?)?.reshape((b, t, h * hd))
}

/// Attention straight from the packed `qkv` projection `(B, T, 3·H·hd)` (without its bias):
/// [`split_qkv`] then [`attention`], returned as `(B, T, H·hd)` in qkv's dtype. On the GPU, for
/// bf16 with a head size that is a multiple of 8 up to 128 (every DiT-MoE size), the attention
/// kernel reads q, k and v from the projection itself, so there is no split pass, and folds
/// the biases in and applies the q/k norm with the CPU path's roundings (see `flash_attn_body`
/// in `kernels/block_ops.cu`).
pub fn qkv_attention(qkv: &Tensor, bias: Option<&Tensor>, norm: Option<QkNormWeights>, heads: usize, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let hd = qkv.dim(candle_core::D::Minus1)? / 3 / heads.max(1);
        if fused(&[qkv]) && bias.is_none_or(|b| fused(&[b])) && qkv.dtype() == DType::BF16 && hd.is_multiple_of(8) && hd <= 128 {
            return super::cuda::qkv_attention(qkv, bias, norm, heads, scale);
        }
    }
    if let (Some(b), None) = (bias, &norm) {
        if in_training(&[qkv, b], qkv) && matches!(qkv.dtype(), DType::F32 | DType::BF16) && b.dtype() == qkv.dtype() {
            // training: one autograd node for the split and the attention (f32, or bf16 under
            // mixed precision)
            return super::attention_grad::qkv_attention(qkv, b, heads, scale);
        }
    }
    let (q, k, v) = split_qkv(qkv, bias, norm, heads)?;
    attention(&q, &k, &v, scale)
}
