//! The routed experts as one differentiable op, so that training runs the fused kernels too
//! (forward and backward) instead of a dense mixture or candle's row scatters.
//!
//! [`routed_experts`] computes `out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])` with the
//! grouped kernels over the expert sort `perm`, for both expert forms of the engine
//! ([`ExpertStacks`]: DiT-MoE's SwiGLU experts, ProMoE's GELU MLPs with biases), and records one
//! autograd node over `(x, w, expert weights)`. Its backward is the MegaBlocks/DeepSpeed-MoE
//! one, on the same permutation:
//! - the combine: `dy[r] = w[slot(r)] * dout[token(r)]`, `dw[slot(r)] = <dout[token(r)], y[r]>`;
//! - the expert MLP on its rows: grouped GEMMs over the transposed weight stacks for the data
//!   gradients, the activation's derivative in between (activations are recomputed, not
//!   stored), [`grouped_weight_grad`] for the weight gradients and per-expert row sums for the
//!   biases (both on the host-read offsets: the backward's one synchronisation);
//! - `dx[t] = sum_j dxs[inv[t*k + j]]`, the deterministic [`combine`] with unit weights.
//!
//! candle's custom ops see storages, not tensors, and the kernels take tensors; so the value is
//! computed first and the op's forward only hands it over (one `[S, D]` copy), while the
//! backward works on the tensors autograd gives it.
use super::expert_act::{swiglu_backward, GeluKind};
use super::{combine, gather_rows, grouped_gate_up_gather, grouped_matmul, grouped_weight_grad, ExpertWeights, GemmConfig, Permutation};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Stacked weights of E GELU experts (ProMoE's `MoeMLP`, DeepSpeed-MoE's Megatron MLP;
/// `nn.Linear` layout per expert): expert `e` computes
/// `down[e] · gelu(up[e] · x + up_bias[e]) + down_bias[e]`.
#[derive(Debug, Clone)]
pub struct GeluExpertWeights {
    /// `[E, I, D]`
    pub up: Tensor,
    /// `[E, I]`
    pub up_bias: Tensor,
    /// `[E, D, I]`
    pub down: Tensor,
    /// `[E, D]`
    pub down_bias: Tensor,
    pub activation: GeluKind,
}

/// The routed experts of a layer, stacked, in one of the engine's two expert forms.
#[derive(Debug, Clone)]
pub enum ExpertStacks {
    /// DiT-MoE: `down(silu(gate x) * up x)`, no biases.
    Swiglu(ExpertWeights),
    /// ProMoE, DeepSpeed-MoE: `down(gelu(up x + b_up)) + b_down`.
    Gelu(GeluExpertWeights),
}

#[derive(Debug, Clone, Copy)]
enum Form {
    Swiglu,
    Gelu(GeluKind),
}

impl ExpertStacks {
    /// The weights' dtype, in which the grouped GEMMs run.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Swiglu(w) => w.gate.dtype(),
            Self::Gelu(w) => w.up.dtype(),
        }
    }

    fn form(&self) -> Form {
        match self {
            Self::Swiglu(_) => Form::Swiglu,
            Self::Gelu(w) => Form::Gelu(w.activation),
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Self::Swiglu(w) => vec![&w.gate, &w.up, &w.down],
            Self::Gelu(w) => vec![&w.up, &w.up_bias, &w.down, &w.down_bias],
        }
    }

    fn from_tensors(form: Form, t: Vec<Tensor>) -> Self {
        let mut t = t.into_iter();
        let mut next = || t.next().expect("one tensor per stack");
        match form {
            Form::Swiglu => Self::Swiglu(ExpertWeights { gate: next(), up: next(), down: next() }),
            Form::Gelu(activation) => Self::Gelu(GeluExpertWeights { up: next(), up_bias: next(), down: next(), down_bias: next(), activation }),
        }
    }

    /// The expert outputs of the expert-sorted rows, `[R, D]` (the forward value's rows).
    fn forward(&self, x: &Tensor, perm: &Permutation, gemm: &GemmConfig) -> Result<Tensor> {
        match self {
            // the gather runs inside the gate/up GEMM's loads
            Self::Swiglu(w) => grouped_matmul(&grouped_gate_up_gather(x, perm, &w.gate, &w.up, gemm)?, &perm.offsets, &w.down, gemm),
            Self::Gelu(w) => Ok(GeluRows::new(&gather_rows(x, perm)?, w, &perm.offsets, gemm)?.y),
        }
    }
}

