//! The optimizer of a bf16 plan reads the bf16 gradients as they are and writes the model's
//! bf16 weights in its own pass: on the CPU reference it must give the bits of the f32 path it
//! replaces (each gradient converted to f32, the f32 update, the masters cast to bf16), and the
//! global gradient norm of bf16 gradients must be summed in f32. A trainer of single
//! micro-batches (the path that keeps its gradients in bf16) learns as the f32 one does.
use crate::common;

use candle_core::{DType, Device, Tensor, Var};
use common::train::scratch_training_folder;
use ditmoe::train::adamw::{AdamW, AdamWParams};
use ditmoe::train::kernels::foreach::sum_of_squares;
use ditmoe::train::{RunStart, TrainConfig, Trainer};
use ditmoe::{ExecutionPlan, Precision};
use std::path::Path;

/// Deterministic values in [-scale, scale) of `n` elements, a function of `seed`.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn bits_f32(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn bits_bf16(t: &Tensor) -> Vec<u16> {
    t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Shapes of awkward sizes: empty, one element, a matrix, across 4096-element chunks.
const SHAPES: [&[usize]; 6] = [&[0], &[1], &[3, 7], &[4097], &[64, 130], &[5]];

fn masters() -> Vec<(String, Var)> {
    SHAPES.iter().enumerate().map(|(i, s)| (format!("p{i}"), Var::from_vec(values(s.iter().product(), 100 + i as u64, 0.5), *s, &Device::Cpu).unwrap())).collect()
}

