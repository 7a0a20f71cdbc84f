//! Expert-parallel MoE layers: per layer of DiT-MoE S/2 and XL/2 (8 experts, top-2, a shared
//! expert; `batch · 256` tokens per rank, frozen weights on the kernel pipeline), the time of
//! the layer under each dispatch against the single-device `MoeLayer` on the same tokens, and
//! each dispatch's two exchanges timed alone with their bus bandwidth:
//! - `all-to-all`: the dropless dispatch (Megatron-Core's `MoEAlltoAllTokenDispatcher`);
//! - `static`: the capacity-padded static dispatch for CUDA graphs, capacity
//!   `ceil(factor · tokens · k / E)` per (rank, expert) (Megatron's `moe_expert_capacity_factor`);
//! - `all-gather`: vLLM's default all-gather + reduce-scatter, the baseline.
//!
//! Bandwidth follows nccl-tests (`doc/PERFORMANCE.md`): `algbw = bytes / time` with the bytes a
//! rank sends (its whole send buffer), and `busbw = algbw · (n − 1) / n` for the all-to-all,
//! the all-gather and the reduce-scatter alike (0 on one rank). Times are rank 0's medians of
//! `--iters` calls after `--warmup` (`ditmoe::runtime::timing::median_of_ms`: CUDA events on a
//! GPU, the wall clock on the CPU); every rank makes the same calls.
//!
//! `--train` times training instead (issue 24's images/s per GPU): `Trainer::train_step` of
//! DiT-MoE S/2-8E2A and XL/2-8E2A (or the model config `--model FILE`) on random latents of the
//! model's input (ImageNet 256 px: 32x32x4), the DDPM objective with learned sigma, AdamW, with
//! data parallelism over the `P` ranks and the experts split over groups of `--expert-parallel`
//! consecutive ranks (default `P`; Megatron-Core's layout, as `ditmoe train --expert-parallel`).
//! `--batches` is the batch per rank, so the global batch is `batch · P`. A row gives rank 0's
//! mean step after `--warmup` steps (`--iters` timed), images/s per GPU (`batch / step
//! time`), and each rank's peak device memory during a timed step (GPUs only,
//! `ditmoe::runtime::memory`); a configuration the trainer refuses as too large says so.
//!
//! ```text
//! cargo run --release --example bench_ep -- [--device cpu|cuda] [--models S/2,XL/2] [--batches 1]
//!     [--ranks 1,2,4] [--dtype f32|bf16] [--capacity-factor 2] [--warmup 2] [--iters 10] [--json FILE]
//!     [--train [--model FILE] [--expert-parallel N]]
//! ```
//! Launched (torchrun's variables set, `ditmoe::dist::World`), it runs at the job's world size
//! on its backend (NCCL on GPUs); otherwise each of `--ranks` runs as threads of this process
//! on the in-process group (`LocalGroup`), on the CPU, or on one GPU for one rank.
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ditmoe::dist::world::expert_layout;
use ditmoe::dist::{Communicator, ExpertParallel, LocalGroup, World};
use ditmoe::moe::{MoeConfig, MoeInput, MoeLayer};
use ditmoe::runtime::timing::median_of_ms;
use ditmoe::train::{RunStart, TrainConfig, Trainer};
use ditmoe::{DitConfig, ExecutionPlan, Precision};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

#[path = "support/args.rs"]
mod args;
use args::{arg, flag, list};
#[path = "support/train_bench.rs"]
mod train_bench;
use ditmoe::runtime::memory::gib;
use train_bench::{out_of_memory, time_steps, train_config, training_preset, write_latents, Timing};


/// What every rank runs with.
#[derive(Clone, Copy)]
struct Settings {
    precision: Precision,
    capacity_factor: f64,
    warmup: usize,
    iters: usize,
}

/// One exchange, timed alone: the bytes this rank sends and the median time.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Exchange {
    bytes: usize,
    ms: f64,
    algbw_gbs: f64,
    busbw_gbs: f64,
}

impl Exchange {
    fn new(bytes: usize, ms: f64, world: usize) -> Self {
        let algbw = bytes as f64 / (ms * 1e-3) / 1e9;
        Self { bytes, ms, algbw_gbs: algbw, busbw_gbs: algbw * (world - 1) as f64 / world as f64 }
    }
}

