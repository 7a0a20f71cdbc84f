//! Language-model throughput: prefill tokens/s at 512 and 2048 tokens and decode tokens/s at
//! batch 1 and 32, for a Mixtral-shaped and a Qwen2-MoE-shaped model of about 1 B parameters
//! with random weights, frozen (the MoE layers run the fused gating, sort and grouped GEMMs).
//!
//! cargo run --release --features cuda --example bench_lm -- --device cuda \
//!     [--models mixtral,qwen2-moe] [--dtype bf16] [--prefill 512,2048] [--decode-batches 1,32] \
//!     [--decode-steps 32] [--budget-ms 1000] [--write-configs DIR]
//!
//! `--write-configs DIR` writes each shape's HF `config.json` to `DIR/<model>/` and exits:
//! `scripts/bench_lm_transformers.py` builds the same models in transformers from them, and
//! the two run in the same device command (docs/benchmarks.md). Decode: a 16-token prompt, then
//! greedy steps through `lm::Decoder` (static KV cache, each step a CUDA-graph replay), timed
//! over the steps after the warm-up and capture; and, for comparison, the same steps eagerly on
//! a growing cache (ms per step = (prompt + steps − prompt alone) / steps).
//! Timing: `ditmoe::runtime::timing::median_ms` (CUDA events, calls back to back).
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use ditmoe::lm::{Decoder, KvCache, LmConfig, LmModel};
use ditmoe::runtime::timing::median_ms;
use ditmoe::{ExecutionPlan, Precision};
use std::collections::HashMap;

#[path = "support/args.rs"]
mod args;
use args::arg;

/// Flag `name`'s comma-separated numbers.
fn numbers(name: &str, default: &str) -> Vec<usize> {
    args::list(name, default).iter().map(|v| v.parse().expect("a number list")).collect()
}

/// The benchmark shapes as transformers configs (what `--write-configs` writes).
fn hf_config(name: &str) -> serde_json::Value {
    let common = serde_json::json!({
        "vocab_size": 32000, "hidden_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "tie_word_embeddings": false, "hidden_act": "silu", "router_aux_loss_coef": 0.01,
        "output_router_logits": false, "use_cache": true
    });
    let specific = match name {
        // Mixtral-8x7B's layout scaled down: 8 experts, top-2, always renormalised, GQA 2:1
        "mixtral" => serde_json::json!({
            "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_key_value_heads": 8,
            "intermediate_size": 2048, "num_local_experts": 8, "num_experts_per_tok": 2,
            "sliding_window": null, "router_jitter_noise": 0.0
        }),
        // Qwen1.5-MoE-A2.7B's layout scaled down: many small experts, top-4 without
        // renormalisation, a gated shared expert, q/k/v biases
        "qwen2-moe" => serde_json::json!({
            "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "num_key_value_heads": 16,
            "intermediate_size": 2816, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 2048,
            "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": false, "qkv_bias": true,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": false
        }),
        other => panic!("unknown model `{other}` (mixtral, qwen2-moe)"),
    };
    let mut m = common.as_object().expect("object").clone();
    m.extend(specific.as_object().expect("object").clone());
    serde_json::Value::Object(m)
}

/// Frozen random weights in the plan's dtype: transformers' init (N(0, 0.02), norms 1), built
/// once as trainable f32 variables to learn every name and shape.
fn frozen_model(cfg: &LmConfig, plan: &ExecutionPlan) -> Result<LmModel> {
    let varmap = VarMap::new();
    LmModel::new(cfg, &ExecutionPlan::training(&plan.device, Precision::F32), VarBuilder::from_varmap(&varmap, DType::F32, &plan.device))?;
    let mut vars: Vec<_> = varmap.data().lock().expect("varmap").iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    ditmoe::lm::init::initialize(&vars, 0)?;
    let dtype = plan.weight_dtype();
    let tensors: HashMap<String, Tensor> = vars.into_iter().map(|(n, v)| Ok((n, v.as_tensor().detach().to_dtype(dtype)?))).collect::<candle_core::Result<_>>()?;
    drop(varmap);
    Ok(LmModel::new(cfg, plan, VarBuilder::from_tensors(tensors, dtype, &plan.device))?)
}

