//! `ditmoe train`: the official `train.py` (DDPM) and `train_rf.py` (rectified flow) loops on
//! class folders or latent shards, with exact resume.
pub mod adamw;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod ema;
pub mod init;
pub mod kernels;
pub mod log;
pub mod memory_stages;
pub mod lr_schedule;
pub mod mixed_precision;
pub mod pad;
pub mod parallel;
pub mod profile;
pub mod rng;
pub mod run_dir;
pub mod samples;
pub mod trainer;

pub use config::{Objective, Router, TrainConfig};
pub use log::{JsonlLog, StepLog, LOG_FILE};
pub use run_dir::RunStart;
pub use trainer::{RunSummary, StopReason, Trainer};