#[derive(Debug, serde::Serialize)]
struct Row {
    model: String,
    batch: usize,
    world: usize,
    dispatch: &'static str,
    tokens_per_rank: usize,
    /// The static dispatch's capacity per (rank, expert).
    capacity: Option<usize>,
    layer_ms: Option<f64>,
    single_device_ms: f64,
    dispatch_exchange: Exchange,
    combine_exchange: Exchange,
    /// Why the layer did not run (the static capacity overflowed).
    error: Option<String>,
}

/// Deterministic weights for every parameter of the layer (the same on every rank and process):
/// uniform with std `1 / sqrt(fan-in)` from a fixed seed.
fn checkpoint(cfg: &MoeConfig, dtype: DType, dev: &Device) -> Result<HashMap<String, Tensor>> {
    let varmap = candle_nn::VarMap::new();
    MoeLayer::new(cfg, &ExecutionPlan::training(&Device::Cpu, Precision::F32), VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let mut vars: Vec<_> = varmap.data().lock().expect("varmap").iter().map(|(n, v)| (n.clone(), v.dims().to_vec())).collect();
    vars.sort();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = HashMap::new();
    for (name, dims) in vars {
        let bound = 3f64.sqrt() / (*dims.last().unwrap_or(&1) as f64).sqrt();
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * bound as f32
            })
            .collect();
        out.insert(name, Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?);
    }
    Ok(out)
}

/// One rank's rows for one model and batch: the single-device layer, then each dispatch.
fn rank_rows(comm: Arc<dyn Communicator>, model: &str, batch: usize, weights: &HashMap<String, Tensor>, dev: &Device, set: Settings) -> Result<Vec<Row>> {
    let cfg = ditmoe::presets::get(model)?.config.moe_config();
    let (p, rank, d, e, k) = (comm.world_size(), comm.rank(), cfg.hidden_size, cfg.num_experts, cfg.top_k);
    let s = batch * 256;
    let plan = ExecutionPlan::inference(dev, set.precision).with_moe_kernels(true);
    let dtype = plan.weight_dtype();
    let x = Tensor::randn(0f32, 1.0, (s, d), dev)?.to_dtype(dtype)?;
    let time = |layer: &MoeLayer| median_of_ms(dev, set.warmup, set.iters, || layer.forward(&MoeInput { tokens: &x, seq_len: 256, unconditional: None, train: false }).map(|_| ()));
    let vb = || VarBuilder::from_tensors(weights.clone(), dtype, dev);
    let single = MoeLayer::new(&cfg, &plan, vb())?;
    let single_device_ms = time(&single)?;
    let counts: Vec<usize> = single.forward(&MoeInput { tokens: &x, seq_len: 256, unconditional: None, train: false })?.expert_counts.to_dtype(DType::U32)?.to_vec1::<u32>()?.into_iter().map(|c| c as usize).collect();
    let all = comm.all_gather_counts(&counts)?;
    let per = e / p;
    let capacity = ((set.capacity_factor * (s * k) as f64 / e as f64).ceil() as usize).max(1);
    let elem = dtype.size_in_bytes();
    // one exchange alone, with the given splits, in the experts' dtype
    let exchange = |send: Vec<usize>, recv: Vec<usize>| -> Result<Exchange> {
        let rows = Tensor::zeros((send.iter().sum::<usize>(), d), dtype, dev)?;
        let ms = median_of_ms(dev, set.warmup, set.iters, || comm.all_to_all_v(&rows, &send, &recv).map(|_| ()))?;
        Ok(Exchange::new(send.iter().sum::<usize>() * d * elem, ms, p))
    };
    let block = |c: &[usize], q: usize| c[q * per..(q + 1) * per].iter().sum::<usize>();
    let a2a_send: Vec<usize> = (0..p).map(|q| block(&counts, q)).collect();
    let a2a_recv: Vec<usize> = all.iter().map(|c| block(c, rank)).collect();
    let tokens: Vec<usize> = comm.all_gather_counts(&[s])?.into_iter().map(|c| c[0]).collect();
    let dispatches = [
        ("all-to-all", ExpertParallel::new(comm.clone()), None, [(a2a_send.clone(), a2a_recv.clone()), (a2a_recv, a2a_send)]),
        ("static", ExpertParallel::new(comm.clone()).with_static_capacity(capacity), Some(capacity), [(vec![per * capacity; p], vec![per * capacity; p]), (vec![per * capacity; p], vec![per * capacity; p])]),
        ("all-gather", ExpertParallel::new(comm.clone()).with_all_gather(), None, [(vec![s; p], tokens.clone()), (tokens, vec![s; p])]),
    ];
    let mut rows = Vec::new();
    for (name, ep, capacity, [dispatch, combine]) in dispatches {
        let plan = ExecutionPlan { expert_parallel: Some(ep.clone()), ..plan.clone() };
        let layer = MoeLayer::new(&cfg, &plan, vb())?;
        let layer_ms = time(&layer)?;
        let error = ep.check_capacity().err().map(|e| e.to_string().lines().next().unwrap_or("").to_string());
        let dispatch_exchange = exchange(dispatch.0, dispatch.1)?;
        let combine_exchange = exchange(combine.0, combine.1)?;
        rows.push(Row {
            model: model.to_string(),
            batch,
            world: p,
            dispatch: name,
            tokens_per_rank: s,
            capacity,
            layer_ms: error.is_none().then_some(layer_ms),
            single_device_ms,
            dispatch_exchange,
            combine_exchange,
            error,
        });
    }
    Ok(rows)
}

