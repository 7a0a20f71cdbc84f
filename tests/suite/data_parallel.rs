//! Data-parallel training of the language model on the in-process backend (ranks as threads,
//! `ditmoe::dist::LocalGroup`): the same global batch gives the single-process run's losses and
//! weights whether the ranks replicate every weight (pure data parallelism) or split the
//! experts (expert parallelism, alone or with an expert-data-parallel group); a checkpoint
//! written under one layout resumes under another; the exported folder is the single-process
//! model.
use crate::common;

use candle_core::{Device, Tensor};
use common::{rel_err, rel_l2};
use ditmoe::dist::{Communicator, LocalGroup};
use ditmoe::lm::train_config::LmTrainConfig;
use ditmoe::lm::trainer::{LmTrainer, TOKENIZER_FILE};
use ditmoe::lm::load_hf;
use ditmoe::plan::DataParallel;
use ditmoe::text::Tokenizer;
use ditmoe::train::RunStart;
use ditmoe::{ExecutionPlan, Precision};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const TOL: f64 = 1e-5;

/// The shared parallel-training run (`common::lm::parallel_run`) as a config.
fn setup(tag: &str) -> (common::Scratch, LmTrainConfig) {
    let (dir, cfg) = common::lm::parallel_run(tag);
    (dir, serde_json::from_value(cfg).unwrap())
}

fn training() -> ExecutionPlan {
    ExecutionPlan::training(&Device::Cpu, Precision::F32)
}

/// How the ranks of a run are laid out.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// One process.
    Single,
    /// P ranks, every weight replicated.
    Data(usize),
    /// P ranks, the experts split over all of them (the expert-parallel group is the
    /// data-parallel group).
    Expert(usize),
    /// P ranks, the experts split over groups of EP consecutive ranks and replicated over
    /// P / EP of them (Megatron-Core's expert-data-parallel groups).
    ExpertData(usize, usize),
}

/// Every rank's plan for `layout`.
fn plans(layout: Layout) -> Vec<ExecutionPlan> {
    let arc = |c: ditmoe::dist::LocalComm| Arc::new(c) as Arc<dyn Communicator>;
    match layout {
        Layout::Single => vec![training()],
        Layout::Data(p) => LocalGroup::new(p).into_iter().map(|c| training().with_data_parallel(DataParallel::new(arc(c)))).collect(),
        Layout::Expert(p) => LocalGroup::new(p).into_iter().map(|c| training().with_expert_parallel(arc(c))).collect(),
        Layout::ExpertData(p, ep) => {
            let mut dp: Vec<_> = LocalGroup::new(p).into_iter().map(Some).collect();
            let mut eps: Vec<_> = (0..p / ep).flat_map(|_| LocalGroup::new(ep)).map(Some).collect();
            // rank r: expert-parallel rank r % ep of block r / ep; expert-data-parallel rank r / ep
            let mut edp: Vec<Vec<_>> = (0..ep).map(|_| LocalGroup::new(p / ep).into_iter().map(Some).collect()).collect();
            (0..p)
                .map(|r| {
                    let d = DataParallel::new(arc(dp[r].take().unwrap())).with_expert_data_parallel(arc(edp[r % ep][r / ep].take().unwrap()));
                    training().with_expert_parallel(arc(eps[r].take().unwrap())).with_data_parallel(d)
                })
                .collect()
        }
    }
}

/// What a run ends with: the logged losses (cross-entropy, balance) per step, the gradient
/// norms, and every weight by global name (the union of the ranks' weights).
struct Run {
    losses: Vec<(f32, f32)>,
    grad_norms: Vec<f32>,
    expert_counts: Vec<Vec<Vec<usize>>>,
    weights: BTreeMap<String, Tensor>,
    model_dir: std::path::PathBuf,
}

