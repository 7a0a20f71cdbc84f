//! The MoE language model (`ditmoe::lm`) against transformers' own Mixtral, Qwen2-MoE and
//! OLMoE (fixtures `tests/fixtures/lm/hf-*`, README there): logits, every MoE layer's router
//! logits and expert choices, the load-balancing loss, the causal-LM loss and the greedy
//! KV-cache continuation; then the HF folder handling: refused configs, missing and
//! mis-shaped tensors named, save → load and sharded folders. `--nocapture` prints the parity
//! table.
use crate::common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixture_path, load_fixture, max_abs, rel_err, scratch_dir};
use ditmoe::lm::{load_hf, HfCheckpoint, LmConfig, LmModel};
use ditmoe::{ExecutionPlan, Precision};
use std::collections::HashMap;
use std::path::Path;

const TOL: f64 = 1e-4;

fn plan() -> ExecutionPlan {
    ExecutionPlan::inference(&Device::Cpu, Precision::F32)
}

fn load(case: &str) -> LmModel {
    load_hf(&fixture_path(&format!("lm/{case}")), &plan()).unwrap_or_else(|e| panic!("{case}: {e}"))
}

fn io(case: &str) -> HashMap<String, Tensor> {
    load_fixture(&format!("lm/{case}/io.safetensors"))
}

fn ids(io: &HashMap<String, Tensor>) -> Tensor {
    io["input_ids"].to_dtype(DType::U32).unwrap()
}

/// |a - b| / |b| of two scalars (`[1]` or `[]` tensors).
fn scalar_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0];
    let b = b.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0];
    (a - b).abs() / b.abs().max(1e-30)
}

/// Per row, the k largest entries' indices, largest first.
fn top_k(logits: &Tensor, k: usize) -> Vec<Vec<u32>> {
    let idx = logits.to_dtype(DType::F32).unwrap().arg_sort_last_dim(false).unwrap().narrow(1, 0, k).unwrap();
    idx.to_vec2::<u32>().unwrap()
}

/// Runs one family against its fixture; returns the (quantity, error) rows and asserts each.
fn parity(case: &str) -> Vec<(String, f64)> {
    let model = load(case);
    let io = io(case);
    let input_ids = ids(&io);
    let out = model.forward(&input_ids, None, false).unwrap();
    let mut rows = vec![("logits (max-abs / max-ref)".to_string(), rel_err(&out.logits, &io["logits"]))];
    let moe_layers = model.config().moe_layers();
    assert_eq!(out.router_logits.len(), moe_layers.len());
    for (l, logits) in out.router_logits.iter().enumerate() {
        let reference = &io[&format!("router_logits.{l}")];
        rows.push((format!("router_logits.{l}"), rel_err(logits, reference)));
        let k = model.config().layers[moe_layers[l]].moe().unwrap().top_k;
        let (ours, theirs) = (top_k(logits, k), top_k(reference, k));
        let differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{case}: layer {l}: {differ} tokens choose other experts than transformers'");
        rows.push((format!("expert choices.{l} (tokens differing)"), differ as f64));
        let counts = out.expert_counts[l].to_vec1::<u32>().unwrap();
        assert_eq!(counts.iter().sum::<u32>() as usize, input_ids.elem_count() * k);
    }
    rows.push(("aux_loss".into(), scalar_rel(out.aux_loss.as_ref().unwrap(), &io["aux_loss"])));
    let loss = model.loss(&input_ids, &input_ids).unwrap();
    rows.push(("loss".into(), scalar_rel(&loss, &io["loss"])));
    // The same loss with i64 labels (the -100-aware path) and nothing ignored.
    let loss_i64 = model.loss(&input_ids, &io["input_ids"]).unwrap();
    rows.push(("loss (i64 labels)".into(), scalar_rel(&loss_i64, &io["loss"])));

    let reference: Vec<u32> = io["generated"].to_dtype(DType::U32).unwrap().i(0).unwrap().to_vec1().unwrap();
    let prompt: Vec<u32> = input_ids.i(0).unwrap().to_vec1().unwrap();
    let generated = model.generate_greedy(&prompt, reference.len() - prompt.len()).unwrap();
    let differ = generated.iter().zip(&reference).filter(|(a, b)| a != b).count();
    assert_eq!(generated, reference, "{case}: greedy continuation differs from transformers'");
    rows.push(("generated (tokens differing)".into(), differ as f64));

    // The MoE layers on the kernel pipeline (on the CPU, the kernels' references; frozen
    // experts stacked once): the same logits, and the saved weights are the checkpoint's.
    let kernels = load_hf(&fixture_path(&format!("lm/{case}")), &plan().with_moe_kernels(true)).unwrap();
    let k_out = kernels.forward(&input_ids, None, false).unwrap();
    rows.push(("logits, kernel pipeline".into(), rel_err(&k_out.logits, &io["logits"])));
    let dir = scratch_dir(&format!("lm-kernels-save-{case}"));
    kernels.save_hf(&dir).unwrap();
    let saved = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let original = candle_core::safetensors::load(fixture_path(&format!("lm/{case}/model.safetensors")), &Device::Cpu).unwrap();
    assert_eq!(saved.len(), original.len());
    for (name, t) in &original {
        assert_eq!(max_abs(&saved[name], t), 0.0, "{case}: saved {name}");
    }

    println!("\n| case | quantity | max error |\n|---|---|---:|");
    for (q, e) in &rows {
        println!("| {case} | {q} | {e:.3e} |");
    }
    for (q, e) in &rows {
        assert!(*e <= TOL, "{case}: {q}: error {e:.3e} > {TOL:.0e}");
    }
    rows
}

