//! The routed SwiGLU experts as one differentiable op, so that training runs the fused
//! kernels too (forward and backward) instead of a dense mixture or candle's row scatters.
//!
//! [`routed_swiglu`] computes `out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])` with the
//! grouped kernels (the forward of [`super::moe_forward_fused`] without router and shared
//! expert) and records one autograd node over `(x, w, expert weights)`. Its backward is the
//! MegaBlocks/DeepSpeed-MoE one, on the same permutation:
//! - `dy[r] = w[slot(r)] * dout[token(r)]`, `dw[slot(r)] = <dout[token(r)], y[r]>`;
//! - `dh = dy · down[e]` and the SwiGLU derivative `dg = dh * u * silu'(g)`, `du = dh * silu(g)`
//!   (grouped GEMMs over the transposed weights; `g`, `u` are recomputed, not stored);
//! - `dx[t] = sum_j (dg · gate[e] + du · up[e])[inv[t*k + j]]`, the deterministic [`combine`]
//!   with unit weights;
//! - `d gate[e] = dg_eᵀ x_e`, `d up[e] = du_eᵀ x_e`, `d down[e] = dy_eᵀ h_e`
//!   ([`grouped_weight_grad`]).
//!
//! candle's custom ops see storages, not tensors, and the kernels take tensors; so the value is
//! computed first and the op's forward only hands it over (one `[S, D]` copy), while the
//! backward works on the tensors autograd gives it.
use super::{combine, gather_rows, grouped_gate_up_gather, grouped_matmul, grouped_weight_grad, ExpertWeights, Permutation};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// The routed experts' weighted sum, `[S, D]`: `x` `[S, D]`, `weights` `[S, k]` (the router's
/// gate weights, any float dtype), `experts` stacked `[E, I, D]`/`[E, D, I]` in `x`'s dtype,
/// `perm` the expert sort of the ids the weights belong to. Differentiable in `x`, `weights`
/// and the three weight stacks whenever any of them is in an autograd graph.
pub fn routed_swiglu(x: &Tensor, weights: &Tensor, experts: &ExpertWeights, perm: &Permutation) -> Result<Tensor> {
    if weights.dims() != [perm.tokens()?, perm.k] {
        candle_core::bail!("routed_swiglu: weights {:?} are not [{}, {}] like the permutation's slots", weights.dims(), perm.tokens()?, perm.k)
    }
    let h = grouped_gate_up_gather(x, perm, &experts.gate, &experts.up)?;
    let y = grouped_matmul(&h, &perm.offsets, &experts.down)?;
    let value = combine(&y, perm, weights, None)?;
    let ExpertWeights { gate, up, down } = experts;
    if ![x, weights, gate, up, down].iter().any(|t| t.track_op()) {
        return Ok(value);
    }
    // One tensor for the three stacks (candle's custom ops take up to three inputs); `cat` of
    // the flattened stacks passes each its slice of the gradient.
    let packed = Tensor::cat(&[gate.flatten_all()?, up.flatten_all()?, down.flatten_all()?], 0)?;
    let (e, i, d) = gate.dims3()?;
    x.apply_op3(weights, &packed, RoutedSwigluGrad { perm: perm.clone(), dims: (e, i, d), value })
}

struct RoutedSwigluGrad {
    perm: Permutation,
    /// `(E, I, D)`
    dims: (usize, usize, usize),
    /// The forward value, computed by the kernels before the op was applied.
    value: Tensor,
}

impl RoutedSwigluGrad {
    /// A copy of the value's storage, the op's output (the inputs' storages are not read: the
    /// value was computed from the same tensors). `combine` returns a fresh contiguous tensor,
    /// so its whole storage is the value.
    fn value_storage(&self) -> Result<(candle_core::Storage, Shape)> {
        let (storage, layout) = self.value.storage_and_layout();
        Ok((storage.try_clone(layout)?, self.value.shape().clone()))
    }

    /// `[E, I, D]` gate, `[E, I, D]` up, `[E, D, I]` down, viewed from the packed vector.
    fn unpack(&self, packed: &Tensor) -> Result<ExpertWeights> {
        let (e, i, d) = self.dims;
        let n = e * i * d;
        Ok(ExpertWeights {
            gate: packed.narrow(0, 0, n)?.reshape((e, i, d))?,
            up: packed.narrow(0, n, n)?.reshape((e, i, d))?,
            down: packed.narrow(0, 2 * n, n)?.reshape((e, d, i))?,
        })
    }
}

impl CustomOp3 for RoutedSwigluGrad {
    fn name(&self) -> &'static str {
        "routed-swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.value_storage()? {
            (candle_core::Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("routed_swiglu: the value is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.value_storage()? {
            (candle_core::Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("routed_swiglu: the value is not on the GPU"),
        }
    }

    fn bwd(&self, x: &Tensor, weights: &Tensor, packed: &Tensor, _: &Tensor, dout: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (perm, off) = (&self.perm, &self.perm.offsets);
        let (s, k) = weights.dims2()?;
        let w = self.unpack(&packed.detach())?;
        let (x, weights, dout) = (x.detach(), weights.detach(), dout.detach().to_dtype(x.dtype())?);
        let t = |w: &Tensor| w.transpose(1, 2)?.contiguous();

        // Recompute the expert activations (cheaper in memory than keeping [R, I] twice).
        let xs = gather_rows(&x, perm)?;
        let g = grouped_matmul(&xs, off, &w.gate)?;
        let u = grouped_matmul(&xs, off, &w.up)?;
        let sig = candle_nn::ops::sigmoid(&g)?;
        let act = (&g * &sig)?; // silu(g)
        let h = (&act * &u)?;
        let y = grouped_matmul(&h, off, &w.down)?;

        // The combine `out[t] = sum_j w[t, j] y[inv[t*k + j]]`.
        let dout_rows = gather_rows(&dout, perm)?;
        let w_rows = weights.flatten_all()?.index_select(&perm.order, 0)?.to_dtype(x.dtype())?;
        let dy = dout_rows.broadcast_mul(&w_rows.unsqueeze(1)?)?;
        let dw_rows = (&dout_rows.to_dtype(DType::F32)? * y.to_dtype(DType::F32)?)?.sum(1)?;
        let dweights = dw_rows.index_select(&perm.inv, 0)?.reshape((s, k))?.to_dtype(weights.dtype())?;

        // The experts: h = silu(g) * u, g = x gateᵀ, u = x upᵀ, y = h downᵀ.
        let dh = grouped_matmul(&dy, off, &t(&w.down)?)?;
        let du = (&dh * &act)?;
        // silu'(g) = sig * (1 + g * (1 - sig))
        let dsilu = (&sig * ((&g * sig.affine(-1.0, 1.0)?)? + 1.0)?)?;
        let dg = ((&dh * &u)? * dsilu)?;
        let dxs = (grouped_matmul(&dg, off, &t(&w.gate)?)? + grouped_matmul(&du, off, &t(&w.up)?)?)?;
        let ones = Tensor::ones((s, k), DType::F32, x.device())?;
        let dx = combine(&dxs, perm, &ones, None)?;

        let dgate = grouped_weight_grad(&dg, &xs, off)?;
        let dup = grouped_weight_grad(&du, &xs, off)?;
        let ddown = grouped_weight_grad(&dy, &h, off)?;
        let dpacked = Tensor::cat(&[dgate.flatten_all()?, dup.flatten_all()?, ddown.flatten_all()?], 0)?;
        Ok((Some(dx), Some(dweights), Some(dpacked)))
    }
}
