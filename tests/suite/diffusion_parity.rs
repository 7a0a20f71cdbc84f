//! Parity of `ditmoe::diffusion` (Gaussian diffusion) with the official DiT-MoE code
//! (`diffusion/gaussian_diffusion.py`, `respace.py`, `create_diffusion`), on the fixtures
//! `tests/fixtures/diffusion/*.safetensors`: every schedule array (f64), the respacing
//! (`use_timesteps`, `timestep_map`), q_sample, p_mean_variance, p_sample, ddim_sample and
//! training_losses for each respacing, and the FIXED_LARGE variant.
use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use common::{assert_close, load_fixture};
use ditmoe::diffusion::{space_timesteps, GaussianDiffusion, VarianceType};

/// f32 maths against f32 official results (max-norm relative error).
const F32_TOL: f64 = 1e-5;
/// f64 schedule arrays, per element.
const F64_TOL: f64 = 1e-12;

const SCHEDULE_KEYS: [&str; 14] = [
    "alphas_cumprod",
    "alphas_cumprod_next",
    "alphas_cumprod_prev",
    "betas",
    "log_betas",
    "log_one_minus_alphas_cumprod",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_variance",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
];

fn i64s(t: &Tensor) -> Vec<i64> {
    t.to_vec1::<i64>().unwrap()
}

fn usizes(t: &Tensor) -> Vec<usize> {
    i64s(t)
        .into_iter()
        .map(|v| usize::try_from(v).unwrap())
        .collect()
}

/// Largest per-element relative error `|a - b| / |b|` (0 where both are 0); fails above `tol`.
fn assert_f64_close(name: &str, ours: &[f64], reference: &Tensor, tol: f64) -> f64 {
    assert_eq!(reference.dtype(), DType::F64, "{name}: fixture is not f64");
    let reference = reference.to_vec1::<f64>().unwrap();
    assert_eq!(ours.len(), reference.len(), "{name}: length");
    let mut worst = 0.0f64;
    for (i, (&a, &b)) in ours.iter().zip(&reference).enumerate() {
        let e = if a == b {
            0.0
        } else {
            (a - b).abs() / b.abs().max(1e-300)
        };
        assert!(
            e <= tol,
            "{name}[{i}]: ours {a:e} official {b:e} (rel {e:.3e})"
        );
        worst = worst.max(e);
    }
    worst
}

fn schedule_array<'a>(d: &'a GaussianDiffusion, key: &str) -> &'a [f64] {
    let s = d.schedule();
    match key {
        "alphas_cumprod" => &s.alphas_cumprod,
        "alphas_cumprod_next" => &s.alphas_cumprod_next,
        "alphas_cumprod_prev" => &s.alphas_cumprod_prev,
        "betas" => &s.betas,
        "log_betas" => &s.log_betas,
        "log_one_minus_alphas_cumprod" => &s.log_one_minus_alphas_cumprod,
        "posterior_log_variance_clipped" => &s.posterior_log_variance_clipped,
        "posterior_mean_coef1" => &s.posterior_mean_coef1,
        "posterior_mean_coef2" => &s.posterior_mean_coef2,
        "posterior_variance" => &s.posterior_variance,
        "sqrt_alphas_cumprod" => &s.sqrt_alphas_cumprod,
        "sqrt_one_minus_alphas_cumprod" => &s.sqrt_one_minus_alphas_cumprod,
        "sqrt_recip_alphas_cumprod" => &s.sqrt_recip_alphas_cumprod,
        "sqrt_recipm1_alphas_cumprod" => &s.sqrt_recipm1_alphas_cumprod,
        other => panic!("unknown schedule key {other}"),
    }
}

/// Tracks the largest error of a fixture for the report line.
#[derive(Default)]
struct Worst {
    f32: (String, f64),
    f64: (String, f64),
}

impl Worst {
    fn f32(&mut self, name: &str, ours: &Tensor, io: &HashMap<String, Tensor>) {
        let e = assert_close(name, ours, &io[name], F32_TOL);
        if e > self.f32.1 || self.f32.0.is_empty() {
            self.f32 = (name.to_string(), e);
        }
    }
    fn f64(&mut self, name: &str, e: f64) {
        if e > self.f64.1 || self.f64.0.is_empty() {
            self.f64 = (name.to_string(), e);
        }
    }
}

