//! How one rank of a data-parallel (and possibly expert-parallel) training run works with the
//! others: the pieces both trainers (`ditmoe train`, `ditmoe lm train`) share.
//!
//! - **Layout.** The plan's [`crate::plan::DataParallel`], or expert parallelism over several
//!   ranks, whose group then is the data-parallel group (`EP = P`). With `EP < P` the ranks form
//!   Megatron-Core's layout (`parallel_state.initialize_model_parallel`): expert-parallel groups
//!   of consecutive ranks, the ranks holding the same experts an expert-data-parallel group.
//! - **Batches.** Every rank draws the global batch from the single-device stream and keeps its
//!   `r`-th slice of rows ([`Parallel::slice`]), as `DistributedSampler` hands rank `r` every
//!   `P`-th index, here contiguous so that rank 0's rows are the first of the `P = 1` batch.
//! - **Gradients.** A rank's loss is scaled by `1 / P` ([`Parallel::share`]), so the sum of the
//!   ranks' gradients is the gradient of the global mean (PyTorch DDP averages instead; the sum
//!   of pre-scaled gradients is the same number). Replicated weights' gradients are summed over
//!   every rank in one flat all-reduce (DDP's bucket, [`crate::dist::all_reduce_gradients`]); a
//!   split expert's over Megatron-Core's expert-data-parallel group, which with `EP = P` is the
//!   owner alone: the expert-parallel all-to-all's backward has already summed every rank's
//!   tokens into it ([`Parallel::reduce_gradients`]).
//! - **Clipping.** The global norm, the replicated gradients counted once and every expert once
//!   (Megatron-Core's `get_grad_norm_fp32` over the model-parallel group), the same on every
//!   rank, so every rank takes the same optimizer step ([`Parallel::global_norm_sq`]).
//! - **Checkpoints.** The single-device format whatever the layout: expert-parallel rank 0
//!   gathers its group's experts under their global names before rank 0 writes
//!   ([`Parallel::gather_experts`]), and every rank reads its slice back by global name, so a
//!   checkpoint written at any `P` resumes at any other. A gather (rather than a file per rank)
//!   keeps the checkpoint code, its atomic `state.json` and its damage checks single-device; its
//!   cost is rank 0 holding every expert for the moment of a save, and every rank reading the
//!   whole file on resume.
//! - **Initialisation.** A seeded initialisation draws the whole model's stream on every rank,
//!   the experts held elsewhere into host placeholders dropped at once
//!   ([`Parallel::absent_experts`]), so every layout starts from the `P = 1` weights.
use crate::dist::{all_reduce_gradients, Communicator};
use crate::plan::ExecutionPlan;
use crate::train::kernels::foreach::sum_of_squares;
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use std::ops::Range;
use std::sync::Arc;

/// See the module docs.
pub struct Parallel {
    /// Every rank (PyTorch DDP's process group): the batch slices and the replicated weights'
    /// gradients.
    dp: Arc<dyn Communicator>,
    /// The expert-parallel group, when the MoE layers split their experts over several ranks.
    ep: Option<Arc<dyn Communicator>>,
    /// Megatron-Core's expert-data-parallel group (the ranks holding this rank's experts),
    /// when the experts are split over fewer ranks than `dp`.
    expert_dp: Option<Arc<dyn Communicator>>,
    /// Under expert parallelism, per MoE layer: its experts' name prefix (`…<experts>.`) and
    /// this rank's global ids there.
    split: Vec<(String, Range<usize>)>,
    /// Per gradient, in the order the trainer hands them over, whether it is a split expert's
    /// ([`Self::set_gradient_order`]): decided once per run, read every step.
    expert_grads: Vec<bool>,
}

/// A routed expert's tensor name split around its global id, `<head><id>.<rest>` (the head
/// may start with an optimizer moment's `m.` or `v.`).
struct ExpertName<'a> {
    head: &'a str,
    id: usize,
    rest: &'a str,
    /// The ids this rank holds in the expert's layer.
    local: Range<usize>,
}

impl ExpertName<'_> {
    fn with_id(&self, id: usize) -> String {
        format!("{}{id}.{}", self.head, self.rest)
    }
}

