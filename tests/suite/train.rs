//! `ditmoe train` on a tiny model and a small class folder written here: the loss falls,
//! resume is bitwise exact, a damaged checkpoint is skipped, a NaN stops training, and bad
//! inputs fail with messages that name the problem.
use candle_core::Device;
use ditmoe::train::{checkpoint, JsonlLog, Objective, RunStart, TrainConfig, Trainer, LOG_FILE};
use ditmoe::{ExecutionPlan, Precision};
use std::path::{Path, PathBuf};

use crate::common;
use common::train::scratch_training_folder;
use common::Scratch;

struct Fixture {
    _tmp: Scratch,
    root: PathBuf,
}

fn fixture(name: &str) -> Fixture {
    let tmp = scratch_training_folder(&format!("train-{name}"));
    let root = tmp.to_path_buf();
    Fixture { _tmp: tmp, root }
}

fn config(f: &Fixture, out: &str, steps: u64) -> TrainConfig {
    let json = serde_json::json!({
        "model": f.root.join("model.json"),
        "data": f.root.join("data"),
        "out": f.root.join(out),
        "objective": "rf",
        "image_size": 6,
        "global_batch": 8,
        "micro_batch": 4,
        "steps": steps,
        "lr": 1e-3,
        "max_grad_norm": 1.0,
        "ema_decay": 0.9,
        "seed": 7,
        "log_every": 1,
        "ckpt_every": 4,
        "keep_last": 3,
        "num_workers": 0,
    });
    serde_json::from_value(json).unwrap()
}

fn losses(cfg: TrainConfig, resume: bool) -> Vec<f32> {
    let mut t = Trainer::new(cfg, &ditmoe::ExecutionPlan::training(&Device::Cpu, ditmoe::Precision::F32), if resume { ditmoe::train::RunStart::Resume } else { ditmoe::train::RunStart::New }).unwrap();
    t.run(false).unwrap().steps.iter().map(|s| s.loss).collect()
}

#[test]
fn loss_falls() {
    let f = fixture("falls");
    let mut cfg = config(&f, "run", 40);
    cfg.sample_every = 20;
    let l = losses(cfg, false);
    assert_eq!(l.len(), 40);
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&l[..5]), mean(&l[35..]));
    assert!(last < 0.8 * first, "loss did not fall: first five {first}, last five {last} ({l:?})");
    // Every step was logged, with per-layer expert counts summing to tokens × top-k.
    let log = JsonlLog::read(&f.root.join("run").join(LOG_FILE)).unwrap();
    assert_eq!(log.len(), 40);
    let tokens_times_k = 8 * 16 * 2;
    assert!(log.iter().all(|r| r.expert_counts.len() == 2 && r.expert_counts.iter().all(|c| c.iter().sum::<usize>() == tokens_times_k)));
    assert!(f.root.join("run/ema/model.safetensors").is_file());
    // sample_every 20: grids of 3 classes × 8 (8×8 images, 2 px padding) at steps 20 and 40.
    for step in [20, 40] {
        let grid = image::open(f.root.join(format!("run/samples/step-{step:08}.png"))).unwrap();
        assert_eq!((grid.width(), grid.height()), (8 * 10 + 2, 3 * 10 + 2));
    }
}

#[test]
fn ddpm_objective_trains() {
    let f = fixture("ddpm");
    let mut cfg = config(&f, "run", 3);
    cfg.objective = Objective::Ddpm;
    let l = losses(cfg, false);
    assert_eq!(l.len(), 3);
    assert!(l.iter().all(|v| v.is_finite() && *v > 0.0), "{l:?}");
}

