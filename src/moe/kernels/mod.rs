//! The MoE engine's kernels: top-k gating, token permutation, grouped expert GEMMs, combine,
//! the expert activations and the routed experts' backward.
//!
//! Every function here takes and returns candle [`Tensor`]s and works on any device:
//! * on the CPU it runs the Rust reference in [`cpu`] (the semantics below, bit for bit where
//!   the note says so);
//! * on CUDA (feature `cuda`) it runs the NVRTC-compiled kernels of `kernels/*.cu` through
//!   [`cuda`], with the same semantics and no host synchronisation: routing results such as the
//!   per-expert offsets stay on the device, and the grouped GEMM reads them there;
//! * on other devices it round-trips through the CPU reference.
//!
//! None of these functions records autograd history (they are forward-only). For training,
//! compute the differentiable parts with candle ops around the routing indices, e.g.
//! `scores = softmax(logits)`, `weights = scores.gather(ids)`, balance loss from
//! `scores.mean(0)` and [`Gating::expert_counts`].
//!
//! Shapes: `S` tokens, `D` model width, `E` routed experts, `k` experts per token,
//! `R = S * k` routed rows, `I` expert intermediate width. Slot `p = t * k + j` is token `t`'s
//! `j`-th choice.
//!
//! A typical forward pass (what [`crate::moe::MoeLayer`] runs on CUDA for inference):
//! ```ignore
//! let logits = x.matmul(&router_w.t()?)?;                   // [S, E]
//! let g = fused_topk_gating(&logits, k)?;                    // ids/weights [S, k]
//! let perm = permute_by_expert(&g.ids, n_experts)?;          // order/inv [R], offsets [E+1]
//! let h = grouped_gate_up_gather(&x, &perm, &w_gate, &w_up, &gemm)?; // [R, I] silu(gate) * up
//! let y = grouped_matmul(&h, &perm.offsets, &w_down, &gemm)?;       // [R, D]
//! let out = combine(&y, &perm, &g.weights, Some(&shared))?;  // [S, D]
//! ```
use candle_core::{DType, Device, Result, Tensor};

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod expert_act;
pub mod routed_grad;
pub use routed_grad::{routed_experts, ExpertStacks, GeluExpertWeights};

/// Output of [`fused_topk_gating`].
#[derive(Debug, Clone)]
pub struct Gating {
    /// `[S, k]` u32 expert ids, by descending router logit; ties go to the lower id.
    pub ids: Tensor,
    /// `[S, k]` f32 softmax probabilities of the chosen experts (not renormalised, as official).
    pub weights: Tensor,
    /// `[S, E]` f32 softmax over all experts.
    pub scores: Tensor,
    /// `[E]` u32: how many of the `S * k` slots chose each expert.
    pub expert_counts: Tensor,
    /// `[E]` f32: mean over tokens of `scores[:, e]` (the official `Pi`).
    pub mean_scores: Tensor,
}

/// Output of [`permute_by_expert`]: a stable counting sort of the `R = S * k` slots by expert.
#[derive(Debug, Clone)]
pub struct Permutation {
    /// `[R]` u32: the slot index (`t * k + j`) of each expert-contiguous row; within an expert the
    /// slots are ascending (tokens in order).
    pub order: Tensor,
    /// `[R]` u32: the inverse, the row of each slot (`order[inv[p]] == p`).
    pub inv: Tensor,
    /// `[E + 1]` u32: rows of expert `e` are `offsets[e] .. offsets[e + 1]`; stays on the device.
    pub offsets: Tensor,
    /// Experts per token.
    pub k: usize,
    /// Number of routed experts `E`.
    pub n_experts: usize,
}

impl Permutation {
    /// Number of routed rows `R = S * k`.
    pub fn rows(&self) -> Result<usize> {
        self.order.dim(0)
    }
    /// Number of tokens `S`.
    pub fn tokens(&self) -> Result<usize> {
        Ok(self.order.dim(0)? / self.k.max(1))
    }
}

/// Stacked weights of `E` SwiGLU experts, `nn.Linear` layout (`[out, in]` per expert):
/// expert `e` computes `down[e] · (silu(gate[e] · x) * (up[e] · x))`.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// `[E, I, D]`
    pub gate: Tensor,
    /// `[E, I, D]`
    pub up: Tensor,
    /// `[E, D, I]`
    pub down: Tensor,
}

