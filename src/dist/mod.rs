//! Distributed execution: the communication abstraction ([`Communicator`]), its in-process
//! backend ([`LocalGroup`], N ranks as threads, how CI tests the whole dispatch on the CPU),
//! expert parallelism for the MoE layers ([`ExpertParallel`]) and data parallelism's gradient
//! all-reduce ([`all_reduce_gradients`]).
//!
//! An NCCL backend is the GPU step still to come: the trait's collectives are the NCCL calls
//! (grouped `ncclSend`/`ncclRecv` for the variable splits, see [`comm`]), so it slots in behind
//! the same dispatch.
pub mod comm;
pub mod expert_parallel;
pub mod local;

pub use comm::{all_reduce_gradients, Communicator};
pub use expert_parallel::ExpertParallel;
pub use local::{LocalComm, LocalGroup};