#[test]
fn resume_is_bitwise_exact() {
    let f = fixture("resume");
    let straight = losses(config(&f, "straight", 12), false);
    let first = losses(config(&f, "split", 6), false);
    // Step 6 is not a multiple of ckpt_every (4): the final save at the stop is what resumes.
    let second = losses(config(&f, "split", 12), true);
    assert_eq!(first.len() + second.len(), 12);
    let split: Vec<u32> = first.iter().chain(&second).map(|v| v.to_bits()).collect();
    let straight_bits: Vec<u32> = straight.iter().map(|v| v.to_bits()).collect();
    assert_eq!(split, straight_bits, "straight {straight:?} vs split {first:?} + {second:?}");
    // The resumed log holds each step once.
    let log = JsonlLog::read(&f.root.join("split").join(LOG_FILE)).unwrap();
    assert_eq!(log.iter().map(|r| r.step).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>());
    // The exported EMA weights match too.
    let a = std::fs::read(f.root.join("straight/ema/model.safetensors")).unwrap();
    let b = std::fs::read(f.root.join("split/ema/model.safetensors")).unwrap();
    assert!(a == b, "EMA weights differ after resume");
}

/// The cosine learning-rate decay resumes on its schedule: a run trained to step 6 of a 12-step
/// schedule and resumed to 12 ends with the straight run's losses, bit for bit, and the logged
/// rate falls from `lr` to `lr · min_lr_ratio`.
#[test]
fn cosine_schedule_resumes_exactly() {
    let f = fixture("cosine");
    let cosine = |out: &str, steps: u64| TrainConfig { min_lr_ratio: Some(0.1), lr_decay_steps: Some(12), warmup_steps: 2, ..config(&f, out, steps) };
    let straight = losses(cosine("straight", 12), false);
    let first = losses(cosine("split", 6), false);
    let second = losses(cosine("split", 12), true);
    let split: Vec<u32> = first.iter().chain(&second).map(|v| v.to_bits()).collect();
    assert_eq!(split, straight.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "straight {straight:?} vs split {first:?} + {second:?}");
    let lrs: Vec<f64> = JsonlLog::read(&f.root.join("split").join(LOG_FILE)).unwrap().iter().map(|r| r.lr).collect();
    assert!((lrs[0] - 5e-4).abs() < 1e-12 && (lrs[1] - 1e-3).abs() < 1e-12, "warm-up: {lrs:?}");
    assert!(lrs[1..].windows(2).all(|w| w[1] < w[0]), "the rate must fall after the warm-up: {lrs:?}");
    assert!((lrs[11] - 1e-4).abs() < 1e-12, "the schedule ends at lr · min_lr_ratio: {lrs:?}");
}

/// With `ema_warmup`, update s (0-based) uses decay min(d, (1 + s) / (10 + s)), as diffusers'
/// `EMAModel`: checked from the checkpoints of three steps, each holding the weights and the EMA.
#[test]
fn ema_warmup_caps_the_decay_as_diffusers() {
    let f = fixture("ema-warmup");
    let cfg = TrainConfig { ema_warmup: true, ema_decay: 0.999, ckpt_every: 1, keep_last: 3, ..config(&f, "run", 3) };
    assert_eq!((cfg.ema_decay_at(1), cfg.ema_decay_at(3), cfg.ema_decay_at(100_000)), (0.1, 0.25, 0.999));
    losses(cfg, false);
    let root = checkpoint::checkpoints_dir(&f.root.join("run"));
    let ckpts: Vec<checkpoint::Checkpoint> = checkpoint::list(&root).unwrap().iter().map(|(_, d)| checkpoint::load(d, &Device::Cpu).unwrap()).collect();
    assert_eq!(ckpts.len(), 3);
    let mut worst = 0f32;
    for (prev, (next, decay)) in ckpts.iter().zip(ckpts[1..].iter().zip([2.0 / 11.0, 0.25])) {
        for (name, ema) in &next.ema {
            let want = ((&prev.ema[name] * decay).unwrap() + (&next.model[name] * (1.0 - decay)).unwrap()).unwrap();
            let err = (ema - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            worst = worst.max(err);
        }
    }
    assert!(worst < 1e-6, "EMA off the capped decay by {worst}");
    // the update moved the average: not the fixed 0.999, which would leave it near the old one
    let (a, b) = (&ckpts[1].ema["x_embedder.proj.weight"], &ckpts[0].ema["x_embedder.proj.weight"]);
    assert!((a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() > 1e-5);
}

#[test]
fn truncated_checkpoint_falls_back() {
    let f = fixture("truncated");
    losses(config(&f, "run", 8), false);
    let root = checkpoint::checkpoints_dir(&f.root.join("run"));
    let dirs: Vec<u64> = checkpoint::list(&root).unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(dirs, vec![4, 8]);
    let damaged = root.join("step-00000008").join(checkpoint::MODEL_FILE);
    let len = std::fs::metadata(&damaged).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&damaged).unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);

    let t = Trainer::new(config(&f, "run", 8), &ditmoe::ExecutionPlan::training(&Device::Cpu, ditmoe::Precision::F32), ditmoe::train::RunStart::Resume).unwrap();
    assert_eq!(t.step(), 4, "resume should fall back to step 4");
    let (_, warnings) = checkpoint::load_latest(&root, &Device::Cpu).unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains(&damaged.display().to_string()), "warning does not name the file: {}", warnings[0]);
    assert!(warnings[0].contains("bytes, the checkpoint recorded") && !warnings[0].contains("Some("), "{}", warnings[0]);
}