/// One dense SwiGLU MLP (the shared expert), `nn.Linear` layout.
#[derive(Debug, Clone)]
pub struct SwigluWeights {
    /// `[I, D]`
    pub gate: Tensor,
    /// `[I, D]`
    pub up: Tensor,
    /// `[D, I]`
    pub down: Tensor,
}

/// Which tensor-core path the bf16 grouped GEMM uses on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmBackend {
    /// wgmma on sm_90 (H100/H200), mma.sync elsewhere.
    Auto,
    /// Hopper `wgmma.mma_async` (sm_90a only).
    Wgmma,
    /// `mma.sync.m16n8k16` + `ldmatrix` (sm_80+).
    MmaSync,
}

/// The grouped-GEMM kernel selection on CUDA: one options value, held by the execution plan
/// (`crate::plan::ExecutionPlan::gemm`) and passed to every grouped GEMM. `Default` is the
/// measured best on H100/H200 (`docs/design.md` says why each choice wins); the explicit
/// settings exist so that kernel tests check every kernel and benchmarks compare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmConfig {
    /// bf16 tensor-core path.
    pub backend: GemmBackend,
    /// bf16 N tile, 128 or 256, or 192 (the plain multicast kernel only; other kernels take
    /// 256); 0 = automatic.
    pub block_n: usize,
    /// bf16 pipeline depth: 3 (wgmma with N tile 128 only; two blocks per SM); 0 = automatic
    /// (4 stages for N tile 256, 5 for 128).
    pub stages: usize,
    /// bf16: persistent kernels (one block per SM walks the tiles, the load pipeline runs across
    /// tile boundaries); `None` = automatic (yes where such a kernel exists).
    pub persistent: Option<bool>,
    /// bf16 wgmma with N tile 256: clusters of two blocks sharing each weight tile through a
    /// TMA multicast (`gg_wgmma_*_n256mc`, plain projections also `gg_wgmma_plain_n192mc`);
    /// `None` = automatic.
    pub multicast: Option<bool>,
    /// Multicast kernels: A rows that are not gathered (down projections, the shared expert)
    /// come by TMA, issued by one thread, instead of by the producer warpgroup's `cp.async`;
    /// `None` = automatic (yes).
    pub tma_a: Option<bool>,
    /// Plain multicast kernels with 192-wide tiles and A by TMA: the pair shares a 128-row A
    /// tile and computes two N tiles (`gg_wgmma_plain_n192mca`) instead of sharing a weight
    /// tile over 256 rows; `None` = automatic (where it needs fewer waves of pair tiles in
    /// the worst case).
    pub split_n: Option<bool>,
    /// f32 kernel.
    pub f32_kernel: F32Kernel,
}

/// Which kernel the f32 grouped GEMM uses on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Kernel {
    /// Where the tensor-core kernels apply (sm_80+, K a multiple of 4, 16-byte aligned rows):
    /// 3xTF32; elsewhere SIMT 128.
    Auto,
    /// [`Self::Auto`] with plain TF32 on tensor cores (the plan's TF32 precision).
    AutoTf32,
    /// Tensor cores, 3xTF32 (f32-level accuracy: each operand split into two TF32 parts).
    Tf32x3,
    /// Tensor cores, plain TF32 (operands rounded to TF32, about 1e-3 relative; a third of
    /// 3xTF32's products).
    Tf32,
    /// CUDA cores, 128x128 tiles, 8x8 outputs per thread.
    Simt128,
    /// CUDA cores, the simple 64x64 kernel.
    Simt64,
}

impl Default for GemmConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl GemmConfig {
    /// Every choice automatic: the measured best for the shapes at hand.
    pub const DEFAULT: Self = Self {
        backend: GemmBackend::Auto,
        block_n: 0,
        stages: 0,
        persistent: None,
        multicast: None,
        tma_a: None,
        split_n: None,
        f32_kernel: F32Kernel::Auto,
    };