impl Parallel {
    /// The plan's layout, checked; None for one process.
    pub fn of_plan(plan: &ExecutionPlan) -> Result<Option<Self>> {
        let ep = plan.expert_parallel.as_ref().map(|e| e.comm.clone()).filter(|c| c.world_size() > 1);
        let (dp, expert_dp) = match (&plan.data_parallel, &ep) {
            (Some(d), _) => (d.comm.clone(), d.expert_data_parallel.clone()),
            (None, Some(e)) => (e.clone(), None),
            (None, None) => return Ok(None),
        };
        let (p, r) = (dp.world_size(), dp.rank());
        match (&ep, &expert_dp) {
            (None, Some(_)) => bail!("data parallelism: an expert-data-parallel group without expert parallelism (the experts are then replicated over every rank)"),
            (Some(e), None) if e.world_size() != p || e.rank() != r => bail!(
                "data parallelism over {p} ranks with expert parallelism over {} needs the expert-data-parallel group (`DataParallel::with_expert_data_parallel`), or the same group for both",
                e.world_size()
            ),
            (Some(e), Some(g)) if e.world_size() * g.world_size() != p || e.rank() != r % e.world_size() || g.rank() != r / e.world_size() => bail!(
                "data parallelism: rank {r} of {p} is expert-parallel rank {} of {} and expert-data-parallel rank {} of {}; the layout is Megatron-Core's, expert-parallel groups of consecutive ranks (rank r is expert-parallel rank r % EP and expert-data-parallel rank r / EP, P = EP · EDP)",
                e.rank(),
                e.world_size(),
                g.rank(),
                g.world_size()
            ),
            _ => {}
        }
        if p == 1 && ep.is_none() {
            return Ok(None);
        }
        Ok(Some(Self { dp, ep, expert_dp, split: Vec::new(), expert_grads: Vec::new() }))
    }

    /// Refuses a batch of `rows` that does not split into equal slices; `field` names it (a
    /// config field, with its context).
    pub fn check_divides(&self, rows: usize, field: &str) -> Result<()> {
        let p = self.dp.world_size();
        if !rows.is_multiple_of(p) {
            bail!("{field} {rows} does not split evenly over {p} data-parallel ranks")
        }
        Ok(())
    }

    /// Whether the MoE layers split their experts over several ranks (then saving, exporting
    /// and sampling are collectives).
    pub fn splits_experts(&self) -> bool {
        self.ep.is_some()
    }

    /// Rank 0 writes the run's files.
    pub fn writes(&self) -> bool {
        self.dp.rank() == 0
    }

    /// Records a MoE layer whose routed experts are named `<prefix><global id>.…` and of which
    /// this rank holds `local` (under expert parallelism, every MoE layer).
    pub fn add_split_layer(&mut self, prefix: String, local: Range<usize>) {
        self.split.push((prefix, local));
    }

