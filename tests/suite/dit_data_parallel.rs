//! `ditmoe train` and sampling under data and expert parallelism on the in-process backend
//! (ranks as threads, `ditmoe::dist::LocalGroup`): the same global batch gives the
//! single-device run's losses, weights, EMA and AdamW moments whether the ranks replicate every
//! weight or split the experts; a checkpoint written under one layout resumes under another; a
//! batch that does not split over the ranks is refused; a model whose experts are spread over
//! the ranks samples the single-device images.
use crate::common;

use candle_core::{Device, Tensor};
use common::{rel_err, rel_l2, Scratch};
use ditmoe::checkpoint::ModelDir;
use ditmoe::dist::{Communicator, LocalGroup};
use ditmoe::plan::DataParallel;
use ditmoe::sampling::{Guidance, GuidedModel, ImageNoise, SamplerKind};
use ditmoe::train::{checkpoint, RunStart, RunSummary, TrainConfig, Trainer};
use ditmoe::{ExecutionPlan, Precision};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Losses of one step agree to this (absolute, on losses near 1).
const LOSS_TOL: f64 = 1e-6;
/// Weights, EMA and moments agree to this (max-norm relative).
const WEIGHT_TOL: f64 = 1e-5;

/// The shared tiny model with its balance loss in the per-image form (`seq_aux`), a mean over
/// images, so the ranks' average is the single-device loss (the trainer's docs say why the
/// batch form is not).
fn model_json(seq_aux: bool) -> String {
    common::train::MODEL.replace("\"n_shared_experts\":1", &format!("\"n_shared_experts\":1,\"seq_aux\":{seq_aux}"))
}

fn setup(tag: &str, seq_aux: bool) -> (Scratch, TrainConfig) {
    let dir = common::train::scratch_training_folder(tag);
    std::fs::write(dir.join("model.json"), model_json(seq_aux)).unwrap();
    let cfg: TrainConfig = serde_json::from_value(serde_json::json!({
        "model": dir.join("model.json"), "data": dir.join("data"), "out": dir.join("run"),
        "objective": "ddpm", "image_size": 6, "global_batch": 8, "micro_batch": 4, "steps": 3,
        "lr": 1e-3, "max_grad_norm": 0.5, "ema_decay": 0.9, "seed": 7, "log_every": 1,
        "ckpt_every": 100, "num_workers": 0,
    }))
    .unwrap();
    (dir, cfg)
}

fn with_out(cfg: &TrainConfig, dir: &Scratch, name: &str) -> TrainConfig {
    TrainConfig { out: dir.join(name), ..cfg.clone() }
}

#[derive(Debug, Clone, Copy)]
enum Layout {
    Single,
    /// P ranks, every weight replicated.
    Data(usize),
    /// P ranks, the experts split over all of them.
    Expert(usize),
}

fn comms(p: usize) -> Vec<Arc<dyn Communicator>> {
    LocalGroup::new(p).into_iter().map(|c| Arc::new(c) as Arc<dyn Communicator>).collect()
}

fn plans(layout: Layout, base: &ExecutionPlan) -> Vec<ExecutionPlan> {
    match layout {
        Layout::Single => vec![base.clone()],
        Layout::Data(p) => comms(p).into_iter().map(|c| base.clone().with_data_parallel(DataParallel::new(c))).collect(),
        Layout::Expert(p) => comms(p).into_iter().map(|c| base.clone().with_expert_parallel(c)).collect(),
    }
}

fn f32_plan() -> ExecutionPlan {
    ExecutionPlan::training(&Device::Cpu, Precision::F32)
}

/// What a run ends with: every rank's summary (the same records on each), and its last
/// checkpoint as written (the single-device format).
struct Run {
    summary: RunSummary,
    ckpt: checkpoint::Checkpoint,
}

