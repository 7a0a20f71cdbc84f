//! What one training step holds beyond the training state, counted exactly on the CPU: a global
//! allocator counts the live bytes, the trainer runs one step of a preset at its real widths with
//! fewer blocks, and the peak over the step is printed against the state (weights, masters,
//! moments, EMA). The tensors and their dtypes are the GPU path's (the MoE layers on the kernel
//! pipeline), so the per-block and per-image growth these rows show projects a full-depth model's
//! peak on the GPU (docs/training.md, "What fits on one GPU").
//!
//! ```text
//! cargo run --release --example train_memory -- [--model XL/2] [--depths 1,2] [--batches 32]
//!     [--precision bf16] [--recompute on|off]
//! ```
#[path = "support/args.rs"]
mod args;
#[path = "support/train_bench.rs"]
mod train_bench;

use anyhow::Result;
use args::{arg, list};
use candle_core::Device;
use ditmoe::train::{RunStart, Trainer};
use ditmoe::{ExecutionPlan, Precision};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use train_bench::{train_config, training_preset, write_latents};

/// The system allocator, counting the bytes allocated and not yet freed, and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    PEAK.fetch_max(LIVE.fetch_add(bytes, Relaxed) + bytes, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match new_size > layout.size() {
            true => grew(new_size - layout.size()),
            false => _ = LIVE.fetch_sub(layout.size() - new_size, Relaxed),
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn gib(bytes: usize) -> f64 {
    ditmoe::runtime::memory::gib(bytes as u64)
}

fn main() -> Result<()> {
    let model = arg("--model", "XL/2");
    let depths: Vec<usize> = list("--depths", "1,2").iter().map(|d| d.parse()).collect::<Result<_, _>>()?;
    let batches: Vec<usize> = list("--batches", "32").iter().map(|b| b.parse()).collect::<Result<_, _>>()?;
    let precision: Precision = arg("--precision", "bf16").parse().map_err(anyhow::Error::msg)?;
    let recompute = arg("--recompute", "on") == "on";
    let plan = ExecutionPlan::training(&Device::Cpu, precision).with_moe_kernels(true);
    println!("| model | blocks | batch | parameters | state GiB | step peak beyond the state GiB | step s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for &depth in &depths {
        for &batch in &batches {
            let work = std::env::temp_dir().join(format!("ditmoe-train-memory-{}", std::process::id()));
            std::fs::create_dir_all(&work)?;
            let mut cfg = training_preset(&format!("DiT-MoE-{model}-8E2A"))?;
            cfg.depth = depth;
            let shards = write_latents(&work, &cfg, batch)?;
            // the EMA on the host: in this memory too, so it is part of the state either way
            let mut trainer = Trainer::new(train_config(&work, &cfg, &shards, batch, recompute, true)?, &plan, RunStart::Overwrite)?;
            let state = LIVE.load(Relaxed);
            PEAK.store(state, Relaxed);
            let t0 = std::time::Instant::now();
            trainer.train_step()?;
            let secs = t0.elapsed().as_secs_f64();
            let peak = PEAK.load(Relaxed);
            println!("| {model} {precision} | {depth} | {batch} | {} | {:.2} | {:.2} | {secs:.0} |", cfg.param_counts().0, gib(state), gib(peak - state));
            drop(trainer);
            std::fs::remove_dir_all(&work).ok();
        }
    }
    Ok(())
}
