//! The two ways training trades precision or time for memory: activation recomputation per
//! block gives the gradients of the plain backward, and bf16 mixed precision (bf16 weight
//! copies, f32 masters) trains like f32 within bf16's error, keeps f32 checkpoints and resumes
//! exactly.
use crate::common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::train::scratch_training_folder;
use common::{fixture_path, rel_err};
use ditmoe::model::{ForwardMode, Trace};
use ditmoe::train::{RunStart, TrainConfig, Trainer};
use ditmoe::config::ProMoeConfig;
use ditmoe::{DitConfig, DitMoe, ExecutionPlan, Precision};
use std::path::Path;

/// Deterministic values in [-scale, scale) for `shape`, a function of `seed`.
fn values(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let vals: Vec<f32> = (0..n as u64).map(|i| (((seed.wrapping_add(i.wrapping_mul(2654435761)) % 1000) as f32) / 500.0 - 1.0) * scale).collect();
    Tensor::from_vec(vals, shape, &Device::Cpu).unwrap()
}

/// The model (random weights from the VarMap's initialisers, so that no zero-initialised
/// layer hides a gradient) and its variables.
fn model(cfg: &DitConfig) -> (DitMoe, VarMap) {
    let varmap = VarMap::new();
    let plan = ExecutionPlan::training(&Device::Cpu, Precision::F32);
    let model = DitMoe::new(cfg, &plan, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    // adaLN and the final layer start at zero in the official init; here they need not
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let seed = name.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        var.set(&values(var.dims(), seed, 0.2)).unwrap();
    }
    (model, varmap)
}

/// `mean(out²) + Σ balance + Σ contrastive`, the shape of the trainer's loss.
fn loss_of(out: &ditmoe::model::DitOutput) -> Tensor {
    let mut loss = out.out.sqr().unwrap().mean_all().unwrap();
    for l in out.aux_losses.iter().chain(&out.contrastive_losses) {
        loss = (loss + l.sum_all().unwrap()).unwrap();
    }
    loss
}

fn recompute_matches_plain(cfg: &DitConfig, case: &str) {
    let (model, varmap) = model(cfg);
    let n = 3;
    let s = cfg.input_size;
    let x = values(&[n, cfg.in_channels, s, s], 11, 1.5);
    let t = Tensor::new(&[10f32, 500.0, 990.0], &Device::Cpu).unwrap();
    // the last label is the null class (ProMoE routes its tokens to the unconditional expert)
    let y = Tensor::new(&[0u32, 1, cfg.null_class() as u32], &Device::Cpu).unwrap();

    let plain = model.forward_full(&x, &t, &y, ForwardMode::Train, &mut Trace::default()).unwrap();
    let plain_loss = loss_of(&plain);
    let plain_grads = plain_loss.backward().unwrap();

    let (out, tape) = model.forward_recomputed(&x, &t, &y).unwrap();
    assert_eq!(rel_err(&out.out, &plain.out), 0.0, "{case}: the recomputed forward's output");
    assert_eq!(out.aux_losses.len(), plain.aux_losses.len());
    assert_eq!(out.contrastive_losses.len(), plain.contrastive_losses.len());
    assert_eq!(out.expert_counts_host().unwrap(), plain.expert_counts_host().unwrap(), "{case}: routing");
    let loss = loss_of(&out);
    assert_eq!(loss.to_scalar::<f32>().unwrap(), plain_loss.to_scalar::<f32>().unwrap(), "{case}: loss");
    let mut grads = loss.backward().unwrap();
    tape.backward(&model, &mut grads, 1.0).unwrap();

    let mut worst = (0f64, String::new());
    let vars = varmap.data().lock().unwrap();
    for (name, var) in vars.iter() {
        match (plain_grads.get(var.as_tensor()), grads.get(var.as_tensor())) {
            (Some(a), Some(b)) => {
                let e = rel_err(b, a);
                if e > worst.0 {
                    worst = (e, name.clone());
                }
            }
            (None, None) => {}
            (a, _) => panic!("{case}: `{name}` has a gradient in {} only", if a.is_some() { "the plain backward" } else { "the recomputed backward" }),
        }
    }
    println!("{case}: {} parameters, worst gradient rel. err {:.2e} ({})", vars.len(), worst.0, worst.1);
    assert!(worst.0 < 1e-5, "{case}: recomputed gradient of `{}` off by {:.2e}", worst.1, worst.0);
}

