//! Distributed execution: the communication abstraction ([`Communicator`]), its in-process
//! backend ([`LocalGroup`], N ranks as threads, how CI tests the whole dispatch on the CPU),
//! expert parallelism for the MoE layers ([`ExpertParallel`]: the dropless all-to-all, its
//! capacity-padded static form for CUDA graphs and the all-gather baseline, [`Dispatch`]) and
//! data parallelism's gradient all-reduce ([`all_reduce_gradients`]).
//!
//! Across processes (one per GPU, launched by `ditmoe launch` or torchrun), the ranks find each
//! other through a TCP rendezvous on torchrun's `MASTER_ADDR:MASTER_PORT` ([`Rendezvous`],
//! [`WorldInfo`]), which also ends the job on every rank when one fails. Two process-level
//! backends serve the same dispatch: [`TcpComm`] on CPUs (collectives through rank 0, as gloo
//! serves PyTorch's CPU groups) and, with the `nccl` feature, `NcclComm` on GPUs (the trait's
//! collectives as NCCL calls, grouped `ncclSend`/`ncclRecv` for the variable splits, see
//! [`comm`]). [`World`] joins the job once and picks the backend for the device.
pub mod all_gather;
pub mod comm;
pub mod expert_parallel;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod static_capacity;
pub mod tcp;
pub mod world;

pub use comm::{all_reduce_gradients, Communicator};
pub use expert_parallel::{Dispatch, ExpertParallel};
pub use local::{LocalComm, LocalGroup};
#[cfg(feature = "nccl")]
pub use nccl::NcclComm;
pub use rendezvous::{Rendezvous, WorldInfo};
pub use static_capacity::StaticCapacity;
pub use tcp::TcpComm;
pub use world::{local_gpu, World};