#[test]
fn nan_stops_with_step_and_keeps_last_checkpoint() {
    let f = fixture("nan");
    let mut cfg = config(&f, "run", 20);
    cfg.lr = 1e30; // the first update blows the weights up; the next loss is not finite
    cfg.max_grad_norm = None;
    cfg.ckpt_every = 1;
    let mut t = Trainer::new(cfg, &ditmoe::ExecutionPlan::training(&Device::Cpu, ditmoe::Precision::F32), ditmoe::train::RunStart::New).unwrap();
    let err = t.run(false).unwrap_err().to_string();
    assert!(err.contains("non-finite"), "{err}");
    let root = checkpoint::checkpoints_dir(&f.root.join("run"));
    let saved = checkpoint::list(&root).unwrap();
    let (last_step, last_dir) = saved.last().expect("the steps before the NaN were checkpointed").clone();
    assert!(err.contains(&format!("at step {}", last_step + 1)), "error should name step {}: {err}", last_step + 1);
    let ckpt = checkpoint::load(&last_dir, &Device::Cpu).unwrap();
    assert_eq!(ckpt.state.step, last_step);
}

fn ditmoe(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ditmoe")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_inputs_are_named() {
    let f = fixture("bad");
    let cfg_path = f.root.join("train.json");
    let mut v = serde_json::to_value(config(&f, "run", 2)).unwrap();
    v.as_object_mut().unwrap().insert("learning_rate".into(), 0.1.into());
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let (code, err) = ditmoe(&["train", "--config", cfg_path.to_str().unwrap(), "--quiet"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown field `learning_rate`"), "{err}");

    let missing = f.root.join("nowhere");
    let (model, out) = (f.root.join("model.json"), f.root.join("o"));
    let (code, err) = ditmoe(&[
        "train", "--model", model.to_str().unwrap(), "--data", missing.to_str().unwrap(),
        "--out", out.to_str().unwrap(), "--objective", "rf", "--quiet",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&missing.display().to_string()) && err.contains("does not exist"), "{err}");

    // A class folder without images.
    std::fs::create_dir_all(f.root.join("data/class3")).unwrap();
    let e = Trainer::new(config(&f, "run", 2), &ditmoe::ExecutionPlan::training(&Device::Cpu, ditmoe::Precision::F32), ditmoe::train::RunStart::New).err().expect("empty class folder must fail").to_string();
    assert!(e.contains("class3"), "{e}");
    // Four classes for a three-class model.
    std::fs::copy(f.root.join("data/class0/0.png"), f.root.join("data/class3/0.png")).unwrap();
    let e = Trainer::new(config(&f, "run", 2), &ditmoe::ExecutionPlan::training(&Device::Cpu, ditmoe::Precision::F32), ditmoe::train::RunStart::New).err().expect("class count mismatch must fail").to_string();
    assert!(e.contains("4 classes") && e.contains("num_classes 3"), "{e}");
}

/// `init_from` starts from given weights: a run initialised from another run's trained
/// weights starts at that run's loss level, below a fresh start; a file that does not fit the
/// config is named.
#[test]
fn init_from_starts_from_given_weights() {
    let f = fixture("init");
    let trained = losses(config(&f, "first", 40), false);
    let mut cfg = config(&f, "second", 3);
    cfg.init_from = Some(f.root.join("first/ema/model.safetensors"));
    let continued = losses(cfg, false);
    let fresh = losses(config(&f, "fresh", 3), false);
    assert!(continued[0] < fresh[0], "init_from loss {} should be below a fresh start {} (trained run ended at {})", continued[0], fresh[0], trained[39]);
    let mut bad = config(&f, "bad", 1);
    bad.init_from = Some(f.root.join("model.json"));
    let e = Trainer::new(bad, &ditmoe::ExecutionPlan::training(&Device::Cpu, ditmoe::Precision::F32), ditmoe::train::RunStart::New).err().expect("a non-checkpoint must fail").to_string();
    assert!(e.contains("model.json"), "{e}");
}

#[test]
fn promoe_router_trains() {
    use ditmoe::train::Router;
    let f = fixture("promoe");
    let mut cfg = config(&f, "run", 50);
    cfg.router = Router::Promoe;
    let mc = cfg.model_config().unwrap();
    let pm = mc.promoe.as_ref().expect("router promoe sets the ProMoE config");
    assert_eq!(pm.moe_intermediate_size, 2 * mc.hidden_size);
    assert_eq!((mc.hidden_size, mc.depth, mc.num_experts), (32, 2, 4), "the rest of the model config is kept");
    let l = losses(cfg, false);
    assert_eq!(l.len(), 50);
    assert!(l.iter().all(|v| v.is_finite()), "{l:?}");
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&l[..5]), mean(&l[45..]));
    assert!(last < 0.8 * first, "loss did not fall: first five {first}, last five {last} ({l:?})");
    // The routing contrastive loss is logged beside the (here zero) balance loss.
    let log = JsonlLog::read(&f.root.join("run").join(LOG_FILE)).unwrap();
    assert_eq!(log.len(), 50);
    assert!(log.iter().all(|r| r.contrastive.is_finite() && r.contrastive > 0.0), "{:?}", log.iter().map(|r| r.contrastive).collect::<Vec<_>>());
    // interleave: block 1 is the only MoE layer; E routed experts + the unconditional one.
    assert!(log.iter().all(|r| r.expert_counts.len() == 1 && r.expert_counts[0].len() == 5), "{:?}", log[0].expert_counts);
}

