//! The all-gather + reduce-scatter expert-parallel dispatch: vLLM's default expert-parallel
//! exchange (`--all2all-backend allgather_reducescatter`, `AgRsAll2AllManager` in
//! `vllm/distributed/device_communicators/all2all.py`), the baseline the all-to-all dispatch
//! is measured against (`examples/bench_ep.rs`).
//!
//! 1. every rank all-gathers every rank's tokens with their expert ids and gate weights
//!    (vLLM's `dispatch`: `all_gatherv` of the hidden states and the top-k ids and weights);
//! 2. each rank runs its own experts on the slots that chose them, over all the tokens (vLLM's
//!    `fused_moe` with an `expert_map` that skips the other ranks' experts), and sums them per
//!    token with the gate weights: a partial output for every token of the group;
//! 3. a reduce-scatter returns to each rank the sum over the ranks of its tokens' partial
//!    outputs (vLLM's `combine`: `reduce_scatterv`), in the experts' dtype as vLLM reduces its
//!    activations.
//!
//! Both collectives are the group's variable-split all-to-all ([`super::all_to_all_v`], the
//! direct algorithm, so the same wire bytes per rank as NCCL's ring): the all-gather sends a
//! rank's rows to every peer, and the reduce-scatter sends each peer its tokens' partial
//! outputs, summed on arrival in rank order. Every step is an autograd op, so the backward
//! works as well. With top-1 or top-2 routing in f32 the result is the all-to-all dispatch's
//! bit for bit: a token's terms are its (at most two) expert outputs and zeros.
use super::expert_parallel::{all_to_all_v, local_rows, weighted_combine};
use super::Communicator;
use crate::moe::kernels::{self, ExpertStacks, GemmConfig};
use candle_core::{DType, Result, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// [`super::ExpertParallel::routed_experts`] through an all-gather and a reduce-scatter (the
/// module docs' steps).
#[allow(clippy::too_many_arguments)]
pub(super) fn routed_experts(comm: &Arc<dyn Communicator>, x: &Tensor, ids: &Tensor, weights: &Tensor, local: &ExpertStacks, mine: Range<usize>, num_experts: usize, gemm: &GemmConfig) -> Result<(Tensor, Tensor)> {
    let (p, rank) = (comm.world_size(), comm.rank());
    let (s, k) = ids.dims2()?;
    let d = x.dim(1)?;
    let dev = x.device();
    // every rank's token count (vLLM's `cu_tokens_across_sp` on the host)
    let tokens: Vec<usize> = comm.all_gather_counts(&[s])?.into_iter().map(|c| c[0]).collect();
    let gather = |t: &Tensor| {
        let copies = t.unsqueeze(0)?.broadcast_as((p, s, t.dim(1)?))?.reshape((p * s, t.dim(1)?))?;
        all_to_all_v(comm, &copies, &vec![s; p], &tokens)
    };
    let x_all = gather(x)?;
    // The ids travel as f32 beside the weights (exact below 2^24): one exchange for both. The
    // weights come first: the gradient of a rank without tokens is then an empty view at
    // offset 0, which candle's gather backward (the router's) accepts.
    let routing = gather(&Tensor::cat(&[&weights.to_dtype(DType::F32)?, &ids.to_dtype(DType::F32)?], 1)?)?;
    let weights_all = routing.narrow(1, 0, k)?;
    let ids_all: Vec<u32> = routing.narrow(1, k, k)?.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;

    // this rank's slots, in slot order: their tokens and local experts
    let (mut token, mut expert) = (Vec::new(), Vec::new());
    let mut slot_rows = Vec::with_capacity(ids_all.len());
    for (slot, &e) in ids_all.iter().enumerate() {
        match mine.contains(&(e as usize)) {
            true => {
                slot_rows.push(token.len() as u32);
                token.push((slot / k) as u32);
                expert.push(e - mine.start as u32);
            }
            false => slot_rows.push(u32::MAX),
        }
    }
    let n = token.len();
    // the other ranks' slots read a zero row (row n) with their weight
    let slot_rows: Vec<u32> = slot_rows.into_iter().map(|r| r.min(n as u32)).collect();
    let perm = kernels::permute_by_expert(&Tensor::from_vec(expert, (n, 1), dev)?, mine.len())?;
    let y = local_rows(&x_all.index_select(&Tensor::from_vec(token, n, dev)?, 0)?, local, &perm, gemm)?;
    let y = Tensor::cat(&[&y, &Tensor::zeros((1, d), y.dtype(), dev)?], 0)?;
    let partial = weighted_combine(&y, &Tensor::from_vec(slot_rows, ids_all.len(), dev)?, &weights_all)?.to_dtype(x.dtype())?;

    let parts = all_to_all_v(comm, &partial, &tokens, &vec![s; p])?.to_dtype(DType::F32)?;
    let mut out = parts.narrow(0, 0, s)?;
    for q in 1..p {
        out = (out + parts.narrow(0, q * s, s)?)?;
    }
    // this rank's own slots per expert, as the other dispatches report them
    let mut counts = vec![0u32; num_experts];
    let at = tokens[..rank].iter().sum::<usize>() * k;
    for &e in &ids_all[at..at + s * k] {
        counts[e as usize] += 1;
    }
    Ok((out, Tensor::from_vec(counts, num_experts, dev)?))
}