fn print_row(r: &Row) {
    let x = |e: &Exchange| format!("{:.2} MB, {:.3} ms, {:.2} / {:.2}", e.bytes as f64 / 1e6, e.ms, e.algbw_gbs, e.busbw_gbs);
    let layer = match (&r.layer_ms, &r.error) {
        (Some(ms), _) => format!("{ms:.2} ({:.2}x)", ms / r.single_device_ms),
        (None, Some(e)) => e.clone(),
        (None, None) => "–".into(),
    };
    let dispatch = match r.capacity {
        Some(c) => format!("{} (C = {c})", r.dispatch),
        None => r.dispatch.to_string(),
    };
    println!("| {} | {} | {} | {dispatch} | {:.2} | {layer} | {} | {} |", r.model, r.batch, r.world, r.single_device_ms, x(&r.dispatch_exchange), x(&r.combine_exchange));
}

/// `--train`'s row: one model, batch per rank and world size.
#[derive(Debug, serde::Serialize)]
struct TrainRow {
    model: String,
    world: usize,
    expert_parallel: usize,
    batch_per_rank: usize,
    global_batch: usize,
    precision: String,
    ms_per_step: Option<f64>,
    images_per_s_per_gpu: Option<f64>,
    /// Each rank's peak device memory during a timed step (None on the CPU).
    peak_gib: Vec<Option<f64>>,
    loss: Option<f32>,
    /// Why the configuration did not run (the trainer refused it as too large).
    error: Option<String>,
}

/// Every rank's plan and whole group for `p` ranks as threads with the experts split over
/// groups of `ep`: what `World::apply` makes of a launched job, on `LocalGroup`s.
fn local_plans(base: &ExecutionPlan, p: usize, ep: usize) -> Result<Vec<(ExecutionPlan, Arc<dyn Communicator>)>> {
    let (ep_groups, edp_groups) = expert_layout(p, ep)?;
    // each rank's communicator in every group of a partition
    let member = |groups: Vec<Vec<usize>>| -> Vec<Arc<dyn Communicator>> {
        let mut at: Vec<Option<Arc<dyn Communicator>>> = vec![None; p];
        for g in groups {
            for (&r, c) in g.iter().zip(LocalGroup::new(g.len())) {
                at[r] = Some(Arc::new(c));
            }
        }
        at.into_iter().map(|c| c.expect("a partition of the ranks")).collect()
    };
    let (eps, edps) = (member(ep_groups), member(edp_groups));
    Ok(LocalGroup::new(p)
        .into_iter()
        .zip(eps.into_iter().zip(edps))
        .map(|(c, (e, edp))| {
            let dp: Arc<dyn Communicator> = Arc::new(c);
            // as `World::expert_groups`: experts over the whole job take its group, with no
            // expert-data-parallel one
            let (e, edp) = if ep == p { (dp.clone(), None) } else { (e, Some(edp)) };
            (base.clone().with_parallel_groups(dp.clone(), e, edp), dp)
        })
        .collect())
}

