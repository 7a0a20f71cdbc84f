//! Expert parallelism: a layer's routed experts spread over the ranks of a [`Communicator`],
//! each rank owning a contiguous block of them, with every other weight replicated.
//!
//! The dispatch is Megatron-Core's `MoEAlltoAllTokenDispatcher` (dropless, variable splits),
//! on the engine's own pieces:
//! 1. the stable counting sort of the local tokens' slots by expert
//!    ([`kernels::permute_by_expert`]); since rank `p` owns experts `[p E/P, (p+1) E/P)`, the
//!    expert-major rows are already rank-major chunks, one per destination;
//! 2. an all-gather of every rank's per-expert counts, from which every rank knows its send
//!    splits, its receive splits and the expert of every row it will receive (Megatron's
//!    `preprocess`, which all-gathers `num_local_tokens_per_expert`);
//! 3. the all-to-all of the token rows; the received rows are source-major, and within a
//!    source's chunk expert-major;
//! 4. the local experts on them: [`kernels::routed_experts`] with the received rows as tokens,
//!    one slot each, gate weight 1. Its stable sort of the rows by local expert is Megatron's
//!    `sort_chunks_by_idxs` (source-major to expert-major), its grouped GEMMs are the
//!    single-device ones, and its combine with unit weights puts the outputs back in received
//!    order (exact: `0 + 1 · y`);
//! 5. the reverse all-to-all with the splits swapped, which returns each row to its source in
//!    the order it left;
//! 6. the weighted combine on the source rank, `out[t] = sum_j w[t, j] · y[row(t, j)]`, where
//!    the router's gate weights live (Megatron's `unpermute` with `probs`), so their gradient
//!    never crosses ranks.
//!
//! Backward: each all-to-all is an autograd node ([`AllToAllV`]) whose backward is the reverse
//! all-to-all with swapped splits (DeepSpeed-MoE's `_AllToAll.backward`, Megatron's
//! `all_to_all` autograd function): the rows' gradients go back where the rows came from, so
//! an expert's weight gradient on its owner sums the contributions of every rank's tokens, and
//! a token's gradient on its own rank sums those of its experts wherever they live. Every rank
//! runs the same two backward collectives in the same order (autograd reaches the return
//! exchange before the dispatch exchange, which feeds it), including a rank with no tokens and
//! a rank that receives no rows: both exchanges are recorded whenever the layer's tokens are in
//! an autograd graph, which the replicated layers before them make the same on every rank.
//!
//! The router, the shared expert and every other weight are replicated: their gradients cover
//! the rank's own tokens, and data parallelism sums them over the ranks
//! ([`super::all_reduce_gradients`]).
//!
//! Two other dispatches serve the same call ([`Dispatch`]): the capacity-padded static
//! exchange for CUDA-graph replay ([`super::static_capacity`]) and, as the baseline the
//! benchmarks measure against, vLLM's all-gather + reduce-scatter ([`super::all_gather`]).
use super::static_capacity::StaticCapacity;
use super::Communicator;
use crate::moe::kernels::{self, ExpertStacks, GemmConfig};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// How the tokens reach the experts' ranks and come back.
#[derive(Debug, Clone)]
pub enum Dispatch {
    /// Megatron-Core's dropless all-to-all with variable splits (the module docs): one host
    /// read per layer for the splits.
    AllToAll,
    /// The all-to-all with every (source rank, expert) chunk padded to a fixed capacity: equal,
    /// host-known splits and no host read, for CUDA-graph replay
    /// ([`super::static_capacity`]).
    StaticCapacity(StaticCapacity),
    /// vLLM's naive expert parallelism: every rank all-gathers every token, runs its experts on
    /// them and reduce-scatters the partial sums ([`super::all_gather`]). The baseline.
    AllGather,
}

/// A plan's expert-parallel setting: the group the MoE layers spread their experts over
/// (`crate::plan::ExecutionPlan::expert_parallel`) and how tokens are exchanged.
#[derive(Debug, Clone)]
pub struct ExpertParallel {
    pub comm: Arc<dyn Communicator>,
    pub dispatch: Dispatch,
}

