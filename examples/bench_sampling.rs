//! Seconds per sampling step on the CPU: one DDPM step with classifier-free guidance as
//! `ditmoe generate` runs it (a doubled forward of the batch, guidance, `p_sample`), for the
//! `tiny` fixture config and the DiT-MoE-S/2-8E2A preset with random weights.
//!
//! cargo run --example bench_sampling [-- --steps 4]
//!
//! Each row is the median of the timed steps of one sampling run (its first step is a
//! warm-up and not counted). "per image vs batch 1" is (s/step / batch) over the batch-1
//! s/step: below 1 means batching pays.
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ditmoe::sampling::{DdpmSampler, Guidance, GuidedModel, ImageNoise, Sampler};
use ditmoe::{presets, DitConfig, DitMoe};
use std::time::Instant;

#[path = "support/args.rs"]
mod args;
use args::arg;

/// Random weights, every parameter N(0, 1/fan_in) (1-D: N(0, 0.05²)) as the parity fixtures
/// draw them: candle's default inits leave some tensors constant (e.g. the router), which
/// would send every token to the same experts and time an unrepresentative MoE.
fn random_model(cfg: &DitConfig, device: &Device) -> Result<DitMoe> {
    let varmap = VarMap::new();
    DitMoe::new(cfg, &ditmoe::ExecutionPlan::training(device, ditmoe::Precision::F32), VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    for var in varmap.all_vars() {
        let dims = var.dims().to_vec();
        let std = if dims.len() >= 2 { 1.0 / (dims[1..].iter().product::<usize>() as f32).sqrt() } else { 0.05 };
        var.set(&Tensor::randn(0f32, std, dims, device)?)?;
    }
    // Built again from the randomised variables (layers may copy weights at construction).
    Ok(DitMoe::new(cfg, &ditmoe::ExecutionPlan::training(device, ditmoe::Precision::F32), VarBuilder::from_varmap(&varmap, DType::F32, device))?)
}

fn tiny_config() -> Result<DitConfig> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny/config.json");
    Ok(DitConfig::from_file(std::path::Path::new(path))?)
}

/// Median seconds per step of a `steps`-step guided DDPM run at batch `b` (first step skipped).
fn seconds_per_step(model: &DitMoe, b: usize, steps: usize, device: &Device) -> Result<f64> {
    let cfg = model.config();
    let classes: Vec<usize> = (0..b).map(|i| i % cfg.num_classes).collect();
    let guided = GuidedModel::new(model, &classes, Guidance { scale: 4.0, guide_all_channels: false }, device)?;
    let sampler = Sampler::Ddpm(DdpmSampler::with_steps(steps, cfg.learn_sigma, false)?);
    let mut noise = ImageNoise::new(0, 0..b);
    let mut marks = vec![Instant::now()];
    sampler.sample_seeded(&guided, &mut noise, &mut |_| marks.push(Instant::now()))?;
    // Between two evaluations: the previous step's p_sample and this step's forward, one step.
    let mut times: Vec<f64> = marks.windows(2).skip(1).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Result<()> {
    let device = Device::Cpu;
    let steps: usize = arg("--steps", "4").parse()?;
    let runs: [(&str, DitConfig, &[usize]); 2] =
        [("tiny (fixture)", tiny_config()?, &[1, 2, 4, 8]), ("DiT-MoE-S/2-8E2A", presets::get("S/2-8E2A")?.config, &[1, 2, 4])];
    println!("DDPM step with CFG (forward batch = 2 x batch), f32, CPU, {} threads", candle_core::utils::get_num_threads());
    println!("| model | batch | s / step | s / step / image | per image vs batch 1 |");
    println!("|---|---:|---:|---:|---:|");
    for (name, cfg, batches) in runs {
        let model = random_model(&cfg, &device)?;
        let mut base = None;
        for &b in batches {
            let s = seconds_per_step(&model, b, steps, &device)?;
            let per_image = s / b as f64;
            let base = *base.get_or_insert(per_image);
            println!("| {name} | {b} | {s:.4} | {per_image:.4} | {:.2} |", per_image / base);
        }
    }
    Ok(())
}