fn run(layout: Layout, plan: &ExecutionPlan, cfg: &TrainConfig, start: RunStart) -> Run {
    let summaries: Vec<RunSummary> = std::thread::scope(|scope| {
        let handles: Vec<_> = plans(layout, plan)
            .into_iter()
            .map(|plan| {
                let cfg = cfg.clone();
                scope.spawn(move || Trainer::new(cfg, &plan, start)?.run(false))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    let losses = |s: &RunSummary| s.steps.iter().map(|r| (r.loss, r.aux, r.grad_norm)).collect::<Vec<_>>();
    for s in &summaries[1..] {
        assert_eq!(losses(s), losses(&summaries[0]), "every rank logs the global values");
    }
    let (ckpt, warnings) = checkpoint::load_latest(&checkpoint::checkpoints_dir(&cfg.out), &Device::Cpu).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    Run { summary: summaries.into_iter().next().unwrap(), ckpt: ckpt.expect("a checkpoint") }
}

/// The worst max-norm relative error over the tensors of `want`, which `got` must name alike.
fn worst(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>) -> (f64, String) {
    worst_by(got, want, rel_err)
}

/// The worst `err` over the tensors of `want`, which `got` must name alike.
fn worst_by(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, err: fn(&Tensor, &Tensor) -> f64) -> (f64, String) {
    let (g, w): (BTreeMap<_, _>, BTreeMap<_, _>) = (got.iter().collect(), want.iter().collect());
    assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>(), "the same tensors, under global names");
    w.iter().map(|(n, t)| (err(g[n], t), n.to_string())).fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a })
}

/// `got` against `want` from step `from` on: losses, balance losses, gradient norms, expert
/// counts, then the final weights, EMA and AdamW moments. Prints the numbers.
fn assert_matches(got: &Run, want: &Run, from: usize, what: &str) {
    let steps = &want.summary.steps[from..];
    assert_eq!(got.summary.steps.len(), steps.len(), "{what}: steps");
    let mut loss_diff = 0f64;
    for (a, b) in got.summary.steps.iter().zip(steps) {
        for (x, y) in [(a.loss, b.loss), (a.aux, b.aux)] {
            loss_diff = loss_diff.max((x as f64 - y as f64).abs());
        }
        let norm = (a.grad_norm as f64 - b.grad_norm as f64).abs() / b.grad_norm as f64;
        assert!(norm < WEIGHT_TOL, "{what}, step {}: gradient norm {} against {}", b.step, a.grad_norm, b.grad_norm);
        assert_eq!(a.expert_counts, b.expert_counts, "{what}, step {}: the global batch's expert counts", b.step);
    }
    let (model, ema, optim) = (worst(&got.ckpt.model, &want.ckpt.model), worst(&got.ckpt.ema, &want.ckpt.ema), worst(&got.ckpt.optim, &want.ckpt.optim));
    eprintln!(
        "{what}: losses within {loss_diff:.1e}; weights {:.1e} ({}), EMA {:.1e} ({}), AdamW moments {:.1e} ({})",
        model.0, model.1, ema.0, ema.1, optim.0, optim.1
    );
    assert!(loss_diff <= LOSS_TOL, "{what}: losses differ by {loss_diff:.2e}");
    for (which, (err, name)) in [("weight", model), ("EMA", ema), ("moment", optim)] {
        assert!(err < WEIGHT_TOL, "{what}: {which} {name} differs by {err:.2e}");
    }
    assert_eq!(got.ckpt.state.loader, want.ckpt.state.loader, "{what}: the loader position");
}

#[test]
fn data_and_expert_parallel_training_match_one_device() {
    let (dir, cfg) = setup("dit-dp", true);
    // a sample grid at the last step: under expert parallelism a collective
    let cfg = TrainConfig { sample_every: 3, ..cfg };
    let single = run(Layout::Single, &f32_plan(), &with_out(&cfg, &dir, "p1"), RunStart::New);
    assert!(single.summary.steps.iter().all(|s| s.aux > 0.0), "the balance loss is on");
    let grid = |name: &str| image::open(dir.join(name).join("samples/step-00000003.png")).unwrap().to_luma8();
    for (i, (what, layout)) in [("data parallel, P = 2", Layout::Data(2)), ("experts split over P = 2", Layout::Expert(2))].into_iter().enumerate() {
        let name = format!("layout{i}");
        let got = run(layout, &f32_plan(), &with_out(&cfg, &dir, &name), RunStart::New);
        assert_matches(&got, &single, 0, what);
        let (a, b) = (grid(&name), grid("p1"));
        let off = a.pixels().zip(b.pixels()).map(|(x, y)| x.0[0].abs_diff(y.0[0])).max().unwrap();
        eprintln!("{what}: sample grid within {off} of 255");
        assert!(off <= 1, "{what}: the sample grid differs by {off} levels");
        // the exported EMA folder is the single-device one
        let (e, e0) = (ModelDir::open(&dir.join(&name).join("ema")).unwrap(), ModelDir::open(&dir.join("p1/ema")).unwrap());
        assert_eq!(e.config, e0.config);
    }
}

#[test]
fn recomputation_under_expert_parallelism_matches_one_device() {
    let (dir, cfg) = setup("dit-dp-recompute", true);
    let single = run(Layout::Single, &f32_plan(), &with_out(&cfg, &dir, "p1"), RunStart::New);
    let recomputed = TrainConfig { recompute: true, ..with_out(&cfg, &dir, "ep2") };
    let got = run(Layout::Expert(2), &f32_plan(), &recomputed, RunStart::New);
    assert_matches(&got, &single, 0, "experts split over P = 2, --recompute");
}

#[test]
fn bf16_training_under_expert_parallelism_stays_within_bf16_rounding() {
    // bf16 gradients are rounded per rank before the f32 sum, so P = 2 cannot equal P = 1
    // bitwise: it must stay as close to the P = 1 bf16 run as that run is to f32 training
    let (dir, cfg) = setup("dit-dp-bf16", true);
    let bf16 = ExecutionPlan::training(&Device::Cpu, Precision::Bf16);
    let exact = run(Layout::Single, &f32_plan(), &with_out(&cfg, &dir, "f32"), RunStart::New);
    let single = run(Layout::Single, &bf16, &with_out(&cfg, &dir, "p1"), RunStart::New);
    let got = run(Layout::Expert(2), &bf16, &with_out(&cfg, &dir, "ep2"), RunStart::New);
    let loss = got.summary.steps.iter().zip(&single.summary.steps).map(|(a, b)| (a.loss as f64 - b.loss as f64).abs()).fold(0.0, f64::max);
    let (split, name) = worst_by(&got.ckpt.model, &single.ckpt.model, rel_l2);
    let (floor, floor_name) = worst_by(&single.ckpt.model, &exact.ckpt.model, rel_l2);
    eprintln!("bf16, experts split over P = 2: losses within {loss:.1e}, weights {split:.1e} ({name}) relative L2; bf16 against f32 at P = 1: {floor:.1e} ({floor_name})");
    assert!(loss < 1e-4, "bf16 at P = 2: losses differ by {loss:.2e}");
    assert!(split <= floor, "bf16 at P = 2: {name} differs by {split:.2e}, more than bf16 itself moves the weights ({floor:.2e})");
}

#[test]
fn checkpoints_resume_across_world_sizes() {
    let (dir, cfg) = setup("dit-dp-resume", true);
    let single = run(Layout::Single, &f32_plan(), &with_out(&cfg, &dir, "straight"), RunStart::New);
    let cut = TrainConfig { steps: 2, ..cfg.clone() };
    for (what, first, then) in [("P = 2 (experts split) then P = 1", Layout::Expert(2), Layout::Single), ("P = 1 then P = 2 (experts split)", Layout::Single, Layout::Expert(2))] {
        let name = what.replace([' ', '(', ')', '='], "");
        run(first, &f32_plan(), &with_out(&cut, &dir, &name), RunStart::New);
        let resumed = run(then, &f32_plan(), &with_out(&cfg, &dir, &name), RunStart::Resume);
        assert_eq!(resumed.summary.resumed_from.as_ref().and_then(|p| p.file_name()).and_then(|n| n.to_str()), Some("step-00000002"), "{what}");
        assert_matches(&resumed, &single, 2, what);
    }
}

#[test]
fn the_batch_form_balance_loss_is_per_rank() {
    // DiT-MoE's batch-form balance loss (the released configs) is each rank's own: the first
    // step, on equal weights, has the single-device diffusion loss and another balance loss
    let (dir, cfg) = setup("dit-dp-batch-aux", false);
    let cfg = TrainConfig { steps: 1, ..cfg };
    let single = run(Layout::Single, &f32_plan(), &with_out(&cfg, &dir, "p1"), RunStart::New);
    let got = run(Layout::Data(2), &f32_plan(), &with_out(&cfg, &dir, "dp2"), RunStart::New);
    let (a, b) = (&got.summary.steps[0], &single.summary.steps[0]);
    eprintln!("batch-form balance loss: P = 2 {} against P = 1 {}; diffusion loss {} against {}", a.aux, b.aux, a.loss, b.loss);
    assert!((a.loss as f64 - b.loss as f64).abs() <= LOSS_TOL, "the diffusion loss splits exactly");
    assert!((a.aux as f64 - b.aux as f64).abs() > 1e-6, "the batch-form balance loss is per rank");
}

#[test]
fn a_batch_that_does_not_split_is_refused() {
    let (dir, cfg) = setup("dit-dp-refused", true);
    for (field, cfg) in [("global_batch`: 8", cfg.clone()), ("micro_batch`: 4", TrainConfig { global_batch: 12, ..cfg.clone() })] {
        let errs: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = plans(Layout::Data(3), &f32_plan())
                .into_iter()
                .map(|plan| {
                    let cfg = with_out(&cfg, &dir, "three");
                    scope.spawn(move || Trainer::new(cfg, &plan, RunStart::New).err().expect("refused").to_string())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = format!("train config field `{field}");
        assert!(errs.iter().all(|e| e.contains(&want) && e.contains("3 data-parallel ranks")), "{errs:?}");
    }
}

#[test]
fn experts_spread_over_ranks_sample_the_single_device_images() {
    // a trained model's EMA folder, sampled with guidance on one device and with its experts
    // spread over two ranks, each loading only its own from the one file
    let (dir, cfg) = setup("dit-dp-sample", true);
    let model = run(Layout::Single, &f32_plan(), &with_out(&cfg, &dir, "run"), RunStart::New).summary.ema_dir;
    let folder = ModelDir::open(&model).unwrap();
    let sample = |plan: ExecutionPlan| -> Tensor {
        let dit = folder.load(&plan).unwrap();
        let sampler = SamplerKind::Euler.build(6, &folder.config, true).unwrap();
        let guided = GuidedModel::new(&dit, &[0, 1, 2, 2], Guidance { scale: 4.0, guide_all_channels: true }, &Device::Cpu).unwrap();
        sampler.sample_seeded(&guided, &mut ImageNoise::new(3, 0..4), &mut |_| {}).unwrap()
    };
    let base = ExecutionPlan::inference(&Device::Cpu, Precision::F32);
    let want = sample(base.clone());
    let got: Vec<Tensor> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms(2).into_iter().map(|c| {
            let plan = base.clone().with_expert_parallel(c);
            scope.spawn(move || sample(plan))
        }).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, x) in got.iter().enumerate() {
        let err = rel_err(x, &want);
        eprintln!("rank {r} of 2, experts split: images within {err:.1e} (max-norm relative)");
        assert!(err < WEIGHT_TOL, "rank {r}: images differ by {err:.2e}");
    }
}

/// `ditmoe …` with torchrun's variables cleared (a launch sets its own), checked to succeed;
/// its output.
fn ditmoe(args: &[String]) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ditmoe"));
    cmd.args(args);
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
        cmd.env_remove(v);
    }
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ditmoe {}:\n{text}", args.join(" "));
    text
}

