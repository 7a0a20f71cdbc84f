//! Loading, validation and conversion: official parameter names for every preset, PyTorch
//! pickles, and bad input that must fail with an error naming the file, tensor or field.
use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture_path, load_fixture, scratch_dir};
use ditmoe::checkpoint::{expected_parameters, load_state_dict, write_safetensors_atomic, ModelDir};
use ditmoe::{presets, DitConfig};
use std::path::Path;

/// Parses a `param_names_*.txt` fixture: header counts and (name, shape) lines.
fn read_param_list(path: &Path) -> (Vec<(String, Vec<usize>)>, usize, usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let header_value = |key: &str| -> usize {
        let line = text.lines().find(|l| l.starts_with("# depth=")).unwrap();
        let field = line.split_whitespace().find(|w| w.starts_with(&format!("{key}="))).unwrap();
        field[key.len() + 1..].parse().unwrap()
    };
    let params = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, shape) = l.split_once('\t').unwrap();
            (name.to_string(), shape.split(',').map(|d| d.parse().unwrap()).collect())
        })
        .collect();
    (params, header_value("params"), header_value("activated_params"))
}

#[test]
fn every_preset_matches_official_parameter_names() {
    let dir = fixture_path("param_names");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().trim_start_matches("param_names_").to_string();
        let (size, timm) = match stem.strip_suffix("-timm-attn") {
            Some(s) => (s.to_string(), true),
            None => (stem.clone(), false),
        };
        let mut cfg = presets::get(&size).unwrap().config;
        if timm {
            cfg.use_flash_attn = false;
        }
        let (want, total, active) = read_param_list(&path);
        let got = expected_parameters(&cfg).unwrap();
        assert_eq!(got.len(), want.len(), "{stem}: tensor count");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "{stem}: parameter (in official state-dict order)");
        }
        assert_eq!(cfg.param_counts(), (total, active), "{stem}: total/activated parameter counts");
        // what expert parallelism splits: the `.experts.` tensors of the official state dict
        let routed: usize = want.iter().filter(|(n, _)| n.contains(".moe.experts.")).map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(cfg.routed_experts_params(), routed, "{stem}: routed expert parameters");
        checked += 1;
    }
    assert_eq!(checked, 10, "all parameter lists checked");
}

#[test]
fn preset_names_resolve() {
    assert_eq!(presets::get("DiT-MoE-XL/2-8E2A").unwrap().config.hidden_size, 1152);
    assert_eq!(presets::get("s-2-16e2a").unwrap().config.num_experts, 16);
    assert!(presets::all().iter().any(|p| p.name == "DiT-MoE-G/2-16E2A"));
    let err = presets::get("DiT-MoE-Q/2").unwrap_err().to_string();
    assert!(err.contains("DiT-MoE-Q/2") && err.contains("DiT-MoE-S/2-8E2A"), "{err}");
}

fn tiny_config() -> DitConfig {
    DitConfig::from_file(&fixture_path("models/tiny/config.json")).unwrap()
}

/// The tiny model's output from a state dict file, compared with the official output.
fn check_tiny_output(weights: &Path) {
    let plan = ditmoe::ExecutionPlan::inference(&Device::Cpu, ditmoe::Precision::F32);
    let vb = load_state_dict(weights).unwrap().into_var_builder(&tiny_config(), &plan).unwrap();
    let model = ditmoe::DitMoe::new(&tiny_config(), &plan, vb).unwrap();
    let io = load_fixture("models/tiny/io.safetensors");
    let out = model.forward(&io["x"], &io["t"], &io["y"]).unwrap();
    assert_close("tiny out", &out, &io["out"], 1e-4);
}

#[test]
fn loads_pytorch_checkpoints_top_level_and_under_ema() {
    check_tiny_output(&fixture_path("pt/tiny-plain.pt"));
    check_tiny_output(&fixture_path("pt/tiny-ema.pt"));
}