    /// The default selection for a plan's matmul precision: TF32 plans take the TF32 f32
    /// kernel, every other the f32-accurate one.
    pub fn for_precision(precision: crate::plan::Precision) -> Self {
        let f32_kernel = match precision {
            crate::plan::Precision::Tf32 => F32Kernel::AutoTf32,
            _ => F32Kernel::Auto,
        };
        Self { f32_kernel, ..Self::default() }
    }
}

fn on_cpu(t: &Tensor) -> Result<Tensor> {
    t.to_device(&Device::Cpu)
}

/// Router logits `[S, E]` (f32 or bf16; the softmax is computed in f32) → top-k gating and the
/// balance-loss statistics, in one pass (one kernel launch on CUDA).
///
/// Top-k is taken over the logits (softmax is monotonic), ids sorted by descending logit, ties
/// to the lower expert id, NaN ranked as -inf. `1 <= k <= E <= 256`.
pub fn fused_topk_gating(logits: &Tensor, k: usize) -> Result<Gating> {
    match logits.device() {
        Device::Cpu => cpu::fused_topk_gating(logits, k),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::fused_topk_gating(logits, k),
        #[allow(unreachable_patterns)]
        dev => {
            let g = cpu::fused_topk_gating(&on_cpu(logits)?, k)?;
            Ok(Gating {
                ids: g.ids.to_device(dev)?,
                weights: g.weights.to_device(dev)?,
                scores: g.scores.to_device(dev)?,
                expert_counts: g.expert_counts.to_device(dev)?,
                mean_scores: g.mean_scores.to_device(dev)?,
            })
        }
    }
}

/// [`fused_topk_gating`], then [`permute_by_expert`] of its ids: on CUDA with E <= 32 the
/// gating kernel also scans the sort's counts, so the pair is two launches.
pub fn fused_gating_permute(logits: &Tensor, k: usize) -> Result<(Gating, Permutation)> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return cuda::fused_gating_permute(logits, k);
    }
    let g = fused_topk_gating(logits, k)?;
    let p = permute_by_expert(&g.ids, logits.dim(1)?)?;
    Ok((g, p))
}

/// Stable counting sort of the slots of `ids` (`[S, k]` u32) by expert. Deterministic.
/// `E <= 1024`; ids `>= E` are not allowed (the CPU path errors, the CUDA path drops them).
pub fn permute_by_expert(ids: &Tensor, n_experts: usize) -> Result<Permutation> {
    match ids.device() {
        Device::Cpu => cpu::permute_by_expert(ids, n_experts),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::permute_by_expert(ids, n_experts),
        #[allow(unreachable_patterns)]
        dev => {
            let p = cpu::permute_by_expert(&on_cpu(ids)?, n_experts)?;
            Ok(Permutation {
                order: p.order.to_device(dev)?,
                inv: p.inv.to_device(dev)?,
                offsets: p.offsets.to_device(dev)?,
                k: p.k,
                n_experts,
            })
        }
    }
}

/// Token rows in expert-contiguous order: `out[r] = x[order[r] / k]`, `[S, D]` → `[R, D]`. Exact copy.
pub fn gather_rows(x: &Tensor, perm: &Permutation) -> Result<Tensor> {
    check_gather_rows("gather_rows", x, perm)?;
    match x.device() {
        Device::Cpu => cpu::gather_rows(x, perm),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::gather_rows(x, perm),
        #[allow(unreachable_patterns)]
        dev => cpu::gather_rows(&on_cpu(x)?, &perm_on_cpu(perm)?)?.to_device(dev),
    }
}

/// The gradient of [`combine`] (without `add`) towards the expert outputs: the token rows of
/// `dout` `[S, D]` in expert-contiguous order, each scaled by its slot's weight,
/// `dy[r] = weights[order[r]] * dout[order[r] / k]` `[R, D]` in `dout`'s dtype (f32 or bf16;
/// the product in f32, rounded once), `weights` `[S, k]` f32. The same product as gathering
/// and multiplying; one pass on CUDA.
pub fn gather_rows_scaled(dout: &Tensor, perm: &Permutation, weights: &Tensor) -> Result<Tensor> {
    check_gather_rows("gather_rows_scaled", dout, perm)?;
    check_training_dtypes("gather_rows_scaled", &[dout], &[weights])?;
    if weights.dims() != [perm.tokens()?, perm.k] {
        candle_core::bail!("gather_rows_scaled: weights {:?} are not [{}, {}]", weights.dims(), perm.tokens()?, perm.k)
    }
    match dout.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::gather_rows_scaled(dout, perm, weights),
        // the CPU reference reads any device's tensors; its result goes back to theirs
        _ => cpu::gather_rows_scaled(dout, perm, weights)?.to_dtype(dout.dtype())?.to_device(dout.device()),
    }
}

