//! The language-model commands under `ditmoe launch` on the TCP backend (each rank a process):
//! `lm train` over 2 ranks with the experts replicated and split, and over 4 with the experts
//! split over pairs, logs the single-process run's losses and ends with its weights; `lm generate` sharded by experts over 2 ranks prints
//! the single-process greedy text, once; a bad `--expert-parallel` fails on every rank with the
//! sizes named, and the launch with it.
use crate::common;

use candle_core::Device;
use common::{rel_err, scratch_dir};
use ditmoe::lm::trainer::TOKENIZER_FILE;
use ditmoe::train::log::{StepLog, LOG_FILE};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The variables of a launch; the test process may run under one itself.
const VARS: [&str; 6] = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"];

fn ditmoe(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ditmoe"));
    cmd.args(args).env_remove("RUST_BACKTRACE");
    VARS.iter().for_each(|v| {
        cmd.env_remove(v);
    });
    cmd.output().unwrap()
}

/// `args` run by `n` processes under `ditmoe launch` on a free port.
fn launch(n: usize, args: &[&str]) -> Output {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let n = n.to_string();
    let mut all = vec!["launch", "--nproc-per-node", &n, "--master-port", &port, "--"];
    all.extend(args);
    ditmoe(&all)
}

fn ok(what: &str, o: &Output) {
    assert!(o.status.success(), "{what}:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

/// The shared parallel-training run (`common::lm::parallel_run`), its config written to a file:
/// (scratch folder, config path).
fn setup(tag: &str) -> (common::Scratch, PathBuf) {
    let (dir, cfg) = common::lm::parallel_run(tag);
    let path = dir.join("train.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    (dir, path)
}

fn losses(run: &Path) -> Vec<(f32, f32)> {
    let text = std::fs::read_to_string(run.join(LOG_FILE)).unwrap();
    text.lines().map(|l| serde_json::from_str::<StepLog>(l).unwrap()).map(|s| (s.loss, s.aux)).collect()
}

fn weights(run: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(run.join("model/model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn launched_training_matches_one_process_with_experts_replicated_and_split() {
    let (dir, cfg) = setup("lm-launch-train");
    let cfg = cfg.to_str().unwrap();
    let train = |out: &Path| vec!["lm".to_string(), "train".into(), "--config".into(), cfg.into(), "--out".into(), out.to_str().unwrap().into(), "--quiet".into()];
    let single = dir.join("single");
    ok("one process", &ditmoe(&train(&single).iter().map(String::as_str).collect::<Vec<_>>()));
    let (want_losses, want) = (losses(&single), weights(&single));
    assert_eq!(want_losses.len(), 3);
    // 2 ranks, experts replicated and split; 4 ranks, experts over pairs (expert-data-parallel
    // groups of 2, the TCP backend's sub-groups)
    for (ranks, ep) in [(2, "1"), (2, "2"), (4, "2")] {
        let out = dir.join(format!("p{ranks}-ep{ep}"));
        let mut args = train(&out);
        args.extend(["--expert-parallel".into(), ep.into()]);
        let o = launch(ranks, &args.iter().map(String::as_str).collect::<Vec<_>>());
        ok(&format!("{ranks} ranks, --expert-parallel {ep}"), &o);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("[rank0]: stopped at step 3") && stdout.matches("stopped at step").count() == 1, "rank 0 alone prints the summary: {stdout}");
        let got = losses(&out);
        assert_eq!(got.len(), want_losses.len(), "{ranks} ranks, --expert-parallel {ep}: one log line per step");
        let worst_loss = got.iter().zip(&want_losses).map(|((l, a), (l0, a0))| (l - l0).abs().max((a - a0).abs())).fold(0f32, f32::max);
        assert!(worst_loss <= 1e-6, "{ranks} ranks, --expert-parallel {ep}: losses {got:?}, one process {want_losses:?}");
        let got = weights(&out);
        let mut names: Vec<&String> = got.keys().collect();
        names.sort();
        assert_eq!(names.len(), want.len(), "{ranks} ranks, --expert-parallel {ep}: the exported model holds every weight");
        let (worst, name) = names.iter().map(|n| (rel_err(&got[*n], &want[*n]), n.as_str())).fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
        eprintln!("{ranks} ranks, --expert-parallel {ep}: losses within {worst_loss:.1e}, worst weight {name} at {worst:.2e} (max-norm relative)");
        assert!(worst < 1e-5, "{ranks} ranks, --expert-parallel {ep}: {name} differs by {worst:.2e}");
    }
}

#[test]
fn launched_generation_sharded_by_experts_prints_the_one_process_tokens() {
    let (dir, cfg) = setup("lm-launch-generate");
    let out = dir.join("trained");
    ok("training", &ditmoe(&["lm", "train", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"]));
    let model = out.join("model");
    assert!(model.join(TOKENIZER_FILE).exists());
    let generate = ["lm", "generate", "--model", model.to_str().unwrap(), "--prompt", "The state of the union", "--max-tokens", "12", "--temperature", "0"];
    let single = ditmoe(&generate);
    ok("one process", &single);
    let want = String::from_utf8_lossy(&single.stdout).trim().to_string();
    assert!(want.len() > "The state of the union".len(), "a continuation: {want:?}");

    let mut sharded = generate.to_vec();
    sharded.extend(["--expert-parallel", "2"]);
    let o = launch(2, &sharded);
    ok("2 ranks", &o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = stdout.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect();
    assert_eq!(lines, [format!("[rank0]: {want}")], "rank 0 prints the single-process text, and no other rank prints");
}

#[test]
fn an_expert_parallel_size_that_does_not_divide_the_world_fails_on_every_rank() {
    let (dir, cfg) = setup("lm-launch-bad-ep");
    let out = dir.join("run");
    let o = launch(2, &["lm", "train", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet", "--expert-parallel", "3"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    for r in 0..2 {
        let line = stderr.lines().find(|l| l.starts_with(&format!("[rank{r}]: error:"))).unwrap_or_else(|| panic!("no error of rank {r}: {stderr}"));
        assert!(line.contains("--expert-parallel 3") && line.contains("world size 2"), "rank {r}: {line}");
    }
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("error: rank ") && last.contains("world size 2"), "the launch ends with the error: {last}");
    assert!(!out.join(LOG_FILE).exists(), "nothing trained");

    let plain = ditmoe(&["lm", "train", "--config", cfg.to_str().unwrap(), "--out", scratch_dir("lm-launch-bad-ep-plain").join("run").to_str().unwrap(), "--quiet", "--expert-parallel", "2"]);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert_eq!(plain.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--expert-parallel 2") && stderr.contains("ditmoe launch"), "{stderr}");
}