/// bf16 gradients for step `step` (wide values, so the clipped and unclipped steps differ).
fn bf16_grads(step: u64) -> Vec<Tensor> {
    SHAPES.iter().enumerate().map(|(i, s)| Tensor::from_vec(values(s.iter().product(), 1000 * step + i as u64, 3.0), *s, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap()).collect()
}

#[test]
fn bf16_gradient_update_gives_the_bits_of_the_f32_path() {
    let params = AdamWParams { weight_decay: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    // the bf16 path: the optimizer reads bf16 gradients and writes the bf16 model copies
    let mixed = masters();
    let copies: Vec<Var> = mixed.iter().map(|(_, v)| Var::from_tensor(&v.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap()).collect();
    let before: Vec<Vec<u16>> = copies.iter().map(|c| bits_bf16(c.as_tensor())).collect();
    let mut opt = AdamW::new(mixed.clone(), params).unwrap().with_model_copies(copies.clone()).unwrap();
    // the f32 path it replaces: gradients converted to f32 first, masters cast after
    let plain = masters();
    let mut reference = AdamW::new(plain.clone(), params).unwrap();
    // step 2 is clipped: the scale must be applied to the widened gradient, not in bf16
    for (step, scale) in [(1, None), (2, Some(0.37)), (3, None)] {
        let g = bf16_grads(step);
        let g32 = g.iter().map(|g| g.to_dtype(DType::F32).unwrap()).collect();
        opt.step(g, 1e-2, scale).unwrap();
        reference.step(g32, 1e-2, scale).unwrap();
    }
    for (i, ((name, a), (_, b))) in mixed.iter().zip(&plain).enumerate() {
        assert_eq!(bits_f32(a.as_tensor()), bits_f32(b.as_tensor()), "{name}: f32 master");
        let cast = b.as_tensor().to_dtype(DType::BF16).unwrap();
        assert_eq!(bits_bf16(copies[i].as_tensor()), bits_bf16(&cast), "{name}: bf16 model copy");
        if a.elem_count() > 0 {
            assert_ne!(bits_bf16(copies[i].as_tensor()), before[i], "{name}: the model copy was not written");
        }
    }
    let (sa, sb) = (opt.state_tensors(), reference.state_tensors());
    assert_eq!(sa.len(), 2 * SHAPES.len());
    for ((name, a), (_, b)) in sa.iter().zip(&sb) {
        assert_eq!(a.dtype(), DType::F32, "{name}");
        assert_eq!(bits_f32(a), bits_f32(b), "{name}: AdamW moment");
    }
    assert_eq!(opt.step_count(), 3);
}

#[test]
fn model_copies_must_match_the_parameters() {
    let params = AdamWParams { weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    let vars = masters();
    let short: Vec<Var> = vars[1..].iter().map(|(_, v)| v.clone()).collect();
    assert!(AdamW::new(vars.clone(), params).unwrap().with_model_copies(short).is_err());
    let mut swapped: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    swapped.swap(2, 3);
    assert!(AdamW::new(vars, params).unwrap().with_model_copies(swapped).is_err());
}

#[test]
fn gradient_norm_of_bf16_gradients_is_summed_in_f32() {
    let g = bf16_grads(7);
    let g32: Vec<Tensor> = g.iter().map(|g| g.to_dtype(DType::F32).unwrap()).collect();
    assert_eq!(sum_of_squares(&g).unwrap().to_bits(), sum_of_squares(&g32).unwrap().to_bits());
    // 4097 ones: 4097 in f32; a bf16 sum (8 significant bits) would stop at 4096
    let ones = Tensor::ones(4097, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(sum_of_squares(&[ones]).unwrap(), 4097.0);
}

/// Global batch = micro-batch: one micro-batch a step, so a bf16 plan's gradients stay bf16.
fn config(root: &Path, out: &str, steps: u64) -> TrainConfig {
    serde_json::from_value(serde_json::json!({
        "model": root.join("model.json"), "data": root.join("data"), "out": root.join(out),
        "objective": "rf", "image_size": 6, "global_batch": 6, "micro_batch": 6, "steps": steps, "lr": 1e-3,
        "max_grad_norm": 1.0, "ema_decay": 0.9, "seed": 5, "log_every": 1, "ckpt_every": 4, "num_workers": 0,
    }))
    .unwrap()
}

fn losses(cfg: TrainConfig, precision: Precision, start: RunStart) -> Vec<f32> {
    let mut t = Trainer::new(cfg, &ExecutionPlan::training(&Device::Cpu, precision), start).unwrap();
    t.run(false).unwrap().steps.iter().map(|s| s.loss).collect()
}

#[test]
fn bf16_gradient_training_follows_f32_and_resumes_exactly() {
    let tmp = scratch_training_folder("train-bf16-gradients");
    let f32_losses = losses(config(&tmp, "f32", 10), Precision::F32, RunStart::New);
    let bf16 = losses(config(&tmp, "bf16", 10), Precision::Bf16, RunStart::New);
    println!("losses f32 {f32_losses:?}\nlosses bf16 {bf16:?}");
    // step 1: the official init zeroes the final layer, so the output is 0 in both. Later
    // steps run on the bf16 weights the update wrote: within 1e-3 of f32 at every step here
    // (about 6e-5 measured on the CPU), where bf16 weights left at their initial values are
    // 1.4% off at step 2 already
    assert_eq!(bf16[0], f32_losses[0]);
    for (i, (a, b)) in f32_losses.iter().zip(&bf16).enumerate().skip(1) {
        assert!((a - b).abs() <= 1e-3 * a.abs(), "step {}: loss {b} in bf16, {a} in f32", i + 1);
    }
    assert_ne!(bf16[1], f32_losses[1], "the bf16 run took the f32 path");
    // resuming restores the masters and refreshes the bf16 weights from them
    let first_half = losses(config(&tmp, "split", 5), Precision::Bf16, RunStart::New);
    let second_half = losses(config(&tmp, "split", 10), Precision::Bf16, RunStart::Resume);
    let split: Vec<u32> = first_half.iter().chain(&second_half).map(|v| v.to_bits()).collect();
    assert_eq!(split, bf16.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "straight {bf16:?} vs split {first_half:?} + {second_half:?}");
}