/// The gradient of [`combine`] towards its weights:
/// `dw[t, j] = <dout[t], expert_out[inv[t*k + j]]>` `[S, k]`, f32, `dout` `[S, D]`,
/// `expert_out` `[R, D]` in expert-contiguous order, both f32 or both bf16 (the products and
/// sums in f32). One warp per row on CUDA, summing in another order than the CPU's sequential
/// sum (the same maths to f32 rounding).
pub fn combine_weight_grad(dout: &Tensor, expert_out: &Tensor, perm: &Permutation) -> Result<Tensor> {
    check_gather_rows("combine_weight_grad", dout, perm)?;
    if expert_out.dims() != [perm.rows()?, dout.dim(1)?] {
        candle_core::bail!("combine_weight_grad: expert_out {:?} is not [{}, {}]", expert_out.dims(), perm.rows()?, dout.dim(1)?)
    }
    check_training_dtypes("combine_weight_grad", &[dout, expert_out], &[])?;
    match dout.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::combine_weight_grad(dout, expert_out, perm),
        _ => cpu::combine_weight_grad(dout, expert_out, perm)?.to_device(dout.device()),
    }
}

/// The training kernels' operands: `data` all f32 or all bf16 (the activations and their
/// gradients), `f32` f32 (gate weights).
fn check_training_dtypes(op: &str, data: &[&Tensor], f32: &[&Tensor]) -> Result<()> {
    let dtype = data[0].dtype();
    if !matches!(dtype, DType::F32 | DType::BF16) || data.iter().any(|t| t.dtype() != dtype) || f32.iter().any(|t| t.dtype() != DType::F32) {
        candle_core::bail!(
            "{op}: the rows must be all f32 or all bf16 and the weights f32, got {:?} and {:?}",
            data.iter().map(|t| t.dtype()).collect::<Vec<_>>(),
            f32.iter().map(|t| t.dtype()).collect::<Vec<_>>()
        )
    }
    Ok(())
}

/// Weighted combine back to token order:
/// `out[t] = add[t] + sum_{j=0..k-1} weights[t, j] * expert_out[inv[t*k + j]]`,
/// accumulated in f32 in exactly that order (fused multiply-adds, no atomics), rounded once to
/// the dtype of `expert_out`. Deterministic; CPU and CUDA agree bit for bit.
/// `expert_out` `[R, D]` in permuted order, `weights` `[S, k]` (any float dtype, used as f32),
/// `add` `[S, D]` of the same dtype as `expert_out` (e.g. the shared expert's output).
pub fn combine(expert_out: &Tensor, perm: &Permutation, weights: &Tensor, add: Option<&Tensor>) -> Result<Tensor> {
    let (r, d) = expert_out.dims2()?;
    if r != perm.rows()? {
        candle_core::bail!("combine: expert_out has {r} rows, the permutation sorts {} slots", perm.rows()?)
    }
    let (s, k) = (r / perm.k.max(1), perm.k);
    if weights.dims() != [s, k] {
        candle_core::bail!("combine: weights {:?} do not match S={s}, k={k}", weights.dims())
    }
    if let Some(a) = add {
        if a.dims() != [s, d] {
            candle_core::bail!("combine: add {:?} is not [{s}, {d}]", a.dims())
        }
    }
    match expert_out.device() {
        Device::Cpu => cpu::combine(expert_out, perm, weights, add),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::combine(expert_out, perm, weights, add),
        #[allow(unreachable_patterns)]
        dev => {
            let add = add.map(on_cpu).transpose()?;
            cpu::combine(
                &on_cpu(expert_out)?,
                &perm_on_cpu(perm)?,
                &on_cpu(weights)?,
                add.as_ref(),
            )?
            .to_device(dev)
        }
    }
}