/// `ditmoe launch --nproc-per-node n -- <args>` on a port that was free a moment ago.
fn launched(n: usize, args: &[String]) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut all: Vec<String> = ["launch", "--nproc-per-node", &n.to_string(), "--master-port", &port.to_string(), "--"].map(String::from).to_vec();
    all.extend_from_slice(args);
    ditmoe(&all)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn launched_train_and_generate_split_the_experts_over_processes() {
    let (dir, cfg) = setup("dit-dp-launch", true);
    std::fs::write(dir.join("train.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let config = path("train.json");
    let train = |out: &str| strings(&["train", "--config", &config, "--out", &path(out), "--quiet"]);
    ditmoe(&train("p1"));
    let text = launched(2, &[train("ep2"), strings(&["--expert-parallel", "2"])].concat());
    assert!(text.contains("over 2 ranks (experts over 2)"), "{text}");
    let ckpt = |name: &str| checkpoint::load_latest(&checkpoint::checkpoints_dir(&dir.join(name)), &Device::Cpu).unwrap().0.unwrap();
    let (got, want) = (ckpt("ep2"), ckpt("p1"));
    let (err, name) = worst(&got.model, &want.model);
    eprintln!("launched train, experts over 2 processes: weights within {err:.1e} ({name})");
    assert!(err < WEIGHT_TOL, "launched train: {name} differs by {err:.2e}");

    // the single-device model, sampled by two processes that each load half of its experts
    let ema = path("p1/ema");
    let generate = |out: &str| strings(&["generate", "--model", &ema, "--num", "2", "--sampler", "rf-euler", "--steps", "4", "--seed", "5", "--out", &path(out)]);
    ditmoe(&generate("one.png"));
    let text = launched(2, &generate("two.png"));
    assert!(text.contains("[rank0]: wrote") && !text.contains("[rank1]: wrote"), "rank 0 alone writes:\n{text}");
    let (a, b) = (image::open(path("two.png")).unwrap().to_luma8(), image::open(path("one.png")).unwrap().to_luma8());
    assert_eq!(a.dimensions(), b.dimensions());
    let off = a.pixels().zip(b.pixels()).map(|(x, y)| x.0[0].abs_diff(y.0[0])).max().unwrap();
    eprintln!("launched generate, experts over 2 processes: pixels within {off} of 255");
    assert!(off <= 1, "launched generate differs by {off} levels");
}