/// A rank's run: its timing and every rank's peak memory, or why the trainer refused it.
type RankOutcome = Result<(Timing, Vec<Option<u64>>), String>;

/// One rank's timing and every rank's peak memory (a collective on a GPU), or the trainer's
/// refusal of a model too large for the device. The refusal comes before any collective and
/// alike on every rank (the same estimate against the same cards), so the ranks agree on it.
fn train_rank(cfg: TrainConfig, plan: &ExecutionPlan, comm: &dyn Communicator, set: Settings) -> candle_core::Result<RankOutcome> {
    let mut trainer = match Trainer::new(cfg, plan, RunStart::Overwrite) {
        Ok(t) => t,
        Err(e) => return out_of_memory(&e).map(Err).ok_or(e),
    };
    let t = time_steps(&mut trainer, set.warmup, set.iters, &plan.device)?;
    let peaks = match t.peak_bytes {
        Some(b) => comm.all_gather_counts(&[b as usize])?.into_iter().map(|c| Some(c[0] as u64)).collect(),
        None => vec![None; comm.world_size()],
    };
    Ok(Ok((t, peaks)))
}

fn print_train_row(r: &TrainRow) {
    let ms = r.ms_per_step.map_or("–".into(), |ms| format!("{ms:.1}"));
    let ips = r.images_per_s_per_gpu.map_or("–".into(), |x| format!("{x:.1}"));
    let peaks = match r.peak_gib.iter().all(Option::is_none) {
        true => "–".into(),
        false => r.peak_gib.iter().map(|g| g.map_or("–".into(), |g| format!("{g:.1}"))).collect::<Vec<_>>().join(" / "),
    };
    let last = match (&r.error, r.loss) {
        (Some(e), _) => e.clone(),
        (None, Some(l)) => format!("{l:.3}"),
        (None, None) => "–".into(),
    };
    println!("| {} | {} | {} | {} ({}) | {} | {ms} | {ips} | {peaks} | {last} |", r.model, r.world, r.expert_parallel, r.batch_per_rank, r.global_batch, r.precision);
}

