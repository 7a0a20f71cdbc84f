//! The block ops' CPU path (the reference the GPU kernels are checked against in
//! `tests/gpu.rs`) against direct formulas, and the CUDA-graph wrapper's CPU behaviour.
use crate::common;

use candle_core::{DType, Device, IndexOp, Tensor, D};
use common::max_abs;
use ditmoe::model::kernels::block_ops as bo;
use ditmoe::runtime::graph::GraphedForward;

fn layer_norm_rows(x: &Tensor) -> Tensor {
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let c = x.broadcast_sub(&mean).unwrap();
    let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    c.broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap()).unwrap()
}

#[test]
fn ln_modulate_and_residual_match_the_official_formulas() {
    let dev = Device::Cpu;
    let (n, t, d) = (2, 5, 8);
    let x = Tensor::randn(0f32, 1.0, (n, t, d), &dev).unwrap();
    let y = Tensor::randn(0f32, 1.0, (n, t, d), &dev).unwrap();
    let mods = Tensor::randn(0f32, 1.0, (n, 6 * d), &dev).unwrap();
    let chunk = |c: usize| mods.narrow(1, c * d, d).unwrap().unsqueeze(1).unwrap();
    // modulate(norm(x), shift, scale) = norm(x) * (1 + scale) + shift
    let want = layer_norm_rows(&x).broadcast_mul(&(chunk(4) + 1.0).unwrap()).unwrap().broadcast_add(&chunk(3)).unwrap();
    let got = bo::ln_modulate(&x, &mods, 3, 4, DType::F32).unwrap();
    assert!(max_abs(&got, &want) < 1e-5, "ln_modulate off by {}", max_abs(&got, &want));
    assert_eq!(bo::ln_modulate(&x, &mods, 3, 4, DType::BF16).unwrap().dtype(), DType::BF16);
    // x + gate * y, and the fused residual + LayerNorm-modulate agrees with the two ops
    let mid = (&x + y.broadcast_mul(&chunk(2)).unwrap()).unwrap();
    assert!(max_abs(&bo::gated_residual(&x, &y, None, &mods, 2).unwrap(), &mid) < 1e-6);
    let (m2, h2) = bo::residual_ln_modulate(&x, &y, None, &mods, 2, 3, 4, DType::F32).unwrap();
    assert!(max_abs(&m2, &mid) < 1e-6);
    assert!(max_abs(&h2, &bo::ln_modulate(&mid, &mods, 3, 4, DType::F32).unwrap()) < 1e-6);
    // with the attention's output bias folded in: x + gate * (y + b)
    let b = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
    let mid_b = (&x + y.broadcast_add(&b).unwrap().broadcast_mul(&chunk(2)).unwrap()).unwrap();
    let (m3, h3) = bo::residual_ln_modulate(&x, &y, Some(&b), &mods, 2, 3, 4, DType::F32).unwrap();
    assert!(max_abs(&m3, &mid_b) < 1e-6, "residual with bias off by {}", max_abs(&m3, &mid_b));
    assert!(max_abs(&h3, &bo::ln_modulate(&mid_b, &mods, 3, 4, DType::F32).unwrap()) < 1e-6);
}

#[test]
fn attention_is_softmax_of_scaled_scores_times_v() {
    let dev = Device::Cpu;
    let (b, h, t, hd) = (2, 3, 7, 4);
    let q = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev).unwrap();
    let out = bo::attention(&q, &k, &v, 0.5).unwrap();
    assert_eq!(out.dims(), [b, t, h * hd]);
    // one (image, head, query) by hand
    let (bi, hi, ti) = (1, 2, 3);
    let s = (k.i((bi, hi)).unwrap().matmul(&q.i((bi, hi, ti)).unwrap().unsqueeze(1).unwrap()).unwrap().squeeze(1).unwrap() * 0.5).unwrap();
    let p = candle_nn::ops::softmax(&s, 0).unwrap();
    let want = p.unsqueeze(0).unwrap().matmul(&v.i((bi, hi)).unwrap()).unwrap().squeeze(0).unwrap();
    let got = out.i((bi, ti)).unwrap().narrow(0, hi * hd, hd).unwrap();
    assert!(max_abs(&got, &want) < 1e-5, "attention off by {}", max_abs(&got, &want));
}