fn main() -> Result<()> {
    let models = arg("--models", "mixtral,qwen2-moe");
    if let Some(dir) = std::env::args().skip_while(|a| a != "--write-configs").nth(1) {
        for name in models.split(',') {
            let path = std::path::Path::new(&dir).join(name);
            std::fs::create_dir_all(&path)?;
            std::fs::write(path.join("config.json"), serde_json::to_string_pretty(&hf_config(name))?)?;
        }
        println!("wrote the configs of {models} to {dir}");
        return Ok(());
    }
    let device = match arg("--device", "cuda").as_str() {
        "cpu" => Device::Cpu,
        // its own stream: graph capture is not allowed on the legacy default stream
        _ => ditmoe::runtime::graph::cuda_device(0)?,
    };
    let precision = match arg("--dtype", "bf16").as_str() {
        "f32" => Precision::F32,
        "f16" => Precision::F16,
        _ => Precision::Bf16,
    };
    let plan = ExecutionPlan::inference(&device, precision);
    plan.apply_matmul_precision();
    let budget = arg("--budget-ms", "1000").parse::<f64>()?;
    let steps = arg("--decode-steps", "32").parse::<usize>()?;
    println!("| model | params | bench | size | ms | tokens/s |");
    println!("|---|---:|---|---:|---:|---:|");
    for name in models.split(',') {
        let cfg = LmConfig::from_hf_config(&hf_config(name))?;
        let model = frozen_model(&cfg, &plan)?;
        let params = cfg.num_parameters();
        for t in numbers("--prefill", "512,2048") {
            let ids = Tensor::arange(0u32, t as u32, &device)?.unsqueeze(0)?;
            let ms = median_ms(&device, budget, || model.forward(&ids, None, false).map(drop))?;
            println!("| {name} | {:.2} B | prefill | {t} tokens | {ms:.2} | {:.0} |", params as f64 / 1e9, t as f64 / ms * 1e3);
        }
        for b in numbers("--decode-batches", "1,32") {
            // the decoder as `lm generate` runs it: a static KV cache, each step after the first
            // two a CUDA-graph replay
            let prompt = Tensor::arange(0u32, (16 * b) as u32, &device)?.reshape((b, 16))?;
            let mut decoder = Decoder::new(&model, b, 16 + steps + 1)?;
            let mut next = decoder.prefill(&prompt)?.argmax(D::Minus1)?.unsqueeze(1)?;
            // warm-up and capture
            for _ in 0..2 {
                next = decoder.step(&next)?.argmax(D::Minus1)?.unsqueeze(1)?;
            }
            device.synchronize()?;
            let started = std::time::Instant::now();
            for _ in 0..steps - 2 {
                next = decoder.step(&next)?.argmax(D::Minus1)?.unsqueeze(1)?;
            }
            device.synchronize()?;
            let ms = started.elapsed().as_secs_f64() * 1e3 / (steps - 2) as f64;
            println!("| {name} | {:.2} B | decode | batch {b} | {ms:.2} per step ({} graph replays) | {:.0} |", params as f64 / 1e9, decoder.replays(), b as f64 / ms * 1e3);
        }
        // the same steps without the static cache and graphs: a growing cache, each step eager
        for b in numbers("--decode-batches", "1,32") {
            let prompt = Tensor::arange(0u32, (16 * b) as u32, &device)?.reshape((b, 16))?;
            let run = |decode_steps: usize| -> candle_core::Result<()> {
                let mut cache = KvCache::for_config(&cfg);
                let out = model.forward(&prompt, Some(&mut cache), false)?;
                let mut next = out.logits.narrow(1, 15, 1)?.argmax(D::Minus1)?;
                for _ in 0..decode_steps {
                    let out = model.forward(&next, Some(&mut cache), false)?;
                    next = out.logits.argmax(D::Minus1)?;
                }
                Ok(())
            };
            let total = median_ms(&device, budget, || run(steps))?;
            let prefill = median_ms(&device, budget, || run(0))?;
            let ms = (total - prefill) / steps as f64;
            println!("| {name} | {:.2} B | decode, eager | batch {b} | {ms:.2} per step | {:.0} |", params as f64 / 1e9, b as f64 / ms * 1e3);
        }
    }
    Ok(())
}