fn cpu_training() -> ExecutionPlan {
    ExecutionPlan::training(&Device::Cpu, Precision::F32)
}

/// A run folder belongs to one run: a new run refuses a folder that holds one (and leaves it as
/// it was), `--overwrite` moves it aside, and `--resume` on a folder without a checkpoint says it
/// starts anew.
#[test]
fn a_run_folder_holds_one_run() {
    let f = fixture("runfolder");
    let out = f.root.join("run");
    losses(config(&f, "run", 4), false);
    let log_before = std::fs::read(out.join(LOG_FILE)).unwrap();
    let err = Trainer::new(config(&f, "run", 4), &cpu_training(), RunStart::New).err().expect("a second run into the same folder must be refused").to_string();
    assert!(err.contains("holds a run") && err.contains("--resume") && err.contains("--overwrite"), "{err}");
    assert!(err.contains(&out.display().to_string()), "{err}");
    assert_eq!(std::fs::read(out.join(LOG_FILE)).unwrap(), log_before, "the refused run left the old run's log as it was");
    assert_eq!(checkpoint::list(&checkpoint::checkpoints_dir(&out)).unwrap().len(), 1);

    // --overwrite: the old run moves aside whole, the new one starts at step 0
    let t = Trainer::new(config(&f, "run", 4), &cpu_training(), RunStart::Overwrite).unwrap();
    assert_eq!(t.step(), 0);
    let aside = f.root.join("run.old-1");
    assert_eq!(std::fs::read(aside.join(LOG_FILE)).unwrap(), log_before, "the old run is kept aside");
    assert!(checkpoint::list(&checkpoint::checkpoints_dir(&aside)).unwrap().len() == 1);
    assert!(!out.join(LOG_FILE).exists());

    // --resume where there is nothing to resume: a fresh start, said in the warnings
    let fresh = config(&f, "fresh", 4);
    let t = Trainer::new(fresh, &cpu_training(), RunStart::Resume).unwrap();
    assert_eq!(t.step(), 0);
    let summary = { let mut t = t; t.run(false).unwrap() };
    assert!(summary.warnings.iter().any(|w| w.contains("no valid checkpoint") && w.contains("starting at step 0")), "{:?}", summary.warnings);
}