#[test]
fn qkv_attention_ignores_the_k_bias_and_passes_the_v_bias_through() {
    // The GPU kernel reads the projection without its split pass and relies on these two
    // identities (softmax is shift-invariant per row; each row's weights sum to one): check
    // them on the composite that the kernel is compared with.
    let dev = Device::Cpu;
    let (b, t, heads, hd) = (2, 9, 3, 8);
    let d = heads * hd;
    let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * d), &dev).unwrap();
    let bias = Tensor::randn(0f32, 1.0, 3 * d, &dev).unwrap();
    let part = |i: usize| bias.narrow(0, i * d, d).unwrap();
    let zeros = Tensor::zeros(d, DType::F32, &dev).unwrap();
    let scale = 1.0 / (hd as f64).sqrt();
    let full = bo::qkv_attention(&qkv, Some(&bias), None, heads, scale).unwrap();
    assert_eq!(full.dims(), [b, t, d]);
    let (q, k, v) = bo::split_qkv(&qkv, Some(&bias), None, heads).unwrap();
    assert!(max_abs(&full, &bo::attention(&q, &k, &v, scale).unwrap()) < 1e-6);
    let no_k = Tensor::cat(&[part(0), zeros.clone(), part(2)], 0).unwrap();
    let got = bo::qkv_attention(&qkv, Some(&no_k), None, heads, scale).unwrap();
    assert!(max_abs(&got, &full) < 1e-5, "k bias changed the output by {}", max_abs(&got, &full));
    let no_v = Tensor::cat(&[part(0), part(1), zeros], 0).unwrap();
    let got = bo::qkv_attention(&qkv, Some(&no_v), None, heads, scale).unwrap().broadcast_add(&part(2)).unwrap();
    assert!(max_abs(&got, &full) < 1e-5, "v bias is not added to the output: off by {}", max_abs(&got, &full));
}

#[test]
fn split_qkv_adds_bias_splits_heads_and_rounds_normed_q_k_to_f16() {
    let dev = Device::Cpu;
    let (b, t, heads, hd) = (1, 3, 2, 4);
    let d = heads * hd;
    let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * d), &dev).unwrap();
    let bias = Tensor::randn(0f32, 1.0, 3 * d, &dev).unwrap();
    let (q, k, v) = bo::split_qkv(&qkv, Some(&bias), None, heads).unwrap();
    assert_eq!(q.dims(), [b, heads, t, hd]);
    // v of head 1 at token 2 = qkv[0, 2, 2D + hd .. 2D + 2hd] + bias
    let want = (qkv.i((0, 2)).unwrap().narrow(0, 2 * d + hd, hd).unwrap() + bias.narrow(0, 2 * d + hd, hd).unwrap()).unwrap();
    assert!(max_abs(&v.i((0, 1, 2)).unwrap(), &want) < 1e-6);
    let wk = (Tensor::ones(hd, DType::F32, &dev).unwrap(), Tensor::zeros(hd, DType::F32, &dev).unwrap());
    let norm = bo::QkNormWeights { q_weight: &wk.0, q_bias: &wk.1, k_weight: &wk.0, k_bias: &wk.1, eps: 1e-6 };
    let (qn, kn, vn) = bo::split_qkv(&qkv, Some(&bias), Some(norm), heads).unwrap();
    let rounded = qn.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(max_abs(&qn, &rounded), 0.0, "normed q is float16-representable");
    let q_raw = q.i((0, 0, 1)).unwrap();
    assert!(max_abs(&qn.i((0, 0, 1)).unwrap(), &layer_norm_rows(&q_raw.unsqueeze(0).unwrap()).squeeze(0).unwrap()) < 2e-3);
    assert!(max_abs(&kn.i((0, 1, 0)).unwrap(), &layer_norm_rows(&k.i((0, 1, 0)).unwrap().unsqueeze(0).unwrap()).squeeze(0).unwrap()) < 2e-3);
    assert_eq!(max_abs(&vn, &v), 0.0, "v is not normalised");
}