#[test]
fn convert_writes_a_model_folder_that_reproduces_the_output() {
    let dir = scratch_dir("convert");
    let out = dir.join("model");
    let names: Vec<String> = (0..10).map(|i| format!("class {i}")).collect();
    ModelDir::write(&out, &tiny_config(), &fixture_path("pt/tiny-ema.pt"), DType::F32, Some(&names)).unwrap();
    let md = ModelDir::open(&out).unwrap();
    assert_eq!(md.class_name(3), "class 3");
    check_tiny_output(&md.weights);
    // bf16 storage halves the file and stays within bf16 tolerance.
    let out16 = dir.join("model16");
    ModelDir::write(&out16, &tiny_config(), &fixture_path("pt/tiny-ema.pt"), DType::BF16, None).unwrap();
    let model = ModelDir::open(&out16).unwrap().load(&ditmoe::ExecutionPlan::inference(&Device::Cpu, ditmoe::Precision::Bf16)).unwrap();
    let io = load_fixture("models/tiny/io.safetensors");
    let e = common::rel_l2(&model.forward(&io["x"], &io["t"], &io["y"]).unwrap(), &io["out"]);
    assert!(e < 1e-2, "bf16 converted model: {e}");
}

#[test]
fn config_round_trip_and_unknown_keys() {
    let cfg = tiny_config();
    let back = DitConfig::from_json_str(&cfg.to_json(), "round trip").unwrap();
    assert_eq!(cfg, back);
    let mut v: serde_json::Value = serde_json::from_str(&cfg.to_json()).unwrap();
    v["num_expertz"] = 3.into();
    let err = DitConfig::from_json_str(&v.to_string(), "cfg.json").unwrap_err().to_string();
    assert!(err.contains("num_expertz") && err.contains("cfg.json"), "{err}");
    let mut bad = cfg.clone();
    bad.num_experts_per_tok = 9;
    let err = DitConfig::from_json_str(&serde_json::to_string(&bad).unwrap(), "cfg.json").unwrap_err().to_string();
    assert!(err.contains("num_experts_per_tok"), "{err}");
}

/// Writes the tiny weights after `edit`, then loads; returns the error message.
fn load_error(tag: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> (String, String) {
    let dir = scratch_dir(tag);
    let path = dir.join("model.safetensors");
    let mut tensors: Vec<(String, Tensor)> = load_fixture("models/tiny/model.safetensors").into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    write_safetensors_atomic(&path, &tensors).unwrap();
    let err = load_state_dict(&path).and_then(|sd| sd.validate(&tiny_config())).unwrap_err().to_string();
    (err, path.display().to_string())
}

#[test]
fn bad_checkpoints_name_the_file_and_tensor() {
    let (err, file) = load_error("missing", |t| t.retain(|(n, _)| n != "blocks.1.moe.gate.weight"));
    assert!(err.contains(&file) && err.contains("missing tensor `blocks.1.moe.gate.weight`"), "{err}");

    let (err, file) = load_error("unexpected", |t| t.push(("blocks.9.extra".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())));
    assert!(err.contains(&file) && err.contains("unexpected tensor `blocks.9.extra`"), "{err}");

    let (err, _) = load_error("shape", |t| {
        let i = t.iter().position(|(n, _)| n == "final_layer.linear.bias").unwrap();
        t[i].1 = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
    });
    assert!(err.contains("`final_layer.linear.bias` has shape [5]"), "{err}");

    let (err, _) = load_error("dtype", |t| {
        let i = t.iter().position(|(n, _)| n == "y_embedder.embedding_table.weight").unwrap();
        t[i].1 = t[i].1.to_dtype(DType::I64).unwrap();
    });
    assert!(err.contains("`y_embedder.embedding_table.weight` has dtype I64"), "{err}");
}

#[test]
fn truncated_and_corrupt_files_are_named() {
    let dir = scratch_dir("truncated");
    let bytes = std::fs::read(fixture_path("models/tiny/model.safetensors")).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_state_dict(&truncated).unwrap_err().to_string();
    assert!(err.contains("truncated.safetensors") && err.contains("corrupt or truncated"), "{err}");

    let corrupt = dir.join("header.safetensors");
    let mut b = bytes.clone();
    b[8..40].copy_from_slice(&[b'!'; 32]);
    std::fs::write(&corrupt, &b).unwrap();
    let err = load_state_dict(&corrupt).unwrap_err().to_string();
    assert!(err.contains("header.safetensors") && err.contains("corrupt"), "{err}");

    let pt = std::fs::read(fixture_path("pt/tiny-ema.pt")).unwrap();
    let bad_pt = dir.join("cut.pt");
    std::fs::write(&bad_pt, &pt[..pt.len() / 2]).unwrap();
    let err = load_state_dict(&bad_pt).unwrap_err().to_string();
    assert!(err.contains("cut.pt"), "{err}");

    let err = load_state_dict(&dir.join("absent.safetensors")).unwrap_err().to_string();
    assert!(err.contains("absent.safetensors") && err.contains("no such file"), "{err}");
}

#[test]
fn forward_rejects_wrong_shapes() {
    let model = ModelDir::open(&fixture_path("models/tiny")).unwrap().load(&ditmoe::ExecutionPlan::inference(&Device::Cpu, ditmoe::Precision::F32)).unwrap();
    let x = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::zeros(2, DType::I64, &Device::Cpu).unwrap();
    let err = model.forward(&x, &t, &y).unwrap_err().to_string();
    assert!(err.contains("(2, 3, 8, 8)") && err.contains("(N, 4, 8, 8)"), "{err}");
}

#[test]
fn non_finite_weights_are_refused_by_name() {
    let (err, file) = load_error("nan", |t| {
        let i = t.iter().position(|(n, _)| n == "blocks.0.attn.proj.weight").unwrap();
        let mut v = t[i].1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[3] = f32::NAN;
        v[7] = f32::INFINITY;
        t[i].1 = Tensor::from_vec(v, t[i].1.shape(), &Device::Cpu).unwrap();
    });
    assert!(err.contains(&file) && err.contains("`blocks.0.attn.proj.weight` holds 2 non-finite values"), "{err}");
}

/// A write killed midway leaves `.{name}.{pid}.tmp`; the next completed write of the file, or
/// the next checkpoint saved beside it, removes it (and only such files).
#[test]
fn completed_writes_remove_stale_temp_files() {
    let dir = scratch_dir("stale-temps");
    let stale = dir.join(".model.safetensors.4242.tmp");
    let other = dir.join(".state.json.4242.tmp");
    let keep = dir.join("notes.tmp");
    for p in [&stale, &other, &keep] {
        std::fs::write(p, b"partial").unwrap();
    }
    ditmoe::checkpoint::write_atomic(&dir.join("model.safetensors"), b"complete").unwrap();
    assert!(!stale.exists(), "the stale temp of the written file is gone");
    assert!(other.exists() && keep.exists(), "other files' temps and unrelated files stay");
    ditmoe::checkpoint::remove_stale_temps_in(&dir);
    assert!(!other.exists() && keep.exists());
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), b"complete");
}