/// `--train`: the rows of every model, batch and world size (module docs).
fn train_rows(world: Option<&World>, device: &Device, batches: &[usize], set: Settings, head: bool) -> Result<Vec<TrainRow>> {
    let models: Vec<(String, DitConfig)> = match arg("--model", "").as_str() {
        "" => list("--models", "S/2,XL/2").iter().map(|m| format!("DiT-MoE-{m}-8E2A")).map(|m| Ok((m.clone(), training_preset(&m)?))).collect::<Result<_>>()?,
        file => vec![(file.to_string(), DitConfig::from_file(Path::new(file))?)],
    };
    let ranks: Vec<usize> = match world {
        Some(w) => vec![w.world_size()],
        None => list("--ranks", "1,2,4").iter().map(|p| p.parse()).collect::<Result<_, _>>()?,
    };
    let expert_parallel: Option<usize> = flag("--expert-parallel").then(|| arg("--expert-parallel", "").parse()).transpose()?;
    let work = std::env::temp_dir().join(format!("ditmoe-bench-ep-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    if head {
        println!("| model | P | EP | batch / rank (global) | precision | ms / step | images/s per GPU | peak GiB per rank | loss |");
        println!("|---|---:|---:|---:|---|---:|---:|---|---:|");
    }
    let mut rows = Vec::new();
    for (name, model) in &models {
        let most = batches.iter().max().unwrap_or(&1) * ranks.iter().max().unwrap_or(&1);
        let shards = write_latents(&work, model, 4 * most)?;
        for &batch in batches {
            for &p in &ranks {
                let ep = expert_parallel.unwrap_or(p);
                let cfg = train_config(&work, model, &shards, batch * p, false, false)?;
                let plan = ExecutionPlan::training(device, set.precision);
                plan.apply_matmul_precision();
                let outcome = match world {
                    // a failure past the trainer's refusal ends the job on every rank
                    Some(w) => w.apply(plan, ep).and_then(|plan| train_rank(cfg, &plan, &*w.comm(), set)).inspect_err(|e| w.report_error(&e.to_string()))?,
                    None => {
                        let per_rank: Vec<_> = std::thread::scope(|scope| -> Result<Vec<_>> {
                            let handles: Vec<_> = local_plans(&plan, p, ep)?
                                .into_iter()
                                .map(|(plan, comm)| {
                                    let cfg = cfg.clone();
                                    scope.spawn(move || train_rank(cfg, &plan, &*comm, set))
                                })
                                .collect();
                            Ok(handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect())
                        })?;
                        // every rank's error surfaces; rank 0's timing is the row's
                        per_rank.into_iter().collect::<candle_core::Result<Vec<_>>>()?.into_iter().next().expect("rank 0")
                    }
                };
                let row = TrainRow {
                    model: name.clone(),
                    world: p,
                    expert_parallel: ep,
                    batch_per_rank: batch,
                    global_batch: batch * p,
                    precision: set.precision.to_string(),
                    ms_per_step: outcome.as_ref().ok().map(|(t, _)| t.ms),
                    images_per_s_per_gpu: outcome.as_ref().ok().map(|(t, _)| batch as f64 / t.ms * 1e3),
                    peak_gib: outcome.as_ref().map_or(vec![], |(_, peaks)| peaks.iter().map(|b| b.map(gib)).collect()),
                    loss: outcome.as_ref().ok().map(|(t, _)| t.loss),
                    error: outcome.err(),
                };
                if head {
                    print_train_row(&row);
                }
                rows.push(row);
            }
        }
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(rows)
}

fn main() -> Result<()> {
    let device = match arg("--device", "cpu").as_str() {
        "cpu" => Device::Cpu,
        // the communicator is made for this device: LOCAL_RANK's GPU when launched
        _ => ditmoe::runtime::graph::cuda_device(ditmoe::dist::local_gpu())?,
    };
    let world = World::from_env(&device)?;
    let models: Vec<String> = list("--models", "S/2,XL/2").iter().map(|m| format!("DiT-MoE-{m}-8E2A")).collect();
    let batches: Vec<usize> = list("--batches", "1").iter().map(|b| b.parse()).collect::<Result<_, _>>()?;
    let set = Settings {
        precision: arg("--dtype", if device.is_cuda() { "bf16" } else { "f32" }).parse().map_err(anyhow::Error::msg)?,
        capacity_factor: arg("--capacity-factor", "2").parse()?,
        warmup: arg("--warmup", "2").parse()?,
        iters: arg("--iters", "10").parse()?,
    };
    let head = world.as_ref().is_none_or(|w| w.rank() == 0);
    let json = std::env::args().skip_while(|a| a != "--json").nth(1).filter(|_| head);
    if flag("--train") {
        let rows = train_rows(world.as_ref(), &device, &batches, set, head)?;
        if let Some(path) = json {
            std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
        }
        return Ok(());
    }
    if head {
        println!("| model | batch | P | dispatch | single-device ms | layer ms (vs single) | dispatch exchange: bytes/rank, ms, algbw / busbw GB/s | combine exchange |");
        println!("|---|---:|---:|---|---:|---:|---|---|");
    }
    let mut rows = Vec::new();
    for model in &models {
        let cfg = ditmoe::presets::get(model)?.config.moe_config();
        let precision: Precision = set.precision;
        let weights = checkpoint(&cfg, precision.weight_dtype(), &device)?;
        for &batch in &batches {
            let run: Vec<Row> = match &world {
                Some(w) => rank_rows(w.comm(), model, batch, &weights, &device, set)?,
                None => {
                    let mut got = Vec::new();
                    for p in list("--ranks", "1,2,4").iter().map(|p| p.parse::<usize>()).collect::<Result<Vec<_>, _>>()? {
                        let per_rank: Vec<candle_core::Result<Vec<Row>>> = std::thread::scope(|scope| {
                            let handles: Vec<_> = LocalGroup::new(p)
                                .into_iter()
                                .map(|c| {
                                    let (weights, device) = (&weights, &device);
                                    scope.spawn(move || rank_rows(Arc::new(c), model, batch, weights, device, set).map_err(candle_core::Error::wrap))
                                })
                                .collect();
                            handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
                        });
                        // every rank's error surfaces; rank 0's rows are the table's
                        let mut per_rank = per_rank.into_iter().collect::<candle_core::Result<Vec<_>>>()?.into_iter();
                        got.extend(per_rank.next().expect("rank 0"));
                    }
                    got
                }
            };
            if head {
                run.iter().for_each(print_row);
            }
            rows.extend(run);
        }
    }
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}
