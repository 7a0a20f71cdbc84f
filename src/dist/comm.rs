//! The communication abstraction: the collectives expert and data parallelism need, over candle
//! tensors, with one implementation per transport.
//!
//! The set is what Megatron-Core's `MoEAlltoAllTokenDispatcher` and DeepSpeed-MoE's `_AllToAll`
//! use, and no more: an all-gather of the per-expert token counts (the splits), a variable-split
//! all-to-all of token rows (`torch.distributed.all_to_all_single` with input and output split
//! sizes), an all-reduce of gradients (DDP) and a barrier. Each maps onto one NCCL call or group,
//! so an NCCL communicator fits the trait as it stands:
//! - [`Communicator::all_to_all_v`]: `ncclGroupStart`, per peer `p` an `ncclSend` of rows
//!   `send_offsets[p]..` and an `ncclRecv` of `recv_counts[p]` rows, `ncclGroupEnd`. Both splits
//!   are arguments because NCCL must post every receive with its size; the dispatcher knows them
//!   from the count all-gather, as Megatron passes `input_splits` and `output_splits`;
//! - [`Communicator::all_gather_counts`]: `ncclAllGather` of a vector of one length on every rank;
//! - [`Communicator::all_reduce_sum`]: `ncclAllReduce` with `ncclSum`;
//! - [`Communicator::barrier`]: an all-reduce of one element.
//!
//! Errors, not hangs: a collective whose peer has failed (returned, panicked, stopped calling)
//! returns an error on every rank that waits on it. The in-process backend
//! ([`super::LocalComm`]) detects a departed rank at once and a stalled one by a timeout; an NCCL
//! backend gets the same from `ncclCommGetAsyncError` polling and `ncclCommAbort` (the watchdog
//! of PyTorch's `ProcessGroupNCCL`).
//!
//! Every rank must call the same collectives in the same order, with matching shapes: the
//! contract of every collective library. The MoE layers keep it by construction (the same
//! layers run on every rank, and autograd walks the same graph in the same order).
use candle_core::{bail, Result, Tensor};

/// A group of `world_size` ranks that run collectives together. One value per rank; `Send +
/// Sync`, so layers can hold it in their execution plan and autograd nodes in their backward.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// The elementwise sum of `t` over every rank, the same on every rank (the summation order
    /// is the implementation's, but fixed). Every rank passes the same shape and dtype.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Every rank's `counts`, indexed by rank. Every rank passes a vector of the same length.
    fn all_gather_counts(&self, counts: &[usize]) -> Result<Vec<Vec<usize>>>;

    /// The variable-split all-to-all. `send` `[rows, d]` holds the rows for rank `p` at
    /// `send_counts[..p].sum()..`, `send_counts[p]` of them (rank-major); `recv_counts[p]` rows
    /// arrive from rank `p`, and the result `[recv_counts.sum(), d]` holds them rank-major, in
    /// the order the sender sent them. `recv_counts` must be what the peers send (a mismatch is
    /// an error where the backend can tell). The result is a fresh contiguous tensor with
    /// storage of its own (a receive buffer), never a view: autograd nodes hand it over as
    /// their value by copying its storage ([`crate::runtime::precomputed`]).
    fn all_to_all_v(&self, send: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor>;
}

/// Checks the splits of an all-to-all against the world size and the rows to send.
pub(crate) fn check_splits(comm: &dyn Communicator, send: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<()> {
    let world = comm.world_size();
    if send_counts.len() != world || recv_counts.len() != world {
        bail!("all_to_all_v: rank {} passed {} send and {} receive counts for {world} ranks", comm.rank(), send_counts.len(), recv_counts.len())
    }
    let rows = send.dims2()?.0;
    if send_counts.iter().sum::<usize>() != rows {
        bail!("all_to_all_v: rank {} sends {rows} rows but its send counts {send_counts:?} sum to {}", comm.rank(), send_counts.iter().sum::<usize>())
    }
    Ok(())
}

/// The data-parallel sum of a rank's gradients of replicated parameters (DDP's all-reduce; the
/// caller scales it to a mean where its loss is a per-rank mean). The gradients travel as one
/// flat buffer, as DDP's buckets do, so a step pays one collective; they share one dtype.
pub fn all_reduce_gradients(comm: &dyn Communicator, grads: &[Tensor]) -> Result<Vec<Tensor>> {
    if grads.is_empty() {
        return Ok(Vec::new());
    }
    let flat = Tensor::cat(&grads.iter().map(|g| g.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
    let sum = comm.all_reduce_sum(&flat)?;
    let mut at = 0;
    grads
        .iter()
        .map(|g| {
            let n = g.elem_count();
            let part = sum.narrow(0, at, n)?.reshape(g.shape());
            at += n;
            part
        })
        .collect()
}