/// The exported EMA model carries the `generate.json` of its objective, so `ditmoe generate
/// --model RUN/ema` samples a rectified-flow model as one.
#[test]
fn exported_model_says_how_to_sample_it() {
    let f = fixture("export");
    for (objective, sampler, steps) in [(Objective::Rf, "rf-euler", 50), (Objective::Ddpm, "ddpm", 250)] {
        let mut cfg = config(&f, &format!("run-{sampler}"), 2);
        cfg.objective = objective;
        let ema = Trainer::new(cfg, &cpu_training(), RunStart::New).unwrap().run(false).unwrap().ema_dir;
        let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ema.join("generate.json")).unwrap()).unwrap();
        assert_eq!(g["sampler"], sampler);
        assert_eq!(g["steps"], steps);
        assert_eq!(g["cfg_scale"], 4.0, "the model has a null class: guided");
    }
}

/// An EMA on the host averaged every third step (`ema_on_host`, `ema_every`), checkpointed
/// every fourth: a run stopped at step 4 (one step pending since the average at 3, applied
/// before the checkpoint as in the straight run) and resumed to 8 exports the EMA of the run
/// that went straight to 8; and averaging every third step gives other weights than every step.
#[test]
fn an_ema_averaged_every_few_steps_resumes_exactly() {
    let f = fixture("ema-every");
    let cfg = |out: &str, steps: u64, every: u64| {
        let mut c = config(&f, out, steps);
        (c.ema_on_host, c.ema_every, c.ckpt_every) = (true, every, 4);
        c
    };
    let ema = |out: &str| std::fs::read(f.root.join(out).join("ema/model.safetensors")).unwrap();
    losses(cfg("straight", 8, 3), false);
    losses(cfg("stopped", 4, 3), false);
    losses(cfg("stopped", 8, 3), true);
    assert!(ema("stopped") == ema("straight"), "the resumed run's EMA differs from the straight run's");
    losses(cfg("every-step", 8, 1), false);
    assert!(ema("every-step") != ema("straight"), "ema_every 3 gave the EMA of every step");
    let err = Trainer::new(cfg("never", 8, 0), &cpu_training(), RunStart::New).err().expect("ema_every 0 must fail").to_string();
    assert!(err.contains("train config field `ema_every`: must be at least 1"), "{err}");
}