fn check_respacing(file: &str, respacing: &str) {
    let io = load_fixture(&format!("diffusion/{file}.safetensors"));
    let d = GaussianDiffusion::create(respacing, true).unwrap();
    assert_eq!(d.var_type(), VarianceType::LearnedRange);
    assert_eq!(d.original_num_steps(), 1000);
    let mut worst = Worst::default();

    // Respacing: kept steps and the respaced -> original map, exact.
    let use_ts = space_timesteps(1000, respacing).unwrap();
    assert_eq!(
        use_ts,
        usizes(&io["use_timesteps_sorted"]),
        "{file}: use_timesteps"
    );
    assert_eq!(
        d.timestep_map(),
        usizes(&io["timestep_map"]).as_slice(),
        "{file}: timestep_map"
    );
    assert_eq!(d.num_timesteps(), use_ts.len());

    // Schedule arrays, f64.
    for key in SCHEDULE_KEYS {
        let name = format!("schedule.{key}");
        let e = assert_f64_close(
            &format!("{file}/{name}"),
            schedule_array(&d, key),
            &io[&name],
            F64_TOL,
        );
        worst.f64(&name, e);
    }

    let t = usizes(&io["t"]);
    assert_eq!(
        d.model_timesteps(&t).unwrap(),
        i64s(&io["model_t"]),
        "{file}: model_t"
    );
    let (x_start, x_t, noise, step_noise, model_output) = (
        &io["x_start"],
        &io["x_t"],
        &io["noise"],
        &io["step_noise"],
        &io["model_output"],
    );

    worst.f32("q_sample", &d.q_sample(x_start, &t, noise).unwrap(), &io);

    let pmv = d.p_mean_variance(model_output, x_t, &t, false).unwrap();
    worst.f32("p_mean_variance.mean", &pmv.mean, &io);
    worst.f32("p_mean_variance.variance", &pmv.variance, &io);
    worst.f32("p_mean_variance.log_variance", &pmv.log_variance, &io);
    worst.f32("p_mean_variance.pred_xstart", &pmv.pred_xstart, &io);

    for (clip, tag) in [(false, "clip_false"), (true, "clip_true")] {
        let out = d.p_sample(model_output, x_t, &t, step_noise, clip).unwrap();
        worst.f32(&format!("p_sample.{tag}.sample"), &out.sample, &io);
        worst.f32(
            &format!("p_sample.{tag}.pred_xstart"),
            &out.pred_xstart,
            &io,
        );
    }

    for (eta, tag) in [(0.0, "eta_0.0"), (0.5, "eta_0.5")] {
        let out = d
            .ddim_sample(model_output, x_t, &t, Some(step_noise), false, eta)
            .unwrap();
        worst.f32(&format!("ddim_sample.{tag}.sample"), &out.sample, &io);
        worst.f32(
            &format!("ddim_sample.{tag}.pred_xstart"),
            &out.pred_xstart,
            &io,
        );
    }
    // eta = 0 is deterministic: no noise needed, same result.
    let out = d
        .ddim_sample(model_output, x_t, &t, None, false, 0.0)
        .unwrap();
    worst.f32("ddim_sample.eta_0.0.sample", &out.sample, &io);
    assert!(d
        .ddim_sample(model_output, x_t, &t, None, false, 0.5)
        .is_err());
    let out = d
        .ddim_sample(model_output, x_t, &t, Some(step_noise), true, 0.0)
        .unwrap();
    worst.f32("ddim_sample.eta_0.0.clip_true.sample", &out.sample, &io);

    let mut seen_model_t = None;
    let losses = d
        .training_losses(x_start, &t, noise, |x_t_in, model_t| {
            // The model sees q_sample(x_start, t, noise) and the original timesteps.
            assert_close("training x_t", x_t_in, &io["q_sample"], F32_TOL);
            seen_model_t = Some(model_t.to_vec());
            Ok(model_output.clone())
        })
        .unwrap();
    assert_eq!(
        seen_model_t.unwrap(),
        i64s(&io["training_losses.model_t"]),
        "{file}: training model_t"
    );
    worst.f32("training_losses.mse", &losses.mse, &io);
    worst.f32(
        "training_losses.vb",
        losses.vb.as_ref().expect("learned sigma has a vb term"),
        &io,
    );
    worst.f32("training_losses.loss", &losses.loss, &io);

    let f64_note = if worst.f64.1 == 0.0 {
        "all 14 schedule arrays bit-identical".to_string()
    } else {
        format!("worst f64 {} = {:.3e}", worst.f64.0, worst.f64.1)
    };
    println!(
        "{file}: worst f32 {} = {:.3e}; {f64_note}",
        worst.f32.0, worst.f32.1
    );
}

#[test]
fn respace_full() {
    check_respacing("respace_full", "");
}

#[test]
fn respace_250() {
    check_respacing("respace_250", "250");
}

#[test]
fn respace_25() {
    check_respacing("respace_25", "25");
}

#[test]
fn respace_ddim50() {
    check_respacing("respace_ddim50", "ddim50");
}

#[test]
fn respace_10_20_30() {
    check_respacing("respace_10-20-30", "10,20,30");
}