/// The routed experts' weighted sum, `[S, D]`: `x` `[S, D]`, `weights` `[S, k]` (the router's
/// gate weights, any float dtype), `experts` stacked in `x`'s dtype, `perm` the expert sort of
/// the ids the weights belong to. Differentiable in `x`, `weights` and every stacked tensor
/// whenever any of them is in an autograd graph. `gemm`: the plan's grouped-GEMM selection,
/// for the forward and the backward.
pub fn routed_experts(x: &Tensor, weights: &Tensor, experts: &ExpertStacks, perm: &Permutation, gemm: &GemmConfig) -> Result<Tensor> {
    if weights.dims() != [perm.tokens()?, perm.k] {
        candle_core::bail!("routed_experts: weights {:?} are not [{}, {}] like the permutation's slots", weights.dims(), perm.tokens()?, perm.k)
    }
    let value = combine(&experts.forward(x, perm, gemm)?, perm, weights, None)?;
    let stacks = experts.tensors();
    if !x.track_op() && !weights.track_op() && !stacks.iter().any(|t| t.track_op()) {
        return Ok(value);
    }
    // One tensor for the stacks (candle's custom ops take up to three inputs); `cat` of the
    // flattened stacks passes each its slice of the gradient.
    let packed = Tensor::cat(&stacks.iter().map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
    let shapes = stacks.iter().map(|t| t.shape().clone()).collect();
    x.apply_op3(weights, &packed, RoutedExpertsGrad { perm: perm.clone(), form: experts.form(), shapes, value, gemm: *gemm })
}

struct RoutedExpertsGrad {
    perm: Permutation,
    form: Form,
    /// The stacked tensors' shapes, in [`ExpertStacks::tensors`] order.
    shapes: Vec<Shape>,
    /// The forward value, computed by the kernels before the op was applied
    /// ([`crate::runtime::precomputed`]).
    value: Tensor,
    gemm: GemmConfig,
}

impl RoutedExpertsGrad {
    /// The stacks, viewed from the packed vector.
    fn unpack(&self, packed: &Tensor) -> Result<ExpertStacks> {
        let mut at = 0;
        let mut parts = Vec::with_capacity(self.shapes.len());
        for shape in &self.shapes {
            parts.push(packed.narrow(0, at, shape.elem_count())?.reshape(shape)?);
            at += shape.elem_count();
        }
        Ok(ExpertStacks::from_tensors(self.form, parts))
    }
}

/// The GELU experts on expert-sorted rows, keeping what the backward needs.
struct GeluRows {
    pre: Tensor,
    h: Tensor,
    y: Tensor,
}

impl GeluRows {
    fn new(xs: &Tensor, w: &GeluExpertWeights, offsets: &Tensor, gemm: &GemmConfig) -> Result<Self> {
        // each row's expert picks its bias rows
        let expert = expert_of_row(offsets, xs.dim(0)?)?;
        let pre = (grouped_matmul(xs, offsets, &w.up, gemm)? + w.up_bias.index_select(&expert, 0)?)?;
        let h = w.activation.apply(&pre)?;
        let y = (grouped_matmul(&h, offsets, &w.down, gemm)? + w.down_bias.index_select(&expert, 0)?)?;
        Ok(Self { pre, h, y })
    }
}

/// `[R]` u32: the expert of each expert-sorted row, the number of experts whose rows end at or
/// before it (computed on the device from the offsets).
fn expert_of_row(offsets: &Tensor, rows: usize) -> Result<Tensor> {
    let e = offsets.dim(0)? - 1;
    let r = Tensor::arange(0u32, rows as u32, offsets.device())?.unsqueeze(1)?;
    let ends = offsets.to_dtype(DType::U32)?.narrow(0, 1, e)?.unsqueeze(0)?;
    r.broadcast_ge(&ends)?.to_dtype(DType::U32)?.sum(1)
}

/// Per expert, the sum of its rows of `a` `[R, N]` → `[E, N]` (a bias gradient); host offsets.
fn expert_row_sums(a: &Tensor, offsets: &[u32]) -> Result<Tensor> {
    let ones = Tensor::ones((a.dim(0)?, 1), a.dtype(), a.device())?;
    grouped_weight_grad(&ones, a, offsets)?.squeeze(1)
}

impl CustomOp3 for RoutedExpertsGrad {
    fn name(&self) -> &'static str {
        "routed-experts"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::runtime::precomputed::cpu_value("routed_experts", &self.value)
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
        crate::runtime::precomputed::cuda_value("routed_experts", &self.value)
    }

    fn bwd(&self, x: &Tensor, weights: &Tensor, packed: &Tensor, _: &Tensor, dout: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (perm, off, gemm) = (&self.perm, &self.perm.offsets, &self.gemm);
        let grouped = |a: &Tensor, w: &Tensor| grouped_matmul(a, off, w, gemm);
        // the backward's one host read: the offsets, for the per-expert weight gradients
        let off_host: Vec<u32> = off.to_dtype(DType::U32)?.to_vec1()?;
        let wgrad = |a: &Tensor, b: &Tensor| grouped_weight_grad(a, b, &off_host);
        let (s, k) = weights.dims2()?;
        let stacks = self.unpack(&packed.detach())?;
        let (x, weights, dout) = (x.detach(), weights.detach(), dout.detach().to_dtype(x.dtype())?);
        let t = |w: &Tensor| w.transpose(1, 2)?.contiguous();
        let xs = gather_rows(&x, perm)?;
        // dy = w * dout per row: the combine's gradient towards the expert outputs
        let dy = combine_grad::rows(&dout, perm, &weights)?;

        // The expert MLP on its rows, recomputed: y and, from dy, the rows' gradient dxs and the
        // stacks' gradients (in `ExpertStacks::tensors` order).
        let (y, dxs, dstacks) = match &stacks {
            ExpertStacks::Swiglu(w) => {
                // h = silu(g) * u, g = x gateᵀ, u = x upᵀ, y = h downᵀ
                let g = grouped(&xs, &w.gate)?;
                let u = grouped(&xs, &w.up)?;
                let dh = grouped(&dy, &t(&w.down)?)?;
                let (Some(h), dg, du) = swiglu_backward(&g, &u, &dh, true)? else { candle_core::bail!("routed_experts: swiglu_backward gave no h") };
                let y = grouped(&h, &w.down)?;
                let dxs = (grouped(&dg, &t(&w.gate)?)? + grouped(&du, &t(&w.up)?)?)?;
                let dstacks = vec![wgrad(&dg, &xs)?, wgrad(&du, &xs)?, wgrad(&dy, &h)?];
                (y, dxs, dstacks)
            }
            ExpertStacks::Gelu(w) => {
                // y = gelu(pre) downᵀ + b_down, pre = x upᵀ + b_up
                let rows = GeluRows::new(&xs, w, off, gemm)?;
                let dpre = w.activation.backward(&rows.pre, &grouped(&dy, &t(&w.down)?)?)?;
                let dxs = grouped(&dpre, &t(&w.up)?)?;
                let dstacks = vec![wgrad(&dpre, &xs)?, expert_row_sums(&dpre, &off_host)?, wgrad(&dy, &rows.h)?, expert_row_sums(&dy, &off_host)?];
                (rows.y, dxs, dstacks)
            }
        };

        // dw: each slot's gate weight scaled its expert's output row
        let dweights = combine_grad::weights(&dout, &y, perm)?.to_dtype(weights.dtype())?;
        let dx = combine(&dxs, perm, &Tensor::ones((s, k), DType::F32, x.device())?, None)?;
        let dpacked = Tensor::cat(&dstacks.iter().map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
        Ok((Some(dx), Some(dweights), Some(dpacked)))
    }
}

/// The combine's two gradients: the fused kernels for f32 and bf16 (training's dtypes), the
/// composite of gathers, products and sums for other dtypes.
mod combine_grad {
    use super::super::{combine_weight_grad, gather_rows, gather_rows_scaled, Permutation};
    use candle_core::{DType, Result, Tensor};

    fn fused(dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::BF16)
    }

    /// `w[slot(r)] * dout[token(r)]`, `[R, D]` in `dout`'s dtype.
    pub fn rows(dout: &Tensor, perm: &Permutation, weights: &Tensor) -> Result<Tensor> {
        if fused(dout.dtype()) {
            return gather_rows_scaled(dout, perm, &weights.to_dtype(DType::F32)?);
        }
        let w_rows = weights.flatten_all()?.index_select(&perm.order, 0)?.to_dtype(dout.dtype())?;
        gather_rows(dout, perm)?.broadcast_mul(&w_rows.unsqueeze(1)?)
    }

    /// `<dout[token(r)], y[r]>` at each row's slot, `[S, k]` f32.
    pub fn weights(dout: &Tensor, y: &Tensor, perm: &Permutation) -> Result<Tensor> {
        if fused(dout.dtype()) && y.dtype() == dout.dtype() {
            return combine_weight_grad(dout, y, perm);
        }
        let dw_rows = (gather_rows(dout, perm)?.to_dtype(DType::F32)? * y.to_dtype(DType::F32)?)?.sum(1)?;
        dw_rows.index_select(&perm.inv, 0)?.reshape((perm.tokens()?, perm.k))
    }
}