impl ExpertParallel {
    /// The dropless all-to-all dispatch over `comm`.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm, dispatch: Dispatch::AllToAll }
    }

    /// The same group with the static dispatch: at most `capacity` slots per (source rank,
    /// expert) and every layer, checked by [`Self::check_capacity`].
    pub fn with_static_capacity(self, capacity: usize) -> Self {
        Self { dispatch: Dispatch::StaticCapacity(StaticCapacity::new(capacity)), ..self }
    }

    /// The same group with the all-gather + reduce-scatter dispatch (the baseline).
    pub fn with_all_gather(self) -> Self {
        Self { dispatch: Dispatch::AllGather, ..self }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The global ids of the experts this rank owns, `[r E/P, (r+1) E/P)` of `num_experts`
    /// (contiguous, as Megatron-Core places them); an error unless `P` divides `E`.
    pub fn local_experts(&self, num_experts: usize) -> Result<Range<usize>> {
        let (p, r) = (self.world_size(), self.rank());
        if p == 0 || !num_experts.is_multiple_of(p) {
            bail!("expert parallelism: {num_experts} experts do not split evenly over {p} ranks (the expert count must be a multiple of the expert-parallel size)")
        }
        let per = num_experts / p;
        Ok(r * per..(r + 1) * per)
    }

    /// The static dispatch's overflow check over every layer that ran since the group was
    /// made (each layer's latest call): an error naming the layer, expert, source rank, count
    /// and capacity when any (source rank, expert) got more slots than the capacity; Ok for the
    /// other dispatches, which never drop. The caller picks the point (after a forward, after
    /// a CUDA-graph replay): it reads the counts back to the host. A collective: every rank
    /// calls it, and every rank gets the same error.
    pub fn check_capacity(&self) -> Result<()> {
        match &self.dispatch {
            Dispatch::StaticCapacity(c) => c.check(self.comm.as_ref()),
            _ => Ok(()),
        }
    }

    /// The routed experts' weighted sum for this rank's tokens, the experts spread over the
    /// group. `layer` names the calling layer (the static dispatch's overflow report), `x`
    /// `[S, d]` in the experts' dtype, `ids` `[S, k]` global expert ids below `num_experts`,
    /// `weights` `[S, k]` the gate weights, `local` this rank's experts
    /// ([`Self::local_experts`]) stacked. Returns the sum `[S, d]` in f32 and the slots of this
    /// rank's tokens per expert, `[num_experts]` u32. Differentiable in `x`, `weights` and
    /// `local`, as [`kernels::routed_experts`] is. A collective: every rank of the group calls
    /// it for the same layer.
    #[allow(clippy::too_many_arguments)]
    pub fn routed_experts(&self, layer: &str, x: &Tensor, ids: &Tensor, weights: &Tensor, local: &ExpertStacks, num_experts: usize, gemm: &GemmConfig) -> Result<(Tensor, Tensor)> {
        let mine = self.local_experts(num_experts)?;
        match &self.dispatch {
            Dispatch::AllToAll => self.all_to_all(x, ids, weights, local, mine, num_experts, gemm),
            Dispatch::StaticCapacity(c) => c.routed_experts(&self.comm, layer, x, ids, weights, local, mine, num_experts, gemm),
            Dispatch::AllGather => super::all_gather::routed_experts(&self.comm, x, ids, weights, local, mine, num_experts, gemm),
        }
    }

    /// The dropless all-to-all dispatch (the module docs' steps).
    #[allow(clippy::too_many_arguments)]
    fn all_to_all(&self, x: &Tensor, ids: &Tensor, weights: &Tensor, local: &ExpertStacks, mine: Range<usize>, num_experts: usize, gemm: &GemmConfig) -> Result<(Tensor, Tensor)> {
        let (p, per) = (self.world_size(), mine.len());
        let k = ids.dim(1)?;
        let dev = x.device();
        let perm = kernels::permute_by_expert(&ids.to_dtype(DType::U32)?, num_experts)?;
        // Expert parallelism needs the splits on the host (Megatron-Core synchronises here
        // too): the per-expert counts, from the sort's offsets.
        let offsets: Vec<u32> = perm.offsets.to_vec1()?;
        let counts: Vec<usize> = offsets.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
        let all = self.comm.all_gather_counts(&counts)?;
        let block = |c: &[usize], q: usize| c[q * per..(q + 1) * per].iter().sum::<usize>();
        let send_counts: Vec<usize> = (0..p).map(|q| block(&counts, q)).collect();
        let recv_counts: Vec<usize> = all.iter().map(|c| block(c, self.rank())).collect();

        // the token of each expert-major row
        let order: Vec<u32> = perm.order.to_vec1()?;
        let rows = Tensor::from_vec(order.iter().map(|&slot| slot / k as u32).collect::<Vec<_>>(), order.len(), dev)?;
        let recv = all_to_all_v(&self.comm, &x.index_select(&rows, 0)?, &send_counts, &recv_counts)?;

        // Each received row's local expert: per source, its chunk is expert-major.
        let local_ids: Vec<u32> = all.iter().flat_map(|c| (0..per).flat_map(move |j| std::iter::repeat_n(j as u32, c[mine.start + j]))).collect();
        let n = local_ids.len();
        let local_perm = kernels::permute_by_expert(&Tensor::from_vec(local_ids, (n, 1), dev)?, per)?;
        let y = local_rows(&recv, local, &local_perm, gemm)?;
        let back = all_to_all_v(&self.comm, &y, &recv_counts, &send_counts)?;

        let out = weighted_combine(&back, &perm.inv, weights)?;
        let expert_counts = Tensor::from_vec(counts.iter().map(|&c| c as u32).collect::<Vec<_>>(), num_experts, dev)?;
        Ok((out, expert_counts))
    }
}