fn run(layout: Layout, cfg: &LmTrainConfig, start: RunStart) -> Run {
    let ranks: Vec<(ditmoe::lm::trainer::LmRunSummary, Vec<(String, Tensor)>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = plans(layout)
            .into_iter()
            .map(|plan| {
                let cfg = cfg.clone();
                scope.spawn(move || {
                    let mut t = LmTrainer::new(cfg, &plan, start)?;
                    let summary = t.run(false)?;
                    candle_core::Result::Ok((summary, t.model().named_params().to_vec()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    let first = &ranks[0].0;
    for (s, _) in &ranks[1..] {
        assert_eq!(s.steps.iter().map(|r| r.loss).collect::<Vec<_>>(), first.steps.iter().map(|r| r.loss).collect::<Vec<_>>(), "every rank logs the global loss");
    }
    let mut weights = BTreeMap::new();
    for (_, params) in &ranks {
        for (name, w) in params {
            if let Some(seen) = weights.insert(name.clone(), w.clone()) {
                assert_eq!(rel_err(&seen, w), 0.0, "{name}: a replicated weight is the same on every rank");
            }
        }
    }
    Run {
        losses: first.steps.iter().map(|r| (r.loss, r.aux)).collect(),
        grad_norms: first.steps.iter().map(|r| r.grad_norm).collect(),
        expert_counts: first.steps.iter().map(|r| r.expert_counts.clone()).collect(),
        weights,
        model_dir: first.model_dir.clone(),
    }
}

fn rel(a: f32, b: f32) -> f64 {
    (a as f64 - b as f64).abs() / (b as f64).abs().max(1e-12)
}

/// `got` against `want`: the losses, norms and expert counts of every step, and every weight.
fn assert_matches(got: &Run, want: &Run, what: &str) {
    assert_eq!(got.losses.len(), want.losses.len());
    for (s, ((ce, aux), (ce0, aux0))) in got.losses.iter().zip(&want.losses).enumerate() {
        assert!(rel(*ce, *ce0) < TOL && rel(*aux, *aux0) < TOL, "{what}, step {}: loss ({ce}, {aux}), one process ({ce0}, {aux0})", s + 1);
    }
    for (g, g0) in got.grad_norms.iter().zip(&want.grad_norms) {
        assert!(rel(*g, *g0) < TOL, "{what}: gradient norm {g}, one process {g0}");
    }
    assert_eq!(got.expert_counts, want.expert_counts, "{what}: the global batch's expert counts");
    assert_eq!(got.weights.keys().collect::<Vec<_>>(), want.weights.keys().collect::<Vec<_>>(), "{what}: every weight, once");
    let worst = |err: fn(&Tensor, &Tensor) -> f64| got.weights.iter().map(|(n, w)| (err(w, &want.weights[n]), n.as_str())).fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
    let (l2, max) = (worst(rel_l2), worst(rel_err));
    eprintln!("{what}: worst weight {} at {:.2e} (relative L2), {} at {:.2e} (max-norm)", l2.1, l2.0, max.1, max.0);
    assert!(l2.0 < TOL && max.0 < TOL, "{what}: {} differs by {:.2e} (relative L2), {} by {:.2e} (max-norm)", l2.1, l2.0, max.1, max.0);
}

fn with_out(cfg: &LmTrainConfig, dir: &Path, name: &str) -> LmTrainConfig {
    LmTrainConfig { out: dir.join(name), ..cfg.clone() }
}

#[test]
fn data_and_expert_parallel_training_match_one_process() {
    let (dir, cfg) = setup("dp-equivalence");
    let single = run(Layout::Single, &with_out(&cfg, &dir, "p1"), RunStart::New);
    assert!(single.losses.iter().all(|(_, aux)| *aux > 0.0), "the load-balancing loss is on");
    let layouts = [("pure data parallelism, P = 2", Layout::Data(2)), ("expert parallelism, P = 2", Layout::Expert(2)), ("EP = 2 within P = 4", Layout::ExpertData(4, 2))];
    for (i, (what, layout)) in layouts.into_iter().enumerate() {
        let got = run(layout, &with_out(&cfg, &dir, &format!("layout{i}")), RunStart::New);
        assert_matches(&got, &single, what);
    }
}

#[test]
fn checkpoints_resume_across_world_sizes_and_export_the_single_process_model() {
    let (dir, cfg) = setup("dp-resume");
    let single = run(Layout::Single, &with_out(&cfg, &dir, "straight"), RunStart::New);
    // 2 steps under one layout, the third under the other; the schedule is the 3-step run's
    let cut = LmTrainConfig { steps: 2, lr_decay_steps: Some(3), ..cfg.clone() };
    for (what, first, then) in [("P = 2 (EP) then P = 1", Layout::Expert(2), Layout::Single), ("P = 1 then P = 2 (EP)", Layout::Single, Layout::Expert(2))] {
        let name = what.replace(' ', "");
        run(first, &with_out(&cut, &dir, &name), RunStart::New);
        let resumed = run(then, &with_out(&cfg, &dir, &name), RunStart::Resume);
        let tail = Run { losses: single.losses[2..].to_vec(), grad_norms: single.grad_norms[2..].to_vec(), expert_counts: single.expert_counts[2..].to_vec(), weights: single.weights.clone(), model_dir: single.model_dir.clone() };
        assert_matches(&resumed, &tail, what);
    }

    // the folder an expert-parallel run exports is the single-process model
    let split = run(Layout::Expert(2), &with_out(&cfg, &dir, "exported"), RunStart::New);
    let plan = ExecutionPlan::inference(&Device::Cpu, Precision::F32);
    let (got, want) = (load_hf(&split.model_dir, &plan).unwrap(), load_hf(&single.model_dir, &plan).unwrap());
    let tok = Tokenizer::load(&split.model_dir.join(TOKENIZER_FILE)).unwrap();
    let ids = Tensor::new(tok.encode("The state of the union is").unwrap(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let (a, b) = (got.forward(&ids, None, false).unwrap().logits, want.forward(&ids, None, false).unwrap().logits);
    let err = rel_err(&a, &b);
    eprintln!("exported logits: {err:.2e}");
    assert!(err < TOL, "the exported model's logits differ from one process's by {err:.2e}");
}

#[test]
fn layouts_that_cannot_train_are_refused() {
    let (dir, cfg) = setup("dp-refused");
    // 4 windows do not split over 3 ranks
    let errs: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = plans(Layout::Data(3)).into_iter().map(|plan| {
            let cfg = with_out(&cfg, &dir, "three");
            scope.spawn(move || LmTrainer::new(cfg, &plan, RunStart::New).err().unwrap().to_string())
        }).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(errs.iter().all(|e| e.contains("`batch_size` 4") && e.contains("3 data-parallel ranks")), "{errs:?}");
    // expert parallelism over 2 of 4 data-parallel ranks without the expert-data-parallel group
    let comms: Vec<Arc<dyn Communicator>> = LocalGroup::new(4).into_iter().map(|c| Arc::new(c) as Arc<dyn Communicator>).collect();
    let ep: Vec<Arc<dyn Communicator>> = LocalGroup::new(2).into_iter().map(|c| Arc::new(c) as Arc<dyn Communicator>).collect();
    let plan = training().with_expert_parallel(ep[0].clone()).with_data_parallel(DataParallel::new(comms[0].clone()));
    let err = LmTrainer::new(with_out(&cfg, &dir, "mixed"), &plan, RunStart::New).err().unwrap().to_string();
    assert!(err.contains("expert-data-parallel group"), "{err}");
}
