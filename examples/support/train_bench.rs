//! What the training benchmarks (`examples/bench_train`, `examples/bench_ep --train`) share:
//! random latents of a model's input shape, the run config of a benchmark step, the timing of
//! `Trainer::train_step` after warm-up and the out-of-memory verdict that ends a configuration
//! without ending the benchmark. Each example that includes it uses what it needs of it.
#![allow(dead_code)]
use candle_core::{Device, Tensor};
use ditmoe::runtime::memory;
use ditmoe::train::{TrainConfig, Trainer};
use ditmoe::DitConfig;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A preset as the official `train.py` builds its DiT (`use_flash_attn` off; `pretraining_tp`
/// has no effect on the maths).
pub fn training_preset(name: &str) -> candle_core::Result<DitConfig> {
    let mut cfg = ditmoe::presets::get(name)?.config;
    cfg.use_flash_attn = false;
    Ok(cfg)
}

/// `n` random latents of `model`'s input (for the presets the SD-VAE's 32x32x4 at unit scale,
/// ImageNet 256 px) with labels spread over its classes, as one shard in `work`: enough for a
/// few distinct batches.
pub fn write_latents(work: &Path, model: &DitConfig, n: usize) -> candle_core::Result<PathBuf> {
    let path = work.join("latents.safetensors");
    let latents = Tensor::randn(0f32, 1.0, (n, model.in_channels, model.input_size, model.input_size), &Device::Cpu)?;
    let labels = Tensor::from_vec((0..n as i64).map(|i| i * 37 % model.num_classes as i64).collect::<Vec<_>>(), n, &Device::Cpu)?;
    ditmoe::data::write_latent_shard(&path, &latents, &labels)?;
    Ok(path)
}

/// The run of a benchmark step: `model` (written to `work/model.json`) on `shards`, the DDPM
/// objective with the model's learned sigma, AdamW at lr 1e-4, `global_batch` images a step,
/// no checkpoint or sample within the run.
pub fn train_config(work: &Path, model: &DitConfig, shards: &Path, global_batch: usize, recompute: bool, ema_on_host: bool) -> anyhow::Result<TrainConfig> {
    let model_json = work.join("model.json");
    std::fs::write(&model_json, model.to_json())?;
    Ok(serde_json::from_value(serde_json::json!({
        "model": model_json, "data": shards, "out": work.join("run"), "objective": "ddpm",
        "global_batch": global_batch, "steps": 1_000_000, "lr": 1e-4, "seed": 0, "num_workers": 4,
        "recompute": recompute, "ema_on_host": ema_on_host, "random_flip": false,
    }))?)
}

/// `warmup + steps` optimizer steps of which the last `steps` are timed.
pub struct Timing {
    /// The mean of the timed steps.
    pub ms: f64,
    /// The last step's loss.
    pub loss: f32,
    /// The most device memory in use during a timed step; None on the CPU.
    pub peak_bytes: Option<u64>,
}

/// Times `steps` calls of `Trainer::train_step` after `warmup` untimed ones (kernel
/// compilation, memory-pool growth). A step ends with its loss on the host, so the wall clock
/// covers its device work. The peak is read after every step, as a profiled trainer starts a
/// new peak window each step (`ditmoe::train::profile`).
pub fn time_steps(trainer: &mut Trainer, warmup: usize, steps: usize, device: &Device) -> candle_core::Result<Timing> {
    for _ in 0..warmup {
        trainer.train_step()?;
    }
    memory::reset_peak(device)?;
    let (mut times, mut loss, mut peak_bytes) = (Vec::with_capacity(steps), 0f32, None);
    for _ in 0..steps.max(1) {
        let t0 = Instant::now();
        loss = trainer.train_step()?.loss;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        if let Some(b) = memory::peak_bytes(device)? {
            peak_bytes = Some(peak_bytes.unwrap_or(0).max(b));
        }
    }
    Ok(Timing { ms: times.iter().sum::<f64>() / times.len() as f64, loss, peak_bytes })
}

/// The first line of an error that says the configuration does not fit the device (the CUDA
/// allocator's `OUT_OF_MEMORY`, or the trainer's estimate refusing it: "needs about … GiB").
pub fn out_of_memory(e: &candle_core::Error) -> Option<String> {
    (memory::is_out_of_memory(e) || e.to_string().contains("needs about")).then(|| e.to_string().lines().next().unwrap_or("").to_string())
}