#[test]
fn recomputed_blocks_give_the_plain_gradients() {
    let tiny = DitConfig::from_file(&fixture_path("models/tiny/config.json")).unwrap();
    recompute_matches_plain(&tiny, "DiT-MoE tiny");
    let mut promoe = tiny.clone();
    promoe.promoe = Some(ProMoeConfig::released(promoe.hidden_size));
    recompute_matches_plain(&promoe, "ProMoE");
}

/// The bf16 model's gradients (bf16 weights, products and activations between matmuls; f32
/// residual stream, norms and softmaxes) against the f32 model's at the same weights (the bf16
/// ones, widened): bf16's error, no more.
#[test]
fn bf16_gradients_are_the_f32_gradients_within_bf16_error() {
    let cfg = DitConfig::from_file(&fixture_path("models/tiny/config.json")).unwrap();
    let (f32_model, f32_vars) = model(&cfg);
    let bf16_vars = VarMap::new();
    let plan = ExecutionPlan::training(&Device::Cpu, Precision::Bf16);
    let bf16_model = DitMoe::new(&cfg, &plan, VarBuilder::from_varmap(&bf16_vars, DType::BF16, &Device::Cpu)).unwrap();
    let f32_map = f32_vars.data().lock().unwrap();
    let bf16_map = bf16_vars.data().lock().unwrap();
    for (name, var) in f32_map.iter() {
        let rounded = var.as_tensor().to_dtype(DType::BF16).unwrap();
        var.set(&rounded.to_dtype(DType::F32).unwrap()).unwrap();
        bf16_map[name].set(&rounded).unwrap();
    }
    let x = values(&[3, cfg.in_channels, cfg.input_size, cfg.input_size], 11, 1.5);
    let t = Tensor::new(&[10f32, 500.0, 990.0], &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
    let (mut f32_trace, mut bf16_trace) = (Trace::routing(), Trace::routing());
    let reference = loss_of(&f32_model.forward_full(&x, &t, &y, ForwardMode::Train, &mut f32_trace).unwrap());
    let loss = loss_of(&bf16_model.forward_full(&x, &t, &y, ForwardMode::Train, &mut bf16_trace).unwrap());
    // the same experts for every token (their order within the top-k may swap on a near tie)
    let chosen = |r: &ditmoe::model::LayerRouting| {
        let mut rows = r.experts.to_vec2::<u32>().unwrap();
        rows.iter_mut().for_each(|row| row.sort());
        rows
    };
    for (a, b) in f32_trace.routing.iter().zip(&bf16_trace.routing) {
        assert_eq!(chosen(a), chosen(b), "block {}: expert choices", a.layer);
    }
    assert_eq!(loss.dtype(), DType::F32, "the loss is f32 in every precision");
    let (ref_grads, grads) = (reference.backward().unwrap(), loss.backward().unwrap());
    let mut worst = (0f64, String::new());
    for (name, var) in f32_map.iter() {
        let Some(want) = ref_grads.get(var.as_tensor()) else { continue };
        let got = grads.get(bf16_map[name].as_tensor()).unwrap_or_else(|| panic!("no bf16 gradient for `{name}`"));
        assert_eq!(got.dtype(), DType::BF16, "`{name}`: the gradient of a bf16 weight is bf16");
        let e = common::rel_l2(&got.to_dtype(DType::F32).unwrap(), want);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    let loss_err = (loss.to_scalar::<f32>().unwrap() - reference.to_scalar::<f32>().unwrap()).abs() / reference.to_scalar::<f32>().unwrap().abs();
    println!("loss rel. err {loss_err:.2e}; worst gradient rel. L2 err {:.2e} ({})", worst.0, worst.1);
    assert!(loss_err < 1e-2 && loss_err > 0.0, "bf16 loss rel. err {loss_err:e}");
    // A gradient passes through every bf16 product between the loss and its weight (both
    // directions of each matmul), so it carries a few bf16 roundings (2^-9 each) more than the
    // output does: 1-2% in relative L2 here.
    assert!(worst.0 < 3e-2, "bf16 gradient of `{}` off by {:.2e} (relative L2)", worst.1, worst.0);
}

fn config(root: &Path, out: &str, steps: u64, recompute: bool) -> TrainConfig {
    serde_json::from_value(serde_json::json!({
        "model": root.join("model.json"), "data": root.join("data"), "out": root.join(out),
        "objective": "rf", "image_size": 6, "global_batch": 8, "micro_batch": 4, "steps": steps, "lr": 1e-3,
        "max_grad_norm": 1.0, "ema_decay": 0.9, "seed": 3, "log_every": 1, "ckpt_every": 4,
        "num_workers": 0, "recompute": recompute,
    }))
    .unwrap()
}

fn run(cfg: TrainConfig, precision: Precision, start: RunStart) -> Vec<f32> {
    run_plan(cfg, &ExecutionPlan::training(&Device::Cpu, precision), start)
}

fn run_plan(cfg: TrainConfig, plan: &ExecutionPlan, start: RunStart) -> Vec<f32> {
    let mut t = Trainer::new(cfg, plan, start).unwrap();
    t.run(false).unwrap().steps.iter().map(|s| s.loss).collect()
}

/// The CUDA training path (the MoE kernel pipeline: fused gating, permutation, grouped GEMMs and
/// their backward), run by its CPU references, in bf16 with recomputation: the same losses as
/// the reference dispatch within bf16's error.
#[test]
fn bf16_kernel_pipeline_trains_like_the_reference_dispatch() {
    let tmp = scratch_training_folder("train-bf16-kernels");
    let bf16 = ExecutionPlan::training(&Device::Cpu, Precision::Bf16);
    let reference = run_plan(config(&tmp, "reference", 6, false), &bf16, RunStart::New);
    let kernels = run_plan(config(&tmp, "kernels", 6, true), &bf16.clone().with_moe_kernels(true), RunStart::New);
    println!("reference {reference:?}\nkernels {kernels:?}");
    for (i, (a, b)) in reference.iter().zip(&kernels).enumerate() {
        assert!((a - b).abs() <= 1e-2 * a.abs(), "step {}: loss {b} on the kernel pipeline, {a} on the reference dispatch", i + 1);
    }
}

#[test]
fn recomputing_trainer_follows_the_plain_one() {
    let tmp = scratch_training_folder("train-recompute");
    let plain = run(config(&tmp, "plain", 8, false), Precision::F32, RunStart::New);
    let recomputed = run(config(&tmp, "recomputed", 8, true), Precision::F32, RunStart::New);
    for (i, (a, b)) in plain.iter().zip(&recomputed).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "step {}: loss {b} recomputed, {a} plain", i + 1);
    }
}

