//! The process's place in a launched job ([`World`]): torchrun's variables read once, the
//! rendezvous joined once, and the communicators made from it: the whole job's group (data
//! parallelism) and Megatron-Core's expert-parallel and expert-data-parallel groups.
//!
//! The backend is chosen here, once, as `torch.distributed.init_process_group` picks NCCL for
//! CUDA tensors and gloo for CPU ones:
//! - a CUDA device, built with the `nccl` feature: [`super::NcclComm`] on `LOCAL_RANK`'s GPU
//!   (torchrun's convention; the CLI's `--device cuda` picks that GPU under a launch). Its
//!   sub-groups come from `ncclCommSplit` (what `ProcessGroupNCCL` does for `new_group` when the
//!   parent communicator is up), and a watchdog thread per communicator aborts it when a peer
//!   fails ([`super::nccl`]);
//! - otherwise [`TcpComm`], whose sub-groups are rendezvous of their own, led by their first
//!   ranks and found through the job's ([`TcpComm::split`]);
//! - a CUDA device without the `nccl` feature is an error for more than one process: the TCP
//!   backend would copy every token through the host and rank 0.
//!
//! The rendezvous stays the control plane of every backend: [`World::report_error`] ends the job
//! on every rank with this rank's message, instead of the peers hanging or reporting a lost
//! connection.
use super::{Communicator, Rendezvous, TcpComm, WorldInfo};
use crate::plan::ExecutionPlan;
use candle_core::{bail, Device, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// An expert-parallel group and, when it spans fewer ranks than the job, the
/// expert-data-parallel group.
type ExpertGroups = (Arc<dyn Communicator>, Option<Arc<dyn Communicator>>);

/// The process's place in a launched job; None when no torchrun variables are set.
pub struct World {
    info: WorldInfo,
    rdv: Arc<Rendezvous>,
    backend: Backend,
    /// The expert groups made so far, by expert-parallel size: making them is a collective
    /// under NCCL (`ncclCommSplit`), so each layout is made once.
    expert_groups: Mutex<HashMap<usize, ExpertGroups>>,
}

/// The whole job's communicator, of the backend the device picked.
enum Backend {
    Tcp(Arc<TcpComm>),
    #[cfg(feature = "nccl")]
    Nccl(Arc<super::NcclComm>),
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "World {{ rank: {}, world_size: {}, backend: {} }}", self.info.rank, self.info.world_size, self.backend())
    }
}

/// Groups of ranks that split a job: each group's ranks in group-rank order.
pub type Partition = Vec<Vec<usize>>;

/// Megatron-Core's layout of `world` ranks with expert parallelism over `ep`: the
/// expert-parallel groups are blocks of `ep` consecutive ranks (rank `r` is expert-parallel rank
/// `r % ep`), the expert-data-parallel groups the ranks of equal `r % ep` (rank `r / ep` there).
/// The sizes are checked.
pub fn expert_layout(world: usize, ep: usize) -> Result<(Partition, Partition)> {
    if ep == 0 || !world.is_multiple_of(ep) {
        bail!("expert parallelism over {ep} ranks: the expert-parallel size must divide the world size {world} (the job's ranks form world size / EP expert-parallel groups)")
    }
    let ep_groups = (0..world / ep).map(|g| (g * ep..(g + 1) * ep).collect()).collect();
    let edp_groups = (0..ep).map(|j| (j..world).step_by(ep).collect()).collect();
    Ok((ep_groups, edp_groups))
}

