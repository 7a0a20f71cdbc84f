//! The CPU test suite: one module per subject, linked into one test binary. A binary per subject
//! would link the library and its dependencies thirty-odd times (about 45 MB each); one binary
//! keeps a cold `cargo test` within CI's disk and time. Run one subject with
//! `cargo test --test suite <module>::`.
//!
//! Two tests stay binaries of their own: `tests/gradient_memory.rs` counts bytes with its own
//! global allocator (other tests' tensors would be counted), and `tests/gpu.rs` runs on a GPU
//! machine with the `cuda` feature. The helpers in `tests/common` serve the suite and the GPU
//! checks.

#[path = "../common/mod.rs"]
mod common;

mod analysis;
mod block_ops;
mod checkpoint;
mod cpu_matmul;
mod data;
mod data_parallel;
mod diffusion_parity;
mod dit_data_parallel;
mod dpm_solver;
mod eval;
mod expert_parallel;
mod forward_cli;
mod generate_cli;
mod gradients;
mod kernels;
mod launch;
mod lm_cli;
mod lm_decoder;
mod lm_distill;
mod lm_hf;
mod lm_launch;
mod lm_train;
mod model_parity;
mod moe_deepspeed;
mod moe_layer;
mod optimizer_bf16;
mod promoe;
mod rectified_flow_parity;
mod rf_heun;
mod routes_cli;
mod sampling;
mod text;
mod train;
mod train_modes;