#[test]
fn mixtral_matches_transformers() {
    parity("hf-mixtral");
}

#[test]
fn qwen2_moe_matches_transformers() {
    parity("hf-qwen2-moe");
}

#[test]
fn olmoe_matches_transformers() {
    parity("hf-olmoe");
}

/// The KV cache gives the logits of a full forward: the prompt in two pieces through the cache
/// against the whole prompt at once.
#[test]
fn cached_forward_matches_full_forward() {
    let model = load("hf-qwen2-moe");
    let input_ids = ids(&io("hf-qwen2-moe"));
    let full = model.forward(&input_ids, None, false).unwrap().logits;
    let mut cache = ditmoe::lm::KvCache::for_config(model.config());
    let a = model.forward(&input_ids.narrow(1, 0, 5).unwrap(), Some(&mut cache), false).unwrap().logits;
    let b = model.forward(&input_ids.narrow(1, 5, 7).unwrap(), Some(&mut cache), false).unwrap().logits;
    assert_eq!(cache.len(), 12);
    let pieces = Tensor::cat(&[a, b], 1).unwrap();
    assert!(max_abs(&pieces, &full) < 1e-5, "cached logits differ by {}", max_abs(&pieces, &full));
}

#[test]
fn cache_past_max_positions_is_refused() {
    let model = load("hf-mixtral");
    let max = model.config().max_position_embeddings;
    let mut cache = ditmoe::lm::KvCache::for_config(model.config());
    let ids = Tensor::zeros((1, max - 2), DType::U32, &Device::Cpu).unwrap();
    model.forward(&ids, Some(&mut cache), false).unwrap();
    let more = Tensor::zeros((1, 3), DType::U32, &Device::Cpu).unwrap();
    let err = model.forward(&more, Some(&mut cache), false).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");
}

fn hf_json(case: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_path(&format!("lm/{case}/config.json"))).unwrap()).unwrap()
}