#[test]
fn fixed_large() {
    let io = load_fixture("diffusion/fixed_large.safetensors");
    let d = GaussianDiffusion::create("", false).unwrap();
    assert_eq!(d.var_type(), VarianceType::FixedLarge);
    let mut worst = Worst::default();
    let t = usizes(&io["t"]);
    let (x_start, x_t, model_output) = (&io["x_start"], &io["x_t"], &io["model_output"]);

    let pmv = d.p_mean_variance(model_output, x_t, &t, false).unwrap();
    worst.f32("p_mean_variance.mean", &pmv.mean, &io);
    worst.f32("p_mean_variance.variance", &pmv.variance, &io);
    worst.f32("p_mean_variance.log_variance", &pmv.log_variance, &io);
    worst.f32("p_mean_variance.pred_xstart", &pmv.pred_xstart, &io);

    let out = d
        .p_sample(model_output, x_t, &t, &io["step_noise"], false)
        .unwrap();
    worst.f32("p_sample.clip_false.sample", &out.sample, &io);
    worst.f32("p_sample.clip_false.pred_xstart", &out.pred_xstart, &io);

    let losses = d
        .training_losses(x_start, &t, &io["noise"], |_, _| Ok(model_output.clone()))
        .unwrap();
    assert!(losses.vb.is_none(), "fixed variance has no vb term");
    worst.f32("training_losses.mse", &losses.mse, &io);
    worst.f32("training_losses.loss", &losses.loss, &io);
    println!(
        "fixed_large: worst f32 {} = {:.3e}",
        worst.f32.0, worst.f32.1
    );

    // A learned-sigma (2C) output is rejected for FIXED_LARGE.
    let doubled = Tensor::cat(&[model_output, model_output], 1).unwrap();
    assert!(d.p_mean_variance(&doubled, x_t, &t, false).is_err());
}

/// Further `space_timesteps` cases, expected lists computed with the official function.
#[test]
fn space_timesteps_official_cases() {
    let cases: [(usize, &str, Vec<usize>); 6] = [
        (
            300,
            "10,15,20",
            vec![
                0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 100, 107, 114, 121, 128, 135, 142, 149, 157,
                164, 171, 178, 185, 192, 199, 200, 205, 210, 216, 221, 226, 231, 236, 242, 247,
                252, 257, 263, 268, 273, 278, 283, 289, 294, 299,
            ],
        ),
        (1000, "ddim7", vec![0, 143, 286, 429, 572, 715, 858]),
        (100, "7,3", vec![0, 8, 16, 24, 33, 41, 49, 50, 74, 99]),
        (1000, "1", vec![0]),
        // A zero-count section is allowed as long as some steps remain.
        (10, "3,0,2", vec![0, 2, 3, 7, 9]),
        // 41.625 * 4 = 166.5 rounds to even (Python round), not 167.
        (
            1000,
            " 25 ",
            vec![
                0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666,
                708, 749, 791, 832, 874, 916, 957, 999,
            ],
        ),
    ];
    for (n, spec, expected) in cases {
        assert_eq!(
            space_timesteps(n, spec).unwrap(),
            expected,
            "space_timesteps({n}, {spec:?})"
        );
    }
    assert_eq!(
        space_timesteps(1000, "").unwrap(),
        (0..1000).collect::<Vec<_>>()
    );
}

#[test]
fn space_timesteps_rejects_invalid_strings() {
    for spec in [
        "ddim999", // no integer stride gives 999 steps
        "ddim1", "ddim0", "ddim", "ddimx", "1001",   // more steps than the schedule
        "10,501", // second section has 500 steps
        "0", "0,0", // zero steps
        "abc", "10,,20", "-5", "2.5", "25;50",
    ] {
        let err = space_timesteps(1000, spec).expect_err(spec).to_string();
        assert!(
            err.contains(&format!("{spec:?}")),
            "error for {spec:?} does not name it: {err}"
        );
    }
    assert!(GaussianDiffusion::create("ddim999", true).is_err());
}

#[test]
fn timestep_errors_are_reported() {
    let d = GaussianDiffusion::create("25", true).unwrap();
    assert!(d.model_timesteps(&[25]).is_err());
    let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(d.q_sample(&x, &[25], &x).is_err());
    // Batch size and timestep count must agree.
    assert!(d.q_sample(&x, &[1, 2], &x).is_err());
}

/// The VB term trains only the variance channels: its gradient with respect to the eps half of
/// the model output is exactly zero (official `frozen_out = cat[eps.detach(), v]`), while the
/// MSE term's gradient reaches the eps half only.
#[test]
fn vb_term_does_not_train_the_mean() {
    let io = load_fixture("diffusion/respace_250.safetensors");
    let d = GaussianDiffusion::create("250", true).unwrap();
    let t = usizes(&io["t"]);
    let out = candle_core::Var::from_tensor(&io["model_output"]).unwrap();
    let losses = d
        .training_losses(&io["x_start"], &t, &io["noise"], |_, _| {
            Ok(out.as_tensor().clone())
        })
        .unwrap();
    let abs_sum = |g: &Tensor| {
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let c = io["x_start"].dim(1).unwrap();

    let grads = losses.vb.unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(&out).expect("vb reaches the model output");
    assert_eq!(
        abs_sum(&g.narrow(1, 0, c).unwrap()),
        0.0,
        "vb gradient leaks into eps"
    );
    assert!(
        abs_sum(&g.narrow(1, c, c).unwrap()) > 0.0,
        "vb gradient misses the variance half"
    );

    let grads = losses.mse.sum_all().unwrap().backward().unwrap();
    let g = grads.get(&out).expect("mse reaches the model output");
    assert!(abs_sum(&g.narrow(1, 0, c).unwrap()) > 0.0);
    assert_eq!(abs_sum(&g.narrow(1, c, c).unwrap()), 0.0);
}
