//! `ditmoe train`: a `TrainConfig` from `--config FILE` and/or flags (flags win), then the
//! training loop; `--resume` continues from the newest valid checkpoint in the run folder.
//! Launched (`ditmoe launch --nproc-per-node N -- train …`), every rank trains its slice of
//! each global batch with the experts split as `--expert-parallel` says (`ditmoe::train::parallel`).
use super::launch::{join, leads, parallel_plan, reported};
use super::usage;
use ditmoe::dist::World;
use clap::Args;
use ditmoe::train::{Objective, Router, RunStart, StopReason, TrainConfig, Trainer};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// JSON training config (the fields of `TrainConfig`); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Preset name (see `ditmoe presets`), a model folder or a model config.json (required, here or in --config)
    #[arg(long)]
    model: Option<String>,
    /// Class folders root, latent shard file, or folder of shards (required, here or in --config)
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder: checkpoints, log.jsonl, the exported ema/ model (required, here or in --config)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Training objective: ddpm (Gaussian diffusion, train.py) or rf (rectified flow) (required, here or in --config)
    #[arg(long)]
    objective: Option<Objective>,
    /// topk (the model config's DiT-MoE gate, default) or promoe (ProMoE's prototypical
    /// router, released settings for the model's width).
    #[arg(long)]
    router: Option<Router>,
    /// Side the images are resized to, then padded to the model's input_size [default: input_size]
    #[arg(long)]
    image_size: Option<usize>,
    /// Images per optimizer step [default: 256]
    #[arg(long)]
    global_batch: Option<usize>,
    /// Images per forward/backward pass, accumulated to the global batch [default: global batch]
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Optimizer steps to train to [default: 400000]
    #[arg(long)]
    steps: Option<u64>,
    /// Stop (checkpoint + EMA export) before this many minutes have passed.
    #[arg(long)]
    max_minutes: Option<f64>,
    /// AdamW learning rate after the warm-up: constant, or the config's cosine decay (`min_lr_ratio`) [default: 1e-4]
    #[arg(long)]
    lr: Option<f64>,
    /// Steps of linear learning-rate warm-up [default: 0]
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Clip the global gradient norm to this [default: no clipping]
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// EMA decay of the exported weights [default: 0.9999]
    #[arg(long)]
    ema_decay: Option<f64>,
    /// Seed of the initialisation, data order, noise and label dropout [default: 0]
    #[arg(long)]
    seed: Option<u64>,
    /// Write a log.jsonl record every this many steps [default: 10]
    #[arg(long)]
    log_every: Option<u64>,
    /// Save a checkpoint every this many steps (and at the end) [default: 1000]
    #[arg(long)]
    ckpt_every: Option<u64>,
    /// Checkpoints kept, newest first [default: 3]
    #[arg(long)]
    keep_last: Option<usize>,
    /// Data-loading threads [default: the available cores]
    #[arg(long)]
    num_workers: Option<usize>,
    /// Leave out class-folder images that cannot be read (listed) instead of refusing the data.
    #[arg(long)]
    skip_bad_images: bool,
    /// Start from these weights instead of the official initialisation.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Continue the run in --out from its newest valid checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start a new run in an --out that holds one, moving the old run aside to `<out>.old-<n>`.
    #[arg(long)]
    overwrite: bool,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the forward and backward: f32, tf32 (f32 with TF32 tensor-core matmuls) or
    /// bf16 (bf16 weight copies, matmuls and the activations between them; f32 master weights,
    /// optimizer state, gradient sums, residual stream, norms, softmaxes and loss, as autocast;
    /// docs/training.md). The master weights are f32 in every precision.
    /// [default: tf32 on CUDA, f32 on the CPU]
    #[arg(long)]
    precision: Option<ditmoe::Precision>,
    /// Recompute each block's activations in the backward instead of keeping them: memory for
    /// one block's activations, for a second forward of the blocks.
    #[arg(long)]
    recompute: bool,
    /// Keep the EMA weights in host memory (XL/2-8E2A on an 80 GB card); each update copies the
    /// weights to the host.
    #[arg(long)]
    ema_on_host: bool,
    /// Average the weights into the EMA every N optimizer steps, with the product of their
    /// decays (default 1, as the official train.py).
    #[arg(long, value_name = "N")]
    ema_every: Option<u64>,
    /// Launched: split each MoE layer's experts over groups of this many consecutive ranks
    /// (Megatron-Core's layout; N divides the world size). 1 replicates the experts (pure data
    /// parallelism); the world size gives each rank 1/N of them.
    #[arg(long, default_value_t = 1)]
    expert_parallel: usize,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
    /// Time each phase of every step (data, forward, backward, optimizer, EMA) and print a
    /// table at the end; synchronises the device between phases.
    #[arg(long)]
    profile: bool,
}