    fn expert_name<'a>(&self, name: &'a str) -> Option<ExpertName<'a>> {
        self.split.iter().find_map(|(prefix, local)| {
            let at = name.find(prefix.as_str())? + prefix.len();
            let (id, rest) = name[at..].split_once('.')?;
            Some(ExpertName { head: &name[..at], id: id.parse().ok()?, rest, local: local.clone() })
        })
    }

    fn is_split_expert(&self, name: &str) -> bool {
        self.ep.is_some() && self.expert_name(name).is_some()
    }

    /// Placeholders in host memory for the experts other ranks hold, so that a seeded
    /// initialisation over `vars` and them, sorted by name, draws the `P = 1` stream.
    pub fn absent_experts(&self, vars: &[(String, Var)]) -> Result<Vec<(String, Var)>> {
        let mut out = Vec::new();
        for (name, var) in vars {
            let Some(e) = self.expert_name(name).filter(|e| e.id == e.local.start) else { continue };
            let total = e.local.len() * self.ep.as_ref().map_or(1, |c| c.world_size());
            for id in (0..total).filter(|id| !e.local.contains(id)) {
                out.push((e.with_id(id), Var::zeros(var.shape(), var.dtype(), &Device::Cpu)?));
            }
        }
        Ok(out)
    }

    /// This rank's share of the global batch's losses, `1 / P`.
    pub fn share(&self) -> f64 {
        1.0 / self.dp.world_size() as f64
    }

    /// This rank's rows of a global batch (its `r`-th of `P` equal slices along dim 0).
    pub fn slice(&self, batch: &Tensor) -> Result<Tensor> {
        let per = batch.dim(0)? / self.dp.world_size();
        batch.narrow(0, self.dp.rank() * per, per)
    }

    /// The sums over every rank of scalar tensors, on the host (the logged global means, from
    /// each rank's share).
    pub fn sum_scalars(&self, values: &[Tensor]) -> Result<Vec<f32>> {
        self.dp.all_reduce_sum(&Tensor::stack(values, 0)?)?.to_vec1::<f32>()
    }

    /// Per MoE layer, the expert counts of the global batch.
    pub fn sum_counts(&self, counts: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let mut sums = self.sum_over_ranks(&counts.concat())?.into_iter();
        Ok(counts.iter().map(|c| sums.by_ref().take(c.len()).collect()).collect())
    }

    /// Every rank's `counts`, summed element by element (one count all-gather).
    pub fn sum_over_ranks(&self, counts: &[usize]) -> Result<Vec<usize>> {
        let all = self.dp.all_gather_counts(counts)?;
        Ok((0..counts.len()).map(|i| all.iter().map(|rank| rank[i]).sum()).collect())
    }

    /// The parameters whose gradients [`Self::reduce_gradients`] and [`Self::global_norm_sq`]
    /// will take, in that order (after every [`Self::add_split_layer`]).
    pub fn set_gradient_order<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        self.expert_grads = names.into_iter().map(|n| self.is_split_expert(n)).collect();
    }

    fn check_gradient_count(&self, n: usize) -> Result<()> {
        if n != self.expert_grads.len() {
            bail!("data parallelism: {n} gradients for the {} parameters of `set_gradient_order`", self.expert_grads.len())
        }
        Ok(())
    }

    /// The gradients, in [`Self::set_gradient_order`]'s order, summed: the replicated weights'
    /// over every rank (one flat all-reduce), the experts' over the expert-data-parallel group
    /// (or not at all when each expert has one owner).
    pub fn reduce_gradients(&self, grads: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.check_gradient_count(grads.len())?;
        let mut slots = Vec::with_capacity(grads.len());
        let (mut replicated, mut experts) = (vec![], vec![]);
        for (&expert, g) in self.expert_grads.iter().zip(grads) {
            slots.push((expert, if expert { experts.len() } else { replicated.len() }));
            if expert { experts.push(g) } else { replicated.push(g) }
        }
        let replicated = all_reduce_gradients(&*self.dp, &replicated)?;
        let experts = match &self.expert_dp {
            Some(g) => all_reduce_gradients(&**g, &experts)?,
            None => experts,
        };
        Ok(slots.into_iter().map(|(expert, i)| if expert { experts[i].clone() } else { replicated[i].clone() }).collect())
    }

    /// The squared global norm of reduced gradients (in [`Self::set_gradient_order`]'s order):
    /// the replicated ones (equal on every rank) counted once, the split experts' summed over
    /// the expert-parallel group (each expert once).
    pub fn global_norm_sq(&self, grads: &[Tensor]) -> Result<f32> {
        self.check_gradient_count(grads.len())?;
        let (mut replicated, mut experts) = (vec![], vec![]);
        for (g, &expert) in grads.iter().zip(&self.expert_grads) {
            if expert { experts.push(g.clone()) } else { replicated.push(g.clone()) }
        }
        let mut sq = sum_of_squares(&replicated)?;
        if let Some(ep) = &self.ep {
            let local = Tensor::new(&[sum_of_squares(&experts)?], replicated.first().or(experts.first()).map_or(&Device::Cpu, |t| t.device()))?;
            sq += ep.all_reduce_sum(&local)?.to_vec1::<f32>()?[0];
        }
        Ok(sq)
    }

    /// `tensors` (weights, their EMA, or their AdamW moments) with every split expert under its
    /// global name: expert-parallel rank 0 of the group that holds data-parallel rank 0 gathers
    /// its group's experts (one variable-split all-to-all that sends every rank's experts, flat,
    /// to it) and returns everything; the other ranks of that group return None, as do the
    /// ranks of the other groups, which gather nothing (they hold the same experts). Without
    /// expert parallelism, `tensors` on every rank. A collective under expert parallelism.
    pub fn gather_experts(&self, tensors: Vec<(String, Tensor)>) -> Result<Option<Vec<(String, Tensor)>>> {
        let Some(ep) = &self.ep else { return Ok(Some(tensors)) };
        if self.expert_dp.as_ref().is_some_and(|g| g.rank() != 0) {
            return Ok(None);
        }
        let (mut out, mut experts) = (vec![], vec![]);
        for (name, t) in tensors {
            match self.expert_name(&name).map(|e| ((e.head.to_string(), e.rest.to_string(), e.id - e.local.start), e.local.len())) {
                Some((key, per)) => experts.push((key, per, t)),
                None => out.push((name, t)),
            }
        }
        // one order on every rank: by layer and tensor, then by the expert's place in the block
        experts.sort_by(|a, b| a.0.cmp(&b.0));
        let flat = experts.iter().map(|(_, _, t)| t.to_dtype(DType::F32)?.flatten_all()).collect::<Result<Vec<_>>>()?;
        let dev = flat.first().map_or(Device::Cpu, |t| t.device().clone());
        let flat = match flat.is_empty() {
            true => Tensor::zeros((1, 0), DType::F32, &dev)?,
            false => Tensor::cat(&flat, 0)?.unsqueeze(0)?,
        };
        let p = ep.world_size();
        let mut send = vec![0; p];
        send[0] = 1;
        let recv = vec![usize::from(ep.rank() == 0); p];
        let rows = ep.all_to_all_v(&flat, &send, &recv)?;
        if ep.rank() != 0 {
            return Ok(None);
        }
        for q in 0..p {
            let row = rows.get(q)?;
            let mut at = 0;
            for ((head, rest, j), per, t) in &experts {
                let n = t.elem_count();
                out.push((format!("{head}{}.{rest}", q * per + j), row.narrow(0, at, n)?.reshape(t.shape())?.to_dtype(t.dtype())?));
                at += n;
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Some(out))
    }

    /// Rank 0's `flag`, on every rank (a stop that every rank must take together).
    pub fn rank0_decides(&self, flag: bool, dev: &Device) -> Result<bool> {
        let mine = f32::from(u8::from(flag && self.dp.rank() == 0));
        Ok(self.dp.all_reduce_sum(&Tensor::new(&[mine], dev)?)?.to_vec1::<f32>()?[0] > 0.0)
    }
}
