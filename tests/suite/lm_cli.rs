//! `ditmoe lm forward` reproduces transformers' outputs for the three HF fixture families
//! (logits, every MoE layer's router logits, the load-balancing loss, the greedy KV-cache
//! continuation), and the `lm` commands refuse bad input with one line naming what is wrong.
use crate::common;

use candle_core::{DType, Device};
use common::{assert_close, fixture_path, load_fixture, scratch_dir};
use std::process::Command;

fn ditmoe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ditmoe")).args(args).output().unwrap()
}

#[test]
fn lm_forward_reproduces_transformers() {
    let dir = scratch_dir("lm-forward-cli");
    for case in ["hf-mixtral", "hf-qwen2-moe", "hf-olmoe"] {
        let model = fixture_path(&format!("lm/{case}"));
        let inputs = model.join("io.safetensors");
        let io = load_fixture(&format!("lm/{case}/io.safetensors"));
        let output = dir.join(format!("{case}.safetensors"));
        let o = ditmoe(&["lm", "forward", "--model", model.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--output", output.to_str().unwrap(), "--generate", "8"]);
        assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
        let got = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
        assert_close(&format!("{case} logits"), &got["logits"], &io["logits"], 1e-4);
        assert_close(&format!("{case} aux_loss"), &got["aux_loss"], &io["aux_loss"], 1e-4);
        for l in 0..2 {
            let name = format!("router_logits.{l}");
            assert_close(&format!("{case} {name}"), &got[&name], &io[&name], 1e-4);
        }
        assert_eq!(got["generated"].to_vec2::<i64>().unwrap(), io["generated"].to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap(), "{case}: greedy continuation");
    }
}

fn stderr_of(args: &[&str]) -> String {
    let o = ditmoe(args);
    assert!(!o.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn lm_commands_refuse_bad_input_by_name() {
    let dir = scratch_dir("lm-cli-errors");
    let model = fixture_path("lm/hf-mixtral");
    let m = model.to_str().unwrap();
    // an input id outside the vocabulary
    let bad = dir.join("bad.safetensors");
    let ids = candle_core::Tensor::new(&[[1i64, 500]], &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("input_ids".to_string(), ids)]), &bad).unwrap();
    let out = dir.join("out.safetensors");
    let err = stderr_of(&["lm", "forward", "--model", m, "--inputs", bad.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(err.contains("input_ids") && err.contains("500"), "{err}");
    assert!(!out.exists(), "nothing written");
    // an unknown model type
    let odd = dir.join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::write(odd.join("config.json"), r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}"#).unwrap();
    let err = stderr_of(&["lm", "forward", "--model", odd.to_str().unwrap(), "--inputs", bad.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(err.contains("gpt2"), "{err}");
    // a model folder without its tokenizer, and invalid sampling settings
    let err = stderr_of(&["lm", "generate", "--model", m, "--prompt", "hi"]);
    assert!(err.contains("tokenizer.json"), "{err}");
    let err = stderr_of(&["lm", "generate", "--model", m, "--prompt", "hi", "--top-p", "1.5"]);
    assert!(err.contains("--top-p"), "{err}");
}

/// The bundled language model (`assets/sotu-lm`, bf16, within its 12 MB budget) is what
/// `lm generate` samples by default, and a seed gives the same text twice.
#[test]
fn the_bundled_language_model_generates_by_default() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sotu-lm");
    let size: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(size <= 12 << 20, "assets/sotu-lm is {size} bytes");
    let run = || {
        let o = Command::new(env!("CARGO_BIN_EXE_ditmoe")).current_dir(env!("CARGO_MANIFEST_DIR")).args(["lm", "generate", "--prompt", "The state of the Union", "--max-tokens", "12", "--seed", "3"]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let text = run();
    assert!(text.starts_with("The state of the Union") && text.len() > "The state of the Union".len() + 12, "{text}");
    assert_eq!(text, run(), "the same seed samples the same text");
}

/// `ditmoe routes` given a language model (a folder with tokenizer.json) shows its tokens'
/// experts for `--prompt`, as `lm routes` does, and asks for the prompt when it is missing.
#[test]
fn routes_shows_a_language_models_experts_per_token() {
    let out = scratch_dir("routes-lm");
    let root = env!("CARGO_MANIFEST_DIR");
    let o = Command::new(env!("CARGO_BIN_EXE_ditmoe")).current_dir(root).args(["routes", "--model", "assets/sotu-lm", "--prompt", "The state of the Union", "--out", out.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    // one row per token, one column per MoE layer of the bundled model (layers 1 and 3)
    assert!(table.contains("| token | layer 1 | layer 3 |") && table.contains("| ` Union` |"), "{table}");
    assert!(std::fs::metadata(out.join("routes.png")).unwrap().len() > 1000);
    let o = Command::new(env!("CARGO_BIN_EXE_ditmoe")).current_dir(root).args(["routes", "--model", "assets/sotu-lm", "--out", out.to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--prompt"), "{}", String::from_utf8_lossy(&o.stderr));
}