fn build_config(a: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut v = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| usage(format!("--config {}: {e}", p.display())))?;
            serde_json::from_str::<serde_json::Value>(&text).map_err(|e| usage(format!("--config {}: {e}", p.display())))?
        }
        None => serde_json::json!({}),
    };
    let obj = v.as_object_mut().ok_or_else(|| usage("--config must hold a JSON object"))?;
    let mut set = |k: &str, val: serde_json::Value| {
        obj.insert(k.to_string(), val);
    };
    // A flag's value as JSON; a non-finite number has none (JSON's null), so it is refused by
    // its flag name here rather than as a type error about null later.
    let mut bad_flag = None;
    macro_rules! flag {
        ($($f:ident),*) => {$( if let Some(x) = &a.$f {
            match serde_json::to_value(x).expect("flag serialises") {
                serde_json::Value::Null => bad_flag = Some(format!("--{} {x:?}: must be a finite number", stringify!($f).replace('_', "-"))),
                value => set(stringify!($f), value),
            }
        } )*};
    }
    for (on, key) in [(a.skip_bad_images, "skip_bad_images"), (a.recompute, "recompute"), (a.ema_on_host, "ema_on_host")] {
        if on {
            set(key, serde_json::Value::Bool(true));
        }
    }
    flag!(model, data, out, objective, router, image_size, global_batch, micro_batch, steps, max_minutes, lr, warmup_steps, max_grad_norm, ema_decay, ema_every, seed, log_every, ckpt_every, keep_last, num_workers, init_from);
    if let Some(msg) = bad_flag {
        return Err(usage(msg));
    }
    let origin = a.config.as_ref().map_or("train flags".to_string(), |p| p.display().to_string());
    let cfg: TrainConfig = serde_json::from_value(v).map_err(|e| {
        // serde names the config field; a user of the flags needs the flag's name too
        let msg = e.to_string();
        match msg.strip_prefix("missing field `").and_then(|r| r.split_once('`')) {
            Some((field, _)) => usage(format!("missing --{}: give the flag, or `{field}` in --config", field.replace('_', "-"))),
            None => usage(format!("{origin}: {msg}")),
        }
    })?;
    cfg.validate().map_err(|e| usage(e.to_string()))?;
    Ok(cfg)
}

pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let cfg = build_config(&a)?;
    let device = super::device(&a.device)?;
    let world = join(&device)?;
    let result = train_in(&a, cfg, &device, world.as_ref());
    reported(world.as_ref(), result)
}

/// The training run on this process's share of the job: with `world`, data parallelism over
/// every rank and the experts split as `--expert-parallel` says; only rank 0 draws progress and
/// prints (the trainer writes files on rank 0 only).
fn train_in(a: &TrainArgs, cfg: TrainConfig, device: &candle_core::Device, world: Option<&World>) -> anyhow::Result<()> {
    let precision = match a.precision {
        Some(ditmoe::Precision::F16) => return Err(usage("--precision f16: training runs in f32, tf32 or bf16 (f16 needs loss scaling)")),
        Some(p) => p,
        None if device.is_cuda() => ditmoe::Precision::Tf32,
        None => ditmoe::Precision::F32,
    };
    let plan = ditmoe::ExecutionPlan::training(device, precision);
    plan.apply_matmul_precision();
    let plan = parallel_plan(world, plan, Some(a.expert_parallel))?;
    let prints = leads(world);
    let start = match (a.resume, a.overwrite) {
        (true, _) => RunStart::Resume,
        (_, true) => RunStart::Overwrite,
        _ => RunStart::New,
    };
    let mut trainer = Trainer::new(cfg.clone(), &plan, start)?;
    let mc = trainer.model_config();
    let (total, active) = mc.param_counts();
    let ranks = world.map_or(String::new(), |w| format!(" over {} ranks (experts over {})", w.world_size(), a.expert_parallel));
    if prints {
        eprintln!(
            "model: {} params ({} active), {} router, {} objective, step {} of {}, batch {} ({} x {}){ranks}",
            total,
            active,
            if mc.promoe.is_some() { "promoe" } else { "topk" },
            serde_json::to_string(&cfg.objective)?.trim_matches('"'),
            trainer.step(),
            cfg.steps,
            cfg.global_batch,
            cfg.accumulation(),
            cfg.micro_batch()
        );
    }
    if a.profile {
        trainer.enable_profile();
        if prints {
            eprintln!("precision {}{}", precision, if cfg.recompute { ", activations recomputed per block" } else { "" });
        }
    }
    let summary = trainer.run(!a.quiet)?;
    if !prints {
        return Ok(());
    }
    if let Some(p) = trainer.profile() {
        if trainer.memory_stages().counted() {
            eprintln!("device memory before the first step: {}", trainer.memory_stages().summary());
        }
        eprintln!("{}", p.table());
    }
    if let Some(from) = &summary.resumed_from {
        eprintln!("resumed from {}", from.display());
    }
    let why = match summary.stop {
        StopReason::Steps => "step limit",
        StopReason::TimeBudget => "time budget",
    };
    println!("stopped at step {} ({why}); EMA model in {}", summary.final_step, summary.ema_dir.display());
    Ok(())
}