/// `ditmoe train` killed at pseudo-random moments (most of a step here is checkpoint writing:
/// a checkpoint every step), then `--resume`d until done: every run ends with the weights and
/// the log of a run that was never interrupted.
#[test]
fn killed_runs_resume_exactly() {
    let f = fixture("kill");
    let write_config = |out: &str| {
        let mut cfg = serde_json::to_value(config(&f, out, 24)).unwrap();
        cfg["ckpt_every"] = 1.into();
        cfg["keep_last"] = 2.into();
        let path = f.root.join(format!("{out}.json"));
        std::fs::write(&path, cfg.to_string()).unwrap();
        path
    };
    let train = |cfg: &Path, resume: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ditmoe"));
        cmd.args(["train", "--config", cfg.to_str().unwrap(), "--quiet"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        if resume {
            cmd.arg("--resume");
        }
        cmd
    };
    assert!(train(&write_config("straight"), false).status().unwrap().success());
    let want_ema = std::fs::read(f.root.join("straight/ema/model.safetensors")).unwrap();
    let want_log: Vec<u32> = JsonlLog::read(&f.root.join("straight").join(LOG_FILE)).unwrap().iter().map(|r| r.loss.to_bits()).collect();

    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut total_kills = 0;
    for round in 0..3 {
        let cfg = write_config(&format!("killed-{round}"));
        let out = f.root.join(format!("killed-{round}"));
        let mut kills = 0;
        // kill the run a few times at pseudo-random moments, resuming each time
        for attempt in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let delay = std::time::Duration::from_millis(150 + state % 900);
            let mut child = train(&cfg, attempt > 0).spawn().unwrap();
            std::thread::sleep(delay);
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                kills += 1;
            }
            child.wait().unwrap();
        }
        // then let it finish
        assert!(train(&cfg, true).status().unwrap().success(), "round {round}: the resumed run failed");
        let log: Vec<u32> = JsonlLog::read(&out.join(LOG_FILE)).unwrap().iter().map(|r| r.loss.to_bits()).collect();
        assert_eq!(log, want_log, "round {round} ({kills} kills): the log differs from the uninterrupted run's");
        assert!(std::fs::read(out.join("ema/model.safetensors")).unwrap() == want_ema, "round {round} ({kills} kills): the EMA weights differ");
        let temps: Vec<_> = walk(&out).into_iter().filter(|p| p.extension().is_some_and(|e| e == "tmp")).collect();
        assert!(temps.is_empty(), "round {round}: temp files left: {temps:?}");
        total_kills += kills;
    }
    assert!(total_kills >= 3, "the runs were killed {total_kills} times: too few to test anything");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// With stderr not a terminal (a pipe, as in CI or under nohup), progress still shows, as plain
/// log lines.
#[test]
fn progress_is_logged_when_stderr_is_not_a_terminal() {
    let f = fixture("progress");
    let cfg = serde_json::to_value(config(&f, "run", 6)).unwrap();
    let path = f.root.join("cfg.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ditmoe")).args(["train", "--config", path.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let progress: Vec<&str> = err.lines().filter(|l| l.contains("/6 [")).collect();
    assert!(!progress.is_empty(), "no progress line in: {err}");
    assert!(progress.iter().all(|l| !l.contains('\u{1b}')), "plain lines, no terminal escapes: {progress:?}");
}

/// `--model` takes a model folder too, as `generate --model` does.
#[test]
fn model_folder_is_a_model() {
    let f = fixture("modelfolder");
    let folder = f.root.join("model-folder");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(f.root.join("model.json"), folder.join("config.json")).unwrap();
    let mut cfg = config(&f, "run", 2);
    cfg.model = folder.display().to_string();
    let from_folder = cfg.model_config().unwrap();
    assert_eq!(from_folder, config(&f, "run", 2).model_config().unwrap());
    cfg.model = f.root.join("missing-folder").display().to_string();
    let err = cfg.model_config().unwrap_err().to_string();
    assert!(err.contains("neither a model folder"), "{err}");
}

/// An empty data folder says so, rather than failing later on the model's channel count.
#[test]
fn empty_data_folder_is_named() {
    let f = fixture("emptydata");
    let empty = f.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mut cfg = config(&f, "run", 2);
    cfg.data = empty.clone();
    let err = Trainer::new(cfg, &cpu_training(), RunStart::New).err().expect("an empty data folder must fail").to_string();
    assert!(err.contains("is empty") && err.contains(&empty.display().to_string()), "{err}");
}