fn ditmoe_cli(args: &[&str]) -> (bool, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ditmoe")).args(args).env_remove("RUST_BACKTRACE").output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn forward_and_convert_refuse_to_destroy_their_inputs() {
    let dir = scratch_dir("cli-guards");
    let model = fixture_path("models/tiny");
    let io = dir.join("io.safetensors");
    std::fs::copy(fixture_path("models/tiny/io.safetensors"), &io).unwrap();
    let before = std::fs::read(&io).unwrap();
    let (ok, err) = ditmoe_cli(&["forward", "--model", model.to_str().unwrap(), "--inputs", io.to_str().unwrap(), "--output", io.to_str().unwrap()]);
    assert!(!ok && err.contains("--output") && err.contains("overwrite the inputs"), "{err}");
    assert_eq!(std::fs::read(&io).unwrap(), before, "the inputs are untouched");
    let (ok, err) = ditmoe_cli(&["forward", "--model", model.to_str().unwrap(), "--inputs", io.to_str().unwrap(), "--output", dir.join("o.safetensors").to_str().unwrap(), "--cfg-scale", "nan"]);
    assert!(!ok && err.contains("--cfg-scale NaN") && err.contains("finite"), "{err}");
    assert!(!dir.join("o.safetensors").exists());

    // convert into a folder that holds a model: refused without --overwrite, replaced with it
    let out = dir.join("converted");
    let weights = fixture_path("models/tiny/model.safetensors");
    let config = fixture_path("models/tiny/config.json");
    let args = ["convert", "--weights", weights.to_str().unwrap(), "--config", config.to_str().unwrap(), "--out", out.to_str().unwrap()];
    assert!(ditmoe_cli(&args).0);
    let (ok, err) = ditmoe_cli(&args);
    assert!(!ok && err.contains("already holds a model") && err.contains("--overwrite"), "{err}");
    let mut again = args.to_vec();
    again.push("--overwrite");
    assert!(ditmoe_cli(&again).0);
}