#[test]
fn contiguous_copies_views_and_softmax_scales_in_f32() {
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, 24.0, &dev).unwrap().reshape((2, 3, 4)).unwrap();
    let p = x.permute((2, 0, 1)).unwrap();
    let c = ditmoe::nn::ops::contiguous(&p).unwrap();
    assert!(c.is_contiguous());
    assert_eq!(c.to_vec3::<f32>().unwrap(), p.to_vec3::<f32>().unwrap());
    assert_eq!(ditmoe::nn::ops::broadcast_contiguous(&x.i(0).unwrap(), &[2, 3, 4]).unwrap().i(1).unwrap().to_vec2::<f32>().unwrap(), x.i(0).unwrap().to_vec2::<f32>().unwrap());
    let s = Tensor::new(&[[0f32, 1.0, 2.0]], &dev).unwrap();
    let got = bo::softmax_scaled(&s, 2.0).unwrap().to_vec2::<f32>().unwrap()[0].clone();
    let e: Vec<f32> = [0f32, 2.0, 4.0].iter().map(|v| v.exp()).collect();
    let sum: f32 = e.iter().sum();
    for (g, w) in got.iter().zip(e.iter().map(|v| v / sum)) {
        assert!((g - w).abs() < 1e-6);
    }
}

#[test]
fn graphed_forward_runs_eagerly_on_the_cpu() {
    let dev = Device::Cpu;
    let mut calls = 0;
    let mut g = GraphedForward::new(|ins: &[&Tensor]| {
        calls += 1;
        (ins[0] + ins[1])? * ins[2]
    });
    let a = Tensor::new(&[1f32, 2.0], &dev).unwrap();
    let b = Tensor::new(&[3f32, 4.0], &dev).unwrap();
    for scale in [1f32, 2.0, 3.0] {
        let c = Tensor::new(&[scale, scale], &dev).unwrap();
        assert_eq!(g.call(&[&a, &b, &c]).unwrap().to_vec1::<f32>().unwrap(), vec![4.0 * scale, 6.0 * scale]);
    }
    assert_eq!(g.replays(), 0);
    assert!(g.capture_error().is_none());
    drop(g);
    assert_eq!(calls, 3);
}

#[test]
fn median_ms_times_cpu_work() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (64, 64), &dev).unwrap();
    let mut n = 0;
    let ms = ditmoe::runtime::timing::median_ms(&dev, 5.0, || {
        n += 1;
        x.matmul(&x).map(drop)
    })
    .unwrap();
    assert!(ms.is_finite() && ms >= 0.0);
    assert!(n >= 3 + 5, "warm-up, estimate and at least 5 timed calls, got {n}");
}

/// The causal form: query i attends to keys 0..=i only, as attention over the first i + 1 keys.
#[test]
fn causal_attention_sees_only_earlier_keys() {
    let dev = Device::Cpu;
    let (b, h, t, hd) = (2, 3, 7, 4);
    let q = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev).unwrap();
    let out = bo::causal_attention(&q, &k, &v, 0.5).unwrap();
    for ti in [0, 3, 6] {
        let prefix = |x: &Tensor| x.narrow(2, 0, ti + 1).unwrap();
        let full = bo::attention(&q.narrow(2, ti, 1).unwrap(), &prefix(&k), &prefix(&v), 0.5).unwrap();
        let got = out.narrow(1, ti, 1).unwrap();
        assert!(max_abs(&got, &full) < 1e-6, "query {ti} off by {}", max_abs(&got, &full));
    }
}