#[test]
fn bf16_training_follows_f32_and_resumes_exactly() {
    let tmp = scratch_training_folder("train-bf16");
    let f32_losses = run(config(&tmp, "f32", 12, false), Precision::F32, RunStart::New);
    let bf16 = run(config(&tmp, "bf16", 12, false), Precision::Bf16, RunStart::New);
    // Step 1 is the same in both: the official init zeroes the final layer, so the model's
    // output is 0 whatever the precision. Step 2 runs on the same once-updated weights.
    let second = (bf16[1] - f32_losses[1]).abs() / f32_losses[1];
    println!("losses f32 {f32_losses:?}\nlosses bf16 {bf16:?}\nstep 2 rel. diff {second:.2e}");
    assert_eq!(bf16[0], f32_losses[0]);
    assert!(second < 2e-2 && second > 0.0, "step-2 loss {} in bf16, {} in f32", bf16[1], f32_losses[1]);
    // and it learns as f32 does
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    assert!((mean(&bf16[8..]) - mean(&f32_losses[8..])).abs() < 0.1 * mean(&f32_losses[8..]), "bf16 {bf16:?} vs f32 {f32_losses:?}");

    // checkpoints hold the f32 masters
    let ckpt = ditmoe::train::checkpoint::load_latest(&ditmoe::train::checkpoint::checkpoints_dir(&tmp.join("bf16")), &Device::Cpu).unwrap().0.unwrap();
    assert!(ckpt.model.values().all(|t| t.dtype() == DType::F32), "bf16 run saved non-f32 weights");

    // a bf16 run stopped and resumed takes the same steps as one straight run
    let first_half = run(config(&tmp, "split", 6, true), Precision::Bf16, RunStart::New);
    let second_half = run(config(&tmp, "split", 12, true), Precision::Bf16, RunStart::Resume);
    let straight = run(config(&tmp, "straight", 12, true), Precision::Bf16, RunStart::New);
    let split: Vec<u32> = first_half.iter().chain(&second_half).map(|v| v.to_bits()).collect();
    assert_eq!(split, straight.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "straight {straight:?} vs split {first_half:?} + {second_half:?}");
}