/// The local experts on rows that arrived from the ranks: [`kernels::routed_experts`] with the
/// rows as tokens, one slot each, gate weight 1. Its stable sort by local expert (`perm`) is
/// Megatron's `sort_chunks_by_idxs`, and its combine with unit weights puts the outputs back
/// in the rows' order, exactly (`0 + 1 · y`). Every dispatch runs its experts through it.
pub(super) fn local_rows(rows: &Tensor, local: &ExpertStacks, perm: &kernels::Permutation, gemm: &GemmConfig) -> Result<Tensor> {
    let unit = Tensor::ones((rows.dim(0)?, 1), DType::F32, rows.device())?;
    kernels::routed_experts(rows, &unit, local, perm, gemm)
}

/// The weighted combine on the tokens' rank, in f32: `out[t] = sum_j w[t, j] ·
/// rows[slot_rows[t k + j]]`, the slots summed in order (Megatron's `unpermute` with `probs`;
/// the router's gate weights live here, so their gradient never crosses ranks). `rows`
/// `[n, d]`, `slot_rows` `[S k]` u32, `weights` `[S, k]` → `[S, d]`.
pub(super) fn weighted_combine(rows: &Tensor, slot_rows: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (s, k) = weights.dims2()?;
    let d = rows.dim(1)?;
    let slots = rows.to_dtype(DType::F32)?.index_select(slot_rows, 0)?.reshape((s, k, d))?;
    slots.broadcast_mul(&weights.to_dtype(DType::F32)?.unsqueeze(2)?)?.sum(1)
}

/// [`Communicator::all_to_all_v`] as an autograd node: when `send` is in a graph, the result's
/// gradient flows back through the reverse exchange ([`AllToAllV`]).
pub fn all_to_all_v(comm: &Arc<dyn Communicator>, send: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor> {
    let value = comm.all_to_all_v(&send.detach(), send_counts, recv_counts)?;
    if !send.track_op() {
        return Ok(value);
    }
    send.apply_op1(AllToAllV { comm: comm.clone(), send_counts: send_counts.to_vec(), recv_counts: recv_counts.to_vec(), value })
}

/// The variable-split all-to-all's autograd node: its backward sends the received rows'
/// gradients back to their sources, the same exchange with the splits swapped.
struct AllToAllV {
    comm: Arc<dyn Communicator>,
    send_counts: Vec<usize>,
    recv_counts: Vec<usize>,
    /// The exchanged rows, received before the node was made ([`crate::runtime::precomputed`]):
    /// the exchange is a collective on tensors, and a custom op's forward sees storages.
    value: Tensor,
}

impl CustomOp1 for AllToAllV {
    fn name(&self) -> &'static str {
        "all-to-all-v"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::runtime::precomputed::cpu_value("all_to_all_v", &self.value)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::runtime::precomputed::cuda_value("all_to_all_v", &self.value)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.comm.all_to_all_v(&grad.detach(), &self.recv_counts, &self.send_counts)?))
    }
}