/// Grouped GEMM over expert-contiguous rows: `out[r] = x[r] · w[e]ᵀ` for the rows of expert `e`.
/// `x` `[R, K]`, `offsets` `[E + 1]` u32, `w` `[E, N, K]` → `[R, N]`; bf16 (f32 accumulation)
/// or f32. bf16 needs `K % 8 == 0` and `N % 8 == 0`.
pub fn grouped_matmul(x: &Tensor, offsets: &Tensor, w: &Tensor, gemm: &GemmConfig) -> Result<Tensor> {
    grouped_dispatch(x, None, offsets, w, None, gemm)
}

/// The weight gradient of a grouped GEMM: `out[e] = a[rows of e]ᵀ · b[rows of e]`, `a`
/// `[R, M]`, `b` `[R, N]`, `offsets` the `E + 1` row offsets **on the host** → `[E, M, N]`
/// (zeros for an expert without rows). The reduction runs over each expert's rows, so it is
/// one matmul per expert on narrowed views; a backward reads the offsets back once for all of
/// its weight gradients (the forward keeps them on the device).
pub fn grouped_weight_grad(a: &Tensor, b: &Tensor, offsets: &[u32]) -> Result<Tensor> {
    let ((r, m), (rb, n)) = (a.dims2()?, b.dims2()?);
    if rb != r || offsets.first() != Some(&0) || offsets.last().map(|&o| o as usize) != Some(r) || offsets.windows(2).any(|w| w[1] < w[0]) {
        candle_core::bail!("grouped_weight_grad: a {:?}, b {:?} and offsets {offsets:?} do not describe one partition of the rows", a.dims(), b.dims())
    }
    let per_expert = offsets
        .windows(2)
        .map(|w| match (w[1] - w[0]) as usize {
            0 => Tensor::zeros((m, n), a.dtype(), a.device()),
            c => a.narrow(0, w[0] as usize, c)?.t()?.matmul(&b.narrow(0, w[0] as usize, c)?),
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&per_expert, 0)
}

/// Fused gate/up projection with the SwiGLU epilogue over expert-contiguous rows:
/// `h[r] = silu(x[r] · w_gate[e]ᵀ) * (x[r] · w_up[e]ᵀ)`, `x` `[R, D]`, `w_gate`/`w_up`
/// `[E, I, D]` → `[R, I]` (rounded once to the input dtype).
pub fn grouped_gate_up(
    x: &Tensor,
    offsets: &Tensor,
    w_gate: &Tensor,
    w_up: &Tensor,
    gemm: &GemmConfig,
) -> Result<Tensor> {
    grouped_dispatch(x, None, offsets, w_gate, Some(w_up), gemm)
}

/// [`grouped_gate_up`] reading the token matrix `x` `[S, D]` directly: row `r` is
/// `x[order[r] / k]` (the gather is fused into the GEMM's loads).
pub fn grouped_gate_up_gather(
    x: &Tensor,
    perm: &Permutation,
    w_gate: &Tensor,
    w_up: &Tensor,
    gemm: &GemmConfig,
) -> Result<Tensor> {
    grouped_dispatch(x, Some(perm), &perm.offsets, w_gate, Some(w_up), gemm)
}

/// All experts' SwiGLU MLPs over expert-contiguous rows `x_perm` `[R, D]`:
/// `down[e] · (silu(gate[e] · x) * (up[e] · x))` → `[R, D]`; two launches on CUDA.
pub fn grouped_swiglu(
    x_perm: &Tensor,
    offsets: &Tensor,
    w_gate: &Tensor,
    w_up: &Tensor,
    w_down: &Tensor,
    gemm: &GemmConfig,
) -> Result<Tensor> {
    let h = grouped_gate_up(x_perm, offsets, w_gate, w_up, gemm)?;
    grouped_matmul(&h, offsets, w_down, gemm)
}

/// [`grouped_swiglu`] on the token matrix `x` `[S, D]` with the row gather fused in.
pub fn grouped_swiglu_gather(
    x: &Tensor,
    perm: &Permutation,
    w_gate: &Tensor,
    w_up: &Tensor,
    w_down: &Tensor,
    gemm: &GemmConfig,
) -> Result<Tensor> {
    let h = grouped_gate_up_gather(x, perm, w_gate, w_up, gemm)?;
    grouped_matmul(&h, &perm.offsets, w_down, gemm)
}

/// A dense SwiGLU MLP `down · (silu(gate · x) * (up · x))`, `x` `[S, D]`. On CUDA it runs the
/// grouped kernels with one expert (SiLU·mul fused into the gate/up GEMM); elsewhere candle ops
/// with the same rounding (the hidden state is rounded once to the input dtype).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn swiglu_mlp(x: &Tensor, w: &SwigluWeights, gemm: &GemmConfig) -> Result<Tensor> {
    match x.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let s = x.dim(0)?;
            let offsets = cuda::dense_offsets(x.device(), s)?;
            let h = grouped_gate_up(x, &offsets, &w.gate.unsqueeze(0)?, &w.up.unsqueeze(0)?, gemm)?;
            grouped_matmul(&h, &offsets, &w.down.unsqueeze(0)?, gemm)
        }
        _ => cpu::swiglu_dense(x, &w.gate, &w.up, &w.down),
    }
}

