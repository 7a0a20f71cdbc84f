//! The attention of a DiT block from its packed `qkv` projection as one differentiable op, for
//! training (f32, or bf16 under mixed precision; no q/k norm): `softmax(scale · q kᵀ) v` with
//! q, k, v the heads of `qkv + bias`, merged back to `(N, T, D)`.
//!
//! As a composite, the head split alone (reshape, narrow, squeeze, transpose, contiguous for
//! each of q, k and v) put a dozen nodes into the autograd graph, and candle's backward
//! accumulates every node's gradient into a fresh zero tensor: a fill and an add over the
//! activations per node, plus the bias add's broadcast. Here the forward runs the same kernels
//! on detached tensors ([`super::block_ops::split_qkv`], the scaled softmax, two matmuls) and
//! keeps q, k, v and the probabilities P; the backward is the textbook one:
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = scale · P (dP - Σ dP P)`, `dQ = dS K`, `dK = dSᵀ Q`,
//! the three merged back into `qkv`'s layout, and the bias gradient as its column sums.
//!
//! In bf16 the matmuls run in bf16 (f32 accumulation) as SDPA's do under autocast, and the
//! softmax and its backward in f32 (P is kept as the bf16 the `P V` product read); the bias
//! gradient is summed over the rows in f32. As a composite, a bf16 block kept the scores in bf16
//! and f32 and the probabilities in f32 and bf16 for its backward, `(N, H, T, T)` each.
use super::block_ops::{softmax_scaled, split_qkv};
use crate::nn::ops::contiguous;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `(N, T, 3·H·hd)` projection and its `(3·H·hd)` bias → `(N, T, H·hd)`; f32 or bf16 (both in
/// one dtype), differentiable in both.
pub fn qkv_attention(qkv: &Tensor, bias: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (_, _, d3) = qkv.dims3()?;
    if !matches!(qkv.dtype(), DType::F32 | DType::BF16) || bias.dtype() != qkv.dtype() || bias.dims() != [d3] || heads == 0 || d3 % (3 * heads) != 0 {
        bail!("qkv_attention: qkv {:?} {:?}, bias {:?} {:?} with {heads} heads do not fit", qkv.dims(), qkv.dtype(), bias.dims(), bias.dtype())
    }
    let (q, k, v) = split_qkv(&qkv.detach(), Some(&bias.detach()), None, heads)?;
    let p = softmax_scaled(&q.matmul(&k.t()?)?, scale)?;
    let (b, h, t, hd) = q.dims4()?;
    let value = contiguous(&p.matmul(&v)?.transpose(1, 2)?)?.reshape((b, t, h * hd))?;
    qkv.apply_op2(bias, AttentionGrad { q, k, v, p, scale, value })
}

struct AttentionGrad {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The softmax probabilities `(N, H, T, T)`.
    p: Tensor,
    scale: f64,
    /// The forward value, computed before the op was applied ([`crate::runtime::precomputed`]).
    value: Tensor,
}

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "qkv-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::runtime::precomputed::cpu_value("qkv_attention", &self.value)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::runtime::precomputed::cuda_value("qkv_attention", &self.value)
    }

    fn bwd(&self, _qkv: &Tensor, _bias: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, h, t, hd) = self.q.dims4()?;
        let d_o = contiguous(&dout.to_dtype(self.q.dtype())?.reshape((b, t, h, hd))?.transpose(1, 2)?)?; // (B, H, T, hd)
        let dv = self.p.t()?.matmul(&d_o)?;
        let dp = d_o.matmul(&self.v.t()?)?;
        let dtype = self.p.dtype();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let ds = crate::nn::row_grad::softmax_rows_backward(&f32(&self.p)?, &f32(&dp)?, self.scale)?.to_dtype(dtype)?;
        let dq = ds.matmul(&self.k)?;
        let dk = ds.t()?.matmul(&self.q)?;
        // (B, H, T, hd) x3 -> (B, T, 3, H, hd) = qkv's layout
        let merged = Tensor::stack(&[dq, dk, dv], 2)?; // (B, H, 3, T, hd)
        let d_qkv = contiguous(&merged.permute((0, 3, 2, 1, 4))?)?.reshape((b, t, 3 * h * hd))?;
        let d_bias = d_qkv.reshape((b * t, 3 * h * hd))?.to_dtype(DType::F32)?.sum(0)?.to_dtype(dtype)?;
        Ok((Some(d_qkv), Some(d_bias)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The attention as the candle composite it replaces: the reference for the op.
    fn composite(qkv: &Tensor, bias: &Tensor, heads: usize, scale: f64) -> Tensor {
        let (n, t, d3) = qkv.dims3().unwrap();
        let (q, k, v) = split_qkv(qkv, Some(bias), None, heads).unwrap();
        let att = candle_nn::ops::softmax(&(q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap(), candle_core::D::Minus1).unwrap();
        att.matmul(&v).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((n, t, d3 / 3)).unwrap()
    }

    /// Relative L2 distance of x from y.
    fn rel(x: &Tensor, y: &Tensor) -> f32 {
        let d = (x - y).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        d / y.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
    }

    #[test]
    fn value_and_gradients_match_the_composite() {
        let dev = Device::Cpu;
        let (n, t, heads, hd) = (3, 16, 5, 8);
        let qkv0 = Tensor::randn(0f32, 1.0, (n, t, 3 * heads * hd), &dev).unwrap();
        let bias0 = Tensor::randn(0f32, 0.5, 3 * heads * hd, &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (n, t, heads * hd), &dev).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let run = |fused: bool| {
            let (qkv, bias) = (Var::from_tensor(&qkv0).unwrap(), Var::from_tensor(&bias0).unwrap());
            let out = if fused {
                qkv_attention(qkv.as_tensor(), bias.as_tensor(), heads, scale).unwrap()
            } else {
                composite(qkv.as_tensor(), bias.as_tensor(), heads, scale)
            };
            let g = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            (out, g.get(qkv.as_tensor()).unwrap().clone(), g.get(bias.as_tensor()).unwrap().clone())
        };
        let (a, b) = (run(true), run(false));
        assert!(rel(&a.0, &b.0) < 1e-6, "value {}", rel(&a.0, &b.0));
        assert!(rel(&a.1, &b.1) < 1e-5, "d qkv {}", rel(&a.1, &b.1));
        assert!(rel(&a.2, &b.2) < 1e-5, "d bias {}", rel(&a.2, &b.2));
    }

    /// Mixed precision: the bf16 op against the f32 composite on the same values, within the
    /// project's bf16 tolerance (1e-2 relative).
    #[test]
    fn bf16_matches_the_f32_composite_within_bf16_rounding() {
        let dev = Device::Cpu;
        let (n, t, heads, hd) = (2, 32, 4, 16);
        let qkv0 = Tensor::randn(0f32, 1.0, (n, t, 3 * heads * hd), &dev).unwrap();
        let bias0 = Tensor::randn(0f32, 0.5, 3 * heads * hd, &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (n, t, heads * hd), &dev).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        let run = |dtype: DType| {
            let (qkv, bias) = (Var::from_tensor(&qkv0.to_dtype(dtype).unwrap()).unwrap(), Var::from_tensor(&bias0.to_dtype(dtype).unwrap()).unwrap());
            let out = if dtype == DType::BF16 {
                qkv_attention(qkv.as_tensor(), bias.as_tensor(), heads, scale).unwrap()
            } else {
                composite(qkv.as_tensor(), bias.as_tensor(), heads, scale)
            };
            assert_eq!(out.dtype(), dtype);
            let g = (out.to_dtype(DType::F32).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |x: &Var| {
                let g = g.get(x.as_tensor()).unwrap();
                assert_eq!(g.dtype(), dtype, "gradients in the parameters' dtype");
                g.to_dtype(DType::F32).unwrap()
            };
            (out.to_dtype(DType::F32).unwrap(), grad(&qkv), grad(&bias))
        };
        let (a, b) = (run(DType::BF16), run(DType::F32));
        assert!(rel(&a.0, &b.0) < 1e-2, "value {}", rel(&a.0, &b.0));
        assert!(rel(&a.1, &b.1) < 1e-2, "d qkv {}", rel(&a.1, &b.1));
        assert!(rel(&a.2, &b.2) < 1e-2, "d bias {}", rel(&a.2, &b.2));
    }

    #[test]
    fn mismatched_bias_is_an_error() {
        let dev = Device::Cpu;
        let qkv = Tensor::zeros((1, 4, 24), DType::F32, &dev).unwrap();
        let bias = Tensor::zeros(23, DType::F32, &dev).unwrap();
        assert!(qkv_attention(&qkv, &bias, 2, 1.0).unwrap_err().to_string().contains("qkv_attention"));
    }
}