/// Config sizes are bounded before anything is built: a typo'd size is refused by its field,
/// and a model larger than the device's memory by its estimate, at once.
#[test]
fn oversized_configs_are_refused_before_allocating() {
    let mut cfg = tiny_config();
    cfg.num_experts = 1_000_000;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("`num_experts`") && err.contains("1000000"), "{err}");
    let mut cfg = tiny_config();
    cfg.depth = 100_000;
    let t = std::time::Instant::now();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("`depth`") && t.elapsed().as_secs_f64() < 1.0, "{err}");

    // within the bounds but far beyond this machine: refused with the estimate
    let mut big = tiny_config();
    big.depth = 512;
    big.hidden_size = 16384;
    big.num_heads = 16;
    big.num_experts = 64;
    big.mlp_ratio = 8;
    big.validate().unwrap();
    let plan = ditmoe::ExecutionPlan::inference(&Device::Cpu, ditmoe::Precision::F32);
    let bytes = big.weight_bytes(DType::F32, 1);
    assert!(bytes > 1 << 45, "{bytes}");
    let err = plan.check_fits("the model's weights", bytes).unwrap_err().to_string();
    assert!(err.contains("the model's weights needs about") && err.contains("GiB available"), "{err}");
    plan.check_fits("a small thing", 1024).unwrap();
}

/// A safetensors file whose header is JSON but whose byte ranges are wrong: the error names
/// the tensor at fault (safetensors' own message does not).
#[test]
fn bad_header_ranges_name_their_tensor() {
    let dir = scratch_dir("header-ranges");
    let write = |name: &str, header: &str, data_len: usize| {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data_len));
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        load_state_dict(&path).unwrap_err().to_string()
    };
    let err = write("overlap.safetensors", r#"{"a.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b.weight":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 12);
    assert!(err.contains("overlap.safetensors") && err.contains("tensor `b.weight`") && err.contains("overlaps"), "{err}");
    let err = write("size.safetensors", r#"{"a.weight":{"dtype":"I64","shape":[3],"data_offsets":[0,8]}}"#, 8);
    assert!(err.contains("tensor `a.weight`") && err.contains("needs 24 bytes"), "{err}");
    let err = write("past.safetensors", r#"{"a.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8);
    assert!(err.contains("tensor `a.weight`") && err.contains("run past"), "{err}");
}

/// `.pt` files without a state dict say where they looked, in words.
#[test]
fn pt_without_state_dict_names_where_it_looked() {
    let dir = scratch_dir("pt-keys");
    let path = dir.join("empty.pt");
    std::fs::write(&path, b"PK\x05\x06\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0").unwrap();
    let err = load_state_dict(&path).unwrap_err().to_string();
    assert!(err.contains("empty.pt") && !err.contains("Some(") && !err.contains("None"), "{err}");
}

/// Inputs the fuzzers found crashing the loaders: each now fails with an error naming the file.
#[test]
fn fuzz_regressions_fail_with_named_errors() {
    for name in ["pickle-short-rebuild-args.pt", "pickle-long1-too-wide.pt"] {
        let err = load_state_dict(&fixture_path(&format!("fuzz/{name}"))).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
}

/// Under expert parallelism a rank's VarBuilder holds its own routed experts only (the others
/// never reach its device), every other tensor whole, and the memory check counts that share.
#[test]
fn each_rank_loads_its_own_experts() {
    let cfg = tiny_config();
    let e = cfg.num_experts;
    let weights = fixture_path("models/tiny/model.safetensors");
    for (rank, comm) in ditmoe::dist::LocalGroup::new(2).into_iter().enumerate() {
        let plan = ditmoe::ExecutionPlan::inference(&Device::Cpu, ditmoe::Precision::F32).with_expert_parallel(std::sync::Arc::new(comm));
        let vb = load_state_dict(&weights).unwrap().into_var_builder(&cfg, &plan).unwrap();
        for id in 0..e {
            let mine = (rank * e / 2..(rank + 1) * e / 2).contains(&id);
            assert_eq!(vb.contains_tensor(&format!("blocks.0.moe.experts.{id}.gate_proj.weight")), mine, "rank {rank}, expert {id}");
        }
        assert!(vb.contains_tensor("blocks.0.moe.gate.weight") && vb.contains_tensor("pos_embed"));
        assert_eq!(cfg.weight_bytes(DType::F32, 2), ((cfg.param_counts().0 - cfg.routed_experts_params() / 2) * 4) as u64);
    }
}