/// The shared expert started ahead of the routing, see [`swiglu_mlp_start`].
pub enum PendingMlp {
    Ready(Tensor),
    #[cfg(feature = "cuda")]
    Beside(cuda::Beside),
}

impl PendingMlp {
    /// The output, safe to use on the main stream.
    pub fn join(self) -> Result<Tensor> {
        match self {
            PendingMlp::Ready(t) => Ok(t),
            #[cfg(feature = "cuda")]
            PendingMlp::Beside(b) => b.join(),
        }
    }
}

/// [`swiglu_mlp`] started without waiting for it: on CUDA on a second stream, where it runs
/// beside whatever the main stream does until [`PendingMlp::join`] (the MoE layer's routing);
/// elsewhere at once.
pub fn swiglu_mlp_start(x: &Tensor, w: &SwigluWeights, gemm: &GemmConfig) -> Result<PendingMlp> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return Ok(PendingMlp::Beside(cuda::swiglu_mlp_beside(x, w, gemm)?));
    }
    Ok(PendingMlp::Ready(swiglu_mlp(x, w, gemm)?))
}

/// A gather reads `x[order[r] / k]`: `x` must have the permutation's token count of rows (the
/// CUDA kernels would read past it).
fn check_gather_rows(op: &str, x: &Tensor, perm: &Permutation) -> Result<()> {
    let rows = x.dims2()?.0;
    if rows != perm.tokens()? {
        candle_core::bail!("{op}: x has {rows} rows, the permutation sorts the slots of {} tokens", perm.tokens()?)
    }
    Ok(())
}

fn perm_on_cpu(p: &Permutation) -> Result<Permutation> {
    Ok(Permutation {
        order: on_cpu(&p.order)?,
        inv: on_cpu(&p.inv)?,
        offsets: on_cpu(&p.offsets)?,
        k: p.k,
        n_experts: p.n_experts,
    })
}

#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn grouped_dispatch(
    x: &Tensor,
    gather: Option<&Permutation>,
    offsets: &Tensor,
    b0: &Tensor,
    b1: Option<&Tensor>,
    gemm: &GemmConfig,
) -> Result<Tensor> {
    let (_, kdim) = x.dims2()?;
    let (_, _, kw) = b0.dims3()?;
    if kw != kdim {
        candle_core::bail!("grouped_gemm: x has K={kdim}, weights {:?}", b0.dims())
    }
    if let Some(b1) = b1 {
        if b1.dims() != b0.dims() {
            candle_core::bail!("grouped_gemm: gate {:?} and up {:?} differ", b0.dims(), b1.dims())
        }
    }
    if let Some(p) = gather {
        check_gather_rows("grouped_gemm", x, p)?;
    }
    match x.device() {
        Device::Cpu => cpu::grouped_gemm(x, gather, offsets, b0, b1),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::grouped_gemm(x, gather, offsets, b0, b1, gemm),
        #[allow(unreachable_patterns)]
        dev => {
            let g = gather.map(perm_on_cpu).transpose()?;
            let b1 = b1.map(on_cpu).transpose()?;
            cpu::grouped_gemm(
                &on_cpu(x)?,
                g.as_ref(),
                &on_cpu(offsets)?,
                &on_cpu(b0)?,
                b1.as_ref(),
            )?
            .to_device(dev)
        }
    }
}
