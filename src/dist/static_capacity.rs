//! The capacity-padded static expert-parallel dispatch, for CUDA-graph replay at inference.
//!
//! The dropless dispatch ([`super::expert_parallel`]) reads the per-expert counts back to the
//! host and all-gathers them, because its all-to-all splits follow the routing; a step that
//! reads the device cannot be replayed as a CUDA graph. Here every (source rank, expert) pair
//! owns a fixed chunk of `C` rows, Megatron-Core's `moe_pad_expert_input_to_capacity` (its
//! `MoEAlltoAllTokenDispatcher` with `moe_expert_capacity_factor`, where every split is
//! `capacity · local experts`): each rank sends `C · E/P` rows to every peer, the splits are
//! known on the host before the step, and nothing is read back. On each rank:
//! 1. the stable counting sort of the slots by expert, on the device
//!    ([`kernels::permute_by_expert`]);
//! 2. the padded send buffer `[E C, d]`: row `e C + i` is the `i`-th slot of expert `e` for
//!    `i < count(e)`, zeros after it, gathered on the device from the sort's offsets (the
//!    indices come from constants made once per layout, [`PaddedLayout`]);
//! 3. the all-to-all with equal splits; the received rows are source-major, then
//!    local-expert-major, `C` per (source, expert);
//! 4. the local experts on every received row, padding included (zeros in, discarded out),
//!    sorted by a constant permutation ([`super::expert_parallel::local_rows`]);
//! 5. the reverse all-to-all, which returns the `[E C, d]` buffer in the order it left;
//! 6. the weighted combine: slot `t k + j` of expert `e`, the `r`-th of its expert, reads row
//!    `e C + r`.
//!
//! Where Megatron drops the slots past the capacity, this mode refuses them: slot `r >= C`
//! gets gate weight 0 in the combine (no row of another expert is read), and every call
//! records its per-expert counts on the device, per layer. [`StaticCapacity::check`], called
//! where the caller chooses (after a forward, after a graph replay; the records of a captured
//! graph are the replay's buffers), reads them back once, all-gathers every rank's worst
//! (expert, count) per layer and fails on every rank with the same message when one exceeds
//! `C`. Without overflow the output is the dropless dispatch's: the same rows reach the same
//! experts and the combine sums the same outputs in the same order. Only the experts' GEMMs
//! see more rows (the padding), which may round differently where a matmul picks its kernel
//! by row count, as the CPU's does (within 4e-7 of the dropless dispatch in
//! `tests/suite/expert_parallel.rs`).
//!
//! Backward: every step is an autograd op (the gathers, the masks, [`super::all_to_all_v`] and
//! the grouped experts), so training runs it too; the padding rows' gradients are zero.
use super::expert_parallel::{all_to_all_v, local_rows, weighted_combine};
use super::Communicator;
use crate::moe::kernels::{self, ExpertStacks, GemmConfig, Permutation};
use candle_core::{bail, DType, DeviceLocation, Result, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

/// The static dispatch's setting and state, shared by every layer of a plan (clones share the
/// records and the constants).
#[derive(Debug, Clone)]
pub struct StaticCapacity {
    /// Rows per (source rank, expert).
    capacity: usize,
    /// Each layer's latest per-expert slot counts `[E]` u32, on the device, by layer name.
    records: Arc<Mutex<BTreeMap<String, Tensor>>>,
    /// The index constants, by (experts, top-k, world size, device).
    layouts: Arc<Mutex<HashMap<LayoutKey, Arc<PaddedLayout>>>>,
}

/// Experts, top-k, world size and device: what a [`PaddedLayout`]'s constants depend on.
type LayoutKey = (usize, usize, usize, DeviceLocation);

/// The constants of one padded layout, uploaded once (a host-to-device copy cannot be captured
/// in a CUDA graph, so the first, eager call makes them).
#[derive(Debug)]
struct PaddedLayout {
    /// `[E C]` u32: the expert of each padded send row, `r / C`.
    expert: Tensor,
    /// `[E C]` u32: its index within the expert's chunk, `r % C`.
    index: Tensor,
    /// The received rows' sort by local expert, `(r / C) % (E / P)`.
    local_perm: Permutation,
    /// `[1]` u32: `C`, the combine's overflow test.
    capacity: Tensor,
    /// `[1]` u32: `k`, slot to token.
    top_k: Tensor,
}

impl StaticCapacity {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, records: Default::default(), layouts: Default::default() }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn layout(&self, num_experts: usize, k: usize, world: usize, dev: &candle_core::Device) -> Result<Arc<PaddedLayout>> {
        let mut layouts = self.layouts.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (num_experts, k, world, dev.location());
        if let Some(l) = layouts.get(&key) {
            return Ok(l.clone());
        }
        let (c, per) = (self.capacity as u32, (num_experts / world) as u32);
        let rows = (num_experts * self.capacity) as u32;
        let u32s = |v: Vec<u32>| Tensor::from_vec(v, rows as usize, dev);
        let local: Vec<u32> = (0..rows).map(|r| (r / c) % per).collect();
        let layout = Arc::new(PaddedLayout {
            expert: u32s((0..rows).map(|r| r / c).collect())?,
            index: u32s((0..rows).map(|r| r % c).collect())?,
            local_perm: kernels::permute_by_expert(&Tensor::from_vec(local, (rows as usize, 1), dev)?, per as usize)?,
            capacity: Tensor::new(&[c], dev)?,
            top_k: Tensor::new(&[k as u32], dev)?,
        });
        layouts.insert(key, layout.clone());
        Ok(layout)
    }

    /// [`super::ExpertParallel::routed_experts`] on the padded layout (the module docs' steps).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn routed_experts(&self, comm: &Arc<dyn Communicator>, layer: &str, x: &Tensor, ids: &Tensor, weights: &Tensor, local: &ExpertStacks, mine: Range<usize>, num_experts: usize, gemm: &GemmConfig) -> Result<(Tensor, Tensor)> {
        if self.capacity == 0 {
            bail!("expert parallelism: a static capacity of 0 rows per (rank, expert) holds no token")
        }
        let (p, per) = (comm.world_size(), mine.len());
        let (s, k) = ids.dims2()?;
        let d = x.dim(1)?;
        let dev = x.device();
        let l = self.layout(num_experts, k, p, dev)?;
        let ids = ids.to_dtype(DType::U32)?;
        let perm = kernels::permute_by_expert(&ids, num_experts)?;
        let counts = (perm.offsets.narrow(0, 1, num_experts)? - perm.offsets.narrow(0, 0, num_experts)?)?;
        self.records.lock().unwrap_or_else(PoisonError::into_inner).insert(layer.to_string(), counts.clone());

        // The padded send rows: row (e, i) takes sorted row offsets[e] + i while i < count(e).
        // A padding row's index is masked to 0 (in range whenever there is a slot) and its
        // value to zeros. Without tokens, all padding, still made from `x`: the exchanges'
        // backward runs on every rank ([`super::expert_parallel`]).
        let send = match s {
            0 => Tensor::cat(&[x, &Tensor::zeros((num_experts * self.capacity, d), x.dtype(), dev)?], 0)?,
            _ => {
                let filled = l.index.lt(&counts.index_select(&l.expert, 0)?)?;
                let sorted_row = ((perm.offsets.index_select(&l.expert, 0)? + &l.index)? * filled.to_dtype(DType::U32)?)?;
                let token = perm.order.index_select(&sorted_row, 0)?.broadcast_div(&l.top_k)?;
                let rows = x.index_select(&token, 0)?;
                filled.unsqueeze(1)?.broadcast_as(rows.shape())?.where_cond(&rows, &rows.zeros_like()?)?
            }
        };
        let split = vec![per * self.capacity; p];
        let recv = all_to_all_v(comm, &send, &split, &split)?;
        let y = local_rows(&recv, local, &l.local_perm, gemm)?;
        let back = all_to_all_v(comm, &y, &split, &split)?;

        // Slot t k + j of expert e, the r-th of its expert, reads row e C + r; a slot past the
        // capacity (r >= C) reads its expert's first row with weight 0, and the check fails.
        let flat = ids.flatten_all()?;
        let r = (&perm.inv - perm.offsets.index_select(&flat, 0)?)?;
        let kept = r.broadcast_lt(&l.capacity)?.to_dtype(DType::U32)?;
        let slot_rows = (flat.affine(self.capacity as f64, 0.0)? + (r * &kept)?)?;
        let weights = (weights.to_dtype(DType::F32)? * kept.reshape((s, k))?.to_dtype(DType::F32)?)?;
        Ok((weighted_combine(&back, &slot_rows, &weights)?, counts))
    }

    /// See [`super::ExpertParallel::check_capacity`].
    pub(super) fn check(&self, comm: &dyn Communicator) -> Result<()> {
        let records: Vec<(String, Tensor)> = self.records.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(n, t)| (n.clone(), t.clone())).collect();
        // one read of every layer's counts; per layer, the worst expert as (count, expert)
        let worst: Vec<usize> = match records.is_empty() {
            true => Vec::new(),
            false => {
                let counts: Vec<Vec<u32>> = Tensor::stack(&records.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>(), 0)?.to_vec2()?;
                counts
                    .iter()
                    .flat_map(|c| {
                        let (e, n) = c.iter().enumerate().fold((0, 0), |best, (e, &n)| if n > best.1 { (e, n) } else { best });
                        [n as usize, e]
                    })
                    .collect()
            }
        };
        let all = comm.all_gather_counts(&worst)?;
        let over: Vec<String> = records
            .iter()
            .enumerate()
            .flat_map(|(i, (name, _))| {
                let name = if name.is_empty() { "<root>" } else { name.as_str() };
                all.iter().enumerate().filter(move |(_, w)| w[2 * i] > self.capacity).map(move |(src, w)| format!("layer {name}: expert {} got {} slots from rank {src}", w[2 * i + 1], w[2 * i]))
            })
            .collect();
        if !over.is_empty() {
            bail!("expert parallelism: the static capacity of {} slots per (rank, expert) overflowed ({}); raise it or use the dropless dispatch", self.capacity, over.join("; "))
        }
        Ok(())
    }
}