/// The GPU this process drives: `LOCAL_RANK`'s in a launched job (torchrun's convention: its
/// workers call `torch.cuda.set_device(local_rank)`), else the first. A CUDA device for
/// [`World::from_env`] must be made on it.
pub fn local_gpu() -> usize {
    std::env::var("LOCAL_RANK").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

impl World {
    /// Joins the job that torchrun's variables describe (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `MASTER_ADDR`, `MASTER_PORT`), and makes the whole job's communicator for `device`'s
    /// backend (module docs). None when neither `RANK` nor `WORLD_SIZE` is set (a plain run);
    /// an error naming the variable when some are set and others missing or invalid. A CUDA
    /// `device` must be `LOCAL_RANK`'s GPU. Every rank calls it once.
    pub fn from_env(device: &Device) -> Result<Option<World>> {
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
        if !set("RANK") && !set("WORLD_SIZE") {
            return Ok(None);
        }
        let info = WorldInfo::from_env()?;
        Self::join(info, device).map(Some)
    }

    fn join(info: WorldInfo, device: &Device) -> Result<World> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            let gpu = d.cuda_stream().context().ordinal();
            if gpu != info.local_rank {
                bail!("rank {}: the model is on GPU {gpu}, but LOCAL_RANK={} names GPU {} (one GPU per local rank, as torchrun sets them)", info.rank, info.local_rank, info.local_rank)
            }
            if !cfg!(feature = "nccl") && info.world_size > 1 {
                bail!("rank {}: {} processes on CUDA need the `nccl` feature (build with --features \"cuda nccl\"); this build has no GPU collectives", info.rank, info.world_size)
            }
        }
        let rdv = Arc::new(Rendezvous::join(&info)?);
        let backend = match device {
            #[cfg(feature = "nccl")]
            Device::Cuda(_) => Backend::Nccl(Arc::new(super::NcclComm::new(rdv.clone(), device)?)),
            _ => Backend::Tcp(Arc::new(TcpComm::over(rdv.clone()))),
        };
        Ok(World { info, rdv, backend, expert_groups: Mutex::new(HashMap::new()) })
    }

    pub fn rank(&self) -> usize {
        self.info.rank
    }

    pub fn world_size(&self) -> usize {
        self.info.world_size
    }

    /// Which backend carries the collectives: `nccl` or `tcp`.
    pub fn backend(&self) -> &'static str {
        match &self.backend {
            Backend::Tcp(_) => "tcp",
            #[cfg(feature = "nccl")]
            Backend::Nccl(_) => "nccl",
        }
    }

    /// The connections to the other ranks (the control plane): to broadcast a blob or read
    /// the job's failure.
    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rdv
    }

    /// The whole job's group (data parallelism).
    pub fn comm(&self) -> Arc<dyn Communicator> {
        match &self.backend {
            Backend::Tcp(c) => c.clone(),
            #[cfg(feature = "nccl")]
            Backend::Nccl(c) => c.clone(),
        }
    }

    /// Megatron-Core's layout for expert parallelism over `ep` consecutive ranks ([`expert_layout`]):
    /// (expert-parallel group, expert-data-parallel group or None when ep == world size).
    /// Errors name the sizes when ep does not divide the world size. Under NCCL making a layout
    /// is a collective: every rank asks for the same sizes in the same order.
    pub fn expert_groups(&self, ep: usize) -> Result<ExpertGroups> {
        let world = self.world_size();
        let (ep_ranks, edp_ranks) = expert_layout(world, ep)?;
        let mut made = self.expert_groups.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(groups) = made.get(&ep) {
            return Ok(groups.clone());
        }
        let groups: ExpertGroups = if ep == world {
            (self.comm(), None)
        } else if ep == 1 {
            (self.split(ep_ranks)?, Some(self.comm()))
        } else {
            (self.split(ep_ranks)?, Some(self.split(edp_ranks)?))
        };
        made.insert(ep, groups.clone());
        Ok(groups)
    }

    /// This rank's group of `groups`, a partition of the job's ranks.
    fn split(&self, groups: Partition) -> Result<Arc<dyn Communicator>> {
        Ok(match &self.backend {
            Backend::Tcp(c) => Arc::new(c.split(&groups, &self.info.master_addr)?),
            #[cfg(feature = "nccl")]
            Backend::Nccl(c) => Arc::new(c.split(&groups)?),
        })
    }

    /// Reports this rank's error to every peer (the rendezvous relay), so the job ends with it
    /// everywhere; under NCCL the watchdogs then abort every rank's communicators, so no rank
    /// stays blocked in a collective.
    pub fn report_error(&self, msg: &str) {
        self.rdv.report_error(msg);
    }

    /// A plan with this world's data/expert parallel settings applied: data parallelism over
    /// the whole job, and with `ep > 1` the MoE layers' experts split over expert-parallel
    /// groups of `ep` ranks (`ep == 1`: every rank holds every expert). Inference ignores the
    /// data-parallel part (the trainers read it), so a sharded `generate` takes the same plan.
    pub fn apply(&self, plan: ExecutionPlan, ep: usize) -> Result<ExecutionPlan> {
        let (ep_comm, edp) = self.expert_groups(ep)?;
        Ok(plan.with_parallel_groups(self.comm(), ep_comm, edp))
    }
}