#[test]
fn unknown_model_type_and_architecture_are_refused_by_name() {
    let mut json = hf_json("hf-mixtral");
    json["model_type"] = "deepseek_v3".into();
    let err = LmConfig::from_hf_config(&json).unwrap_err().to_string();
    assert!(err.contains("deepseek_v3") && err.contains("mixtral") && err.contains("qwen2_moe") && err.contains("olmoe"), "{err}");

    let mut json = hf_json("hf-olmoe");
    json["architectures"] = serde_json::json!(["OlmoeForSequenceClassification"]);
    let err = LmConfig::from_hf_config(&json).unwrap_err().to_string();
    assert!(err.contains("OlmoeForSequenceClassification") && err.contains("OlmoeForCausalLM"), "{err}");

    let mut json = hf_json("hf-qwen2-moe");
    json.as_object_mut().unwrap().remove("moe_intermediate_size");
    let err = LmConfig::from_hf_config(&json).unwrap_err().to_string();
    assert!(err.contains("moe_intermediate_size"), "{err}");

    // and through the folder loader, naming the file
    let dir = scratch_dir("lm-unknown-type");
    let mut json = hf_json("hf-mixtral");
    json["model_type"] = "llama4".into();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    std::fs::copy(fixture_path("lm/hf-mixtral/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let err = HfCheckpoint::open(&dir).err().expect("refused").to_string();
    assert!(err.contains("llama4") && err.contains("config.json"), "{err}");
}

#[test]
fn qwen2_moe_layer_plan_follows_mlp_only_layers_and_sparse_step() {
    let mut json = hf_json("hf-qwen2-moe");
    json["num_hidden_layers"] = 6.into();
    json["decoder_sparse_step"] = 2.into();
    json["mlp_only_layers"] = serde_json::json!([3]);
    let cfg = LmConfig::from_hf_config(&json).unwrap();
    assert_eq!(cfg.moe_layers(), vec![1, 5]);
    let moe = cfg.layers[1].moe().unwrap();
    assert_eq!((moe.num_experts, moe.expert_intermediate_size, moe.shared_expert_intermediate_size, moe.shared_expert_gate), (8, 16, 32, true));
    assert!(cfg.attention_bias && !cfg.qk_norm);
    cfg.validate().unwrap();
}

/// The fixture's tensors, its config, written to `dir` with `edit` applied to the tensors.
fn write_folder(case: &str, dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(fixture_path(&format!("lm/{case}/model.safetensors")), &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::copy(fixture_path(&format!("lm/{case}/config.json")), dir.join("config.json")).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = scratch_dir("lm-missing");
    let name = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
    write_folder("hf-mixtral", &dir, |t| {
        t.remove(name).unwrap();
    });
    let err = load_hf(&dir, &plan()).expect_err("refused").to_string();
    assert!(err.contains(name) && err.contains("model.safetensors"), "{err}");
}

#[test]
fn misshaped_tensor_is_named() {
    let dir = scratch_dir("lm-shape");
    let name = "model.layers.0.self_attn.k_proj.weight";
    write_folder("hf-olmoe", &dir, |t| {
        t.insert(name.into(), Tensor::zeros((17, 32), DType::F32, &Device::Cpu).unwrap());
    });
    let err = load_hf(&dir, &plan()).expect_err("refused").to_string();
    assert!(err.contains(name) && err.contains("[17, 32]") && err.contains("model.safetensors"), "{err}");
}

#[test]
fn unused_tensor_is_named() {
    let dir = scratch_dir("lm-unused");
    write_folder("hf-qwen2-moe", &dir, |t| {
        t.insert("model.layers.0.self_attn.q_norm.weight".into(), Tensor::ones(16, DType::F32, &Device::Cpu).unwrap());
    });
    let err = load_hf(&dir, &plan()).expect_err("refused").to_string();
    assert!(err.contains("model.layers.0.self_attn.q_norm.weight"), "{err}");
}

#[test]
fn save_then_load_gives_identical_logits() {
    for case in ["hf-mixtral", "hf-qwen2-moe", "hf-olmoe"] {
        let model = load(case);
        let input_ids = ids(&io(case));
        let before = model.forward(&input_ids, None, false).unwrap().logits;
        let dir = scratch_dir(&format!("lm-save-{case}"));
        model.save_hf(&dir).unwrap();
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(json["model_type"], hf_json(case)["model_type"], "{case}: the family's transformers fields");
        // the transformers fields alone give the same config as ours
        let from_hf = LmConfig::from_hf_config(&json).unwrap();
        assert_eq!(&from_hf, model.config(), "{case}");
        let again = load_hf(&dir, &plan()).unwrap();
        let after = again.forward(&input_ids, None, false).unwrap().logits;
        assert_eq!(max_abs(&after, &before), 0.0, "{case}");
        // same tensor names as the HF checkpoint
        let ours = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let theirs = candle_core::safetensors::load(fixture_path(&format!("lm/{case}/model.safetensors")), &Device::Cpu).unwrap();
        let (mut a, mut b): (Vec<_>, Vec<_>) = (ours.keys().collect(), theirs.keys().collect());
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case}");
        assert!(std::fs::read_dir(&*dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
    }
}

#[test]
fn sharded_index_folder_loads() {
    let case = "hf-olmoe";
    let dir = scratch_dir("lm-sharded");
    let tensors = candle_core::safetensors::load(fixture_path(&format!("lm/{case}/model.safetensors")), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    let (first, second) = names.split_at(names.len() / 2);
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let subset: HashMap<String, Tensor> = part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&subset, dir.join(shard)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), shard.into());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::copy(fixture_path(&format!("lm/{case}/config.json")), dir.join("config.json")).unwrap();
    let ckpt = HfCheckpoint::open(&dir).unwrap();
    assert_eq!(ckpt.files().len(), 2);
    let sharded = ckpt.load(&plan()).unwrap();
    let input_ids = ids(&io(case));
    let a = sharded.forward(&input_ids, None, false).unwrap().logits;
    let b = load(case).forward(&input_ids, None, false).unwrap().logits;
    assert_eq!(max_abs(&a, &b), 0.0);

    // a shard the index lists but the folder lacks is named
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = HfCheckpoint::open(&dir).err().expect("refused").to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

/// A training plan loads the weights as variables, and the loss has a gradient for every one
/// outside the routed experts (an expert no token chose has none).
#[test]
fn training_plan_gives_gradients() {
    let case = "hf-qwen2-moe";
    let model = load_hf(&fixture_path(&format!("lm/{case}")), &ExecutionPlan::training(&Device::Cpu, Precision::F32)).unwrap();
    let input_ids = ids(&io(case));
    let loss = model.loss(&input_ids, &input_ids).unwrap();
    assert!(scalar_rel(&loss, &io(case)["loss"]) < TOL);
    let grads = loss.backward().unwrap();
    let vars = model.vars().unwrap();
    assert_eq!(vars.len(), model.named_params().len());
    let names: Vec<&str> = model.named_params().iter().map(|(n, _)| n.as_str()).collect();
    for (v, name) in vars.iter().zip(names).filter(|(_, n)| !n.contains(".experts.")) {
        assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {name}");
    }
}

/// The layer-plan helpers and `validate`'s named errors.
#[test]
fn layer_plans_and_validation() {
    use ditmoe::lm::LayerMlp;
    let base = LmConfig::from_hf_config(&hf_json("hf-qwen2-moe")).unwrap();
    let moe = base.layers[0].moe().unwrap().clone();
    // a pyramid: more experts in later layers, MoE every second layer
    let layers = LayerMlp::moe_every_nth(4, 2, |i| ditmoe::moe::MoeConfig { num_experts: 4 * (i + 1), ..moe.clone() });
    assert_eq!(layers.iter().map(|l| l.moe().map(|m| m.num_experts)).collect::<Vec<_>>(), vec![None, Some(8), None, Some(16)]);
    let cfg = LmConfig { num_layers: 4, layers, ..base.clone() };
    cfg.validate().unwrap();
    assert!(cfg.to_hf_config().is_none(), "uneven MoE layers are no transformers family");
    // built and run from fresh variables, its dense and MoE layers side by side
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = LmModel::new(&cfg, &ExecutionPlan::training(&Device::Cpu, Precision::F32), vb).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
    let out = model.forward(&ids, None, true).unwrap();
    assert_eq!(out.router_logits.iter().map(|r| r.dims().to_vec()).collect::<Vec<_>>(), vec![vec![4, 8], vec![4, 16]]);
    assert_eq!(model.vars().unwrap().len(), varmap.all_vars().len());
    // the parameter counts are the built model's: in all, and the routed experts' share
    let data = varmap.data().lock().unwrap();
    let count = |keep: &dyn Fn(&str) -> bool| data.iter().filter(|(n, _)| keep(n)).map(|(_, v)| v.elem_count()).sum::<usize>();
    assert_eq!(cfg.num_parameters(), count(&|_| true));
    assert_eq!(cfg.routed_experts_params(), count(&|n| n.contains(".experts.")));
    drop(data);

    let all = LayerMlp::moe_every_layer(3, |_| moe.clone());
    assert!(all.iter().all(|l| l.moe().is_some()));

    let bad = |edit: &dyn Fn(&mut LmConfig)| {
        let mut c = base.clone();
        edit(&mut c);
        c.validate().unwrap_err().to_string()
    };
    assert!(bad(&|c| c.num_kv_heads = 3).contains("num_kv_heads"));
    assert!(bad(&|c| c.vocab_size = 0).contains("vocab_size"));
    assert!(bad(&|c| c.layers.pop().map(drop).unwrap_or(())).contains("layers"));
    assert!(bad(&|c| c.moe_prefix = "moe".into()).contains("moe_prefix"));
    let e = bad(&|c| {
        if let LayerMlp::Moe(m) = &mut c.layers[1] {
            m.top_k = 9;
        }
    });
    assert!(e.contains("layer 1") && e.contains("top_k"), "{e}");
}
