//! Training throughput at ImageNet shape: the trainer's step (`Trainer::train_step`: label
//! dropout, the DDPM loss with learned sigma + the balance loss, backward, AdamW, EMA) on
//! random SD-VAE-shaped latents (32x32x4, 1000 classes), for the official DiT-MoE sizes, each
//! batch, precision and with or without activation recomputation. Prints one markdown row per
//! configuration: ms per step, images/s, the forward / backward / optimizer split and the peak
//! device memory in use. A configuration that runs out of memory says so and the next runs.
//!
//! ```text
//! ../shared/scripts/build-cuda.sh build --release --example bench_train
//! bench_train --device cuda [--models S/2,B/2,XL/2] [--batches 32,64] [--precisions bf16,tf32,f32]
//!     [--recompute off|on|both] [--steps 6] [--warmup 2] [--ema-on-host XL/2,...] [--ema-every 1]
//! ```
//! The official counterpart is `shared/tools/bench_official_ditmoe.py --train` (the official
//! `train.py` step); docs/benchmarks.md has both, measured in the same job. The models take the
//! official `train.py` attention (`use_flash_attn` off) and `pretraining_tp` has no effect on
//! the maths. The warm-up steps (kernel compilation, memory-pool growth) are not timed; the
//! row gives the mean of the timed steps (with `--ema-every n`, time n steps to include one average).
use anyhow::{Context, Result};
use candle_core::Device;
use ditmoe::train::{RunStart, Trainer};
use ditmoe::{ExecutionPlan, Precision};
use std::path::Path;

#[path = "support/args.rs"]
mod args;
use args::{arg, list};
#[path = "support/train_bench.rs"]
mod train_bench;
use ditmoe::runtime::memory::gib;
use train_bench::{out_of_memory, time_steps, train_config, training_preset, write_latents};


/// One configuration's measurement, or why there is none.
enum Outcome {
    Ran { ms: f64, fwd: f64, bwd: f64, opt: f64, ema: f64, peak_gib: Option<f64>, loss: f32 },
    OutOfMemory(String),
}

#[allow(clippy::too_many_arguments)]
fn measure(work: &Path, model: &str, shards: &Path, batch: usize, precision: Precision, recompute: bool, (ema_on_host, ema_every): (bool, u64), (warmup, steps): (usize, usize), device: &Device) -> Result<Outcome> {
    let mut train = train_config(work, &training_preset(model)?, shards, batch, recompute, ema_on_host)?;
    train.ema_every = ema_every;
    let plan = ExecutionPlan::training(device, precision);
    plan.apply_matmul_precision();
    let run = || -> candle_core::Result<Outcome> {
        let mut trainer = Trainer::new(train.clone(), &plan, RunStart::Overwrite)?;
        trainer.enable_profile();
        let t = time_steps(&mut trainer, warmup, steps, device)?;
        let phases = trainer.profile().expect("profile on").per_step_ms();
        let phase = |names: &[&str]| phases.iter().filter(|(p, _)| names.contains(p)).map(|(_, ms)| ms).sum::<f64>();
        Ok(Outcome::Ran {
            ms: t.ms,
            fwd: phase(&["data", "forward + losses"]),
            bwd: phase(&["backward", "gradients collected", "autograd graph freed"]),
            opt: phase(&["grad norm", "AdamW"]),
            ema: phase(&["EMA"]),
            peak_gib: t.peak_bytes.map(gib),
            loss: t.loss,
        })
    };
    match run() {
        Ok(o) => Ok(o),
        Err(e) => match out_of_memory(&e) {
            Some(why) => Ok(Outcome::OutOfMemory(why)),
            None => Err(e).with_context(|| format!("{model} batch {batch} {precision}")),
        },
    }
}

fn main() -> Result<()> {
    let device = match arg("--device", "cuda").as_str() {
        "cpu" => Device::Cpu,
        _ => ditmoe::runtime::graph::cuda_device(0)?,
    };
    let models = list("--models", "S/2,B/2,XL/2");
    let batches: Vec<usize> = list("--batches", "32,64").iter().map(|b| b.parse()).collect::<Result<_, _>>()?;
    let precisions: Vec<Precision> = list("--precisions", "bf16,tf32,f32").iter().map(|p| p.parse().map_err(anyhow::Error::msg)).collect::<Result<_>>()?;
    let recompute: Vec<bool> = match arg("--recompute", "off").as_str() {
        "on" => vec![true],
        "both" => vec![false, true],
        _ => vec![false],
    };
    let ema_on_host = list("--ema-on-host", "XL/2");
    let ema_every: u64 = arg("--ema-every", "1").parse()?;
    let steps: usize = arg("--steps", "6").parse()?;
    let warmup: usize = arg("--warmup", "2").parse()?;
    let work = std::env::temp_dir().join(format!("ditmoe-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    // every preset takes the SD-VAE's latents of ImageNet 256 px
    let shards = write_latents(&work, &training_preset("S/2-8E2A")?, 4 * batches.iter().max().copied().unwrap_or(64))?;

    println!("| model | precision | recompute | batch | ms / step | images/s | fwd / bwd / opt / EMA ms | peak GiB | loss |");
    println!("|---|---|---|---:|---:|---:|---|---:|---:|");
    for model in &models {
        let name = format!("DiT-MoE-{model}-8E2A");
        let on_host = ema_on_host.contains(model);
        for &batch in &batches {
            for &precision in &precisions {
                for &rc in &recompute {
                    let o = measure(&work, &name, &shards, batch, precision, rc, (on_host, ema_every), (warmup, steps), &device)?;
                    let rc_s = if rc { "on" } else { "off" };
                    let ema = match (on_host, ema_every) {
                        (true, 1) => " (EMA on host)".to_string(),
                        (true, n) => format!(" (EMA on host, every {n} steps)"),
                        (false, 1) => String::new(),
                        (false, n) => format!(" (EMA every {n} steps)"),
                    };
                    match o {
                        Outcome::Ran { ms, fwd, bwd, opt, ema: ema_ms, peak_gib, loss } => println!(
                            "| {name}{ema} | {precision} | {rc_s} | {batch} | {ms:.1} | {:.1} | {fwd:.0} / {bwd:.0} / {opt:.0} / {ema_ms:.0} | {} | {loss:.3} |",
                            batch as f64 / ms * 1e3,
                            peak_gib.map_or("–".into(), |g| format!("{g:.1}"))
                        ),
                        Outcome::OutOfMemory(why) => println!("| {name}{ema} | {precision} | {rc_s} | {batch} | out of memory | | | | {why} |"),
                    }
                }
            }
        }
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}
