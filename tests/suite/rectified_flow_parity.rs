//! Parity of `ditmoe::diffusion::rectified_flow` with the official
//! `diffusion/rectified_flow.py::RectifiedFlow` on `tests/fixtures/rectified_flow/*`:
//! the training objective (`train_tiny` with learned sigma, `train_pixel` without) from the
//! recorded model outputs, and the Euler sampling loops (`sample` states and `sample_with_xps`
//! x-predictions) by replaying the recorded per-step model outputs through the velocity
//! closure, with classifier-free guidance done in the closure for `sample_tiny_cfg`.
//! Plus analytic checks of the Euler and Heun integrators.
use crate::common;

use std::cell::Cell;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{assert_close, load_fixture};
use ditmoe::diffusion::{sample_euler, sample_heun, FlowTimeGrid, RectifiedFlow};

/// One-shot maths (training objective).
const MATH_TOL: f64 = 1e-5;
/// Sampling loops (errors accumulate over the steps).
const LOOP_TOL: f64 = 1e-4;

fn check_train(case: &str, learn_sigma: bool) {
    let io = load_fixture(&format!("rectified_flow/train_{case}.safetensors"));
    let rf = RectifiedFlow::new(learn_sigma);
    let mut worst = (String::new(), 0.0f64);
    let mut note = |name: &str, ours: &Tensor, official: &Tensor| {
        let e = assert_close(&format!("train_{case}/{name}"), ours, official, MATH_TOL);
        if e > worst.1 || worst.0.is_empty() {
            worst = (name.to_string(), e);
        }
    };
    let mut fed = None;
    let out = rf
        .training_losses(&io["x"], &io["nt"], &io["z1"], |zt, t| {
            fed = Some((zt.clone(), t.clone()));
            Ok(io["model_out"].clone())
        })
        .unwrap();
    let (fed_zt, fed_t) = fed.expect("model called");
    assert_eq!(fed_t.dtype(), DType::F32, "the model is fed t as float32");
    note("model_t", &fed_t, &io["model_t"]);
    note("model input zt", &fed_zt, &io["zt"]);
    note("t", &out.t, &io["t"]);
    note("zt", &out.zt, &io["zt"]);
    note("target", &out.target, &io["target"]);
    note("vtheta", &out.vtheta, &io["vtheta"]);
    note("batchwise_mse", &out.batchwise_mse, &io["batchwise_mse"]);
    assert_eq!(out.loss.rank(), 0, "loss is a scalar");
    note("loss", &out.loss.reshape(1).unwrap(), &io["loss"]);
    println!("train_{case}: worst {} = {:.3e}", worst.0, worst.1);
}

#[test]
fn train_tiny_learned_sigma() {
    check_train("tiny", true);
}

#[test]
fn train_pixel() {
    check_train("pixel", false);
}

/// Replays `model_out_cond` (and `model_out_uncond` with CFG) step by step through the Euler
/// sampler on the official uniform grid and compares every state and x-prediction.
fn check_sample(case: &str, learn_sigma: bool, guided: bool) {
    let io = load_fixture(&format!("rectified_flow/sample_{case}.safetensors"));
    let rf = RectifiedFlow::new(learn_sigma);
    let steps = io["steps"].to_vec1::<i64>().unwrap()[0] as usize;
    let step_t = io["step_t"].to_vec1::<f32>().unwrap();
    let cfg = if guided {
        f64::from(io["cfg_scale"].to_vec1::<f32>().unwrap()[0])
    } else {
        0.0
    };
    let grid = FlowTimeGrid::uniform(steps).unwrap();
    let (z, states, xps) = (&io["z"], &io["states"], &io["xps"]);
    let calls = Cell::new(0usize);

    let out = sample_euler(z, &grid, |z_i, t| {
        let i = calls.get();
        calls.set(i + 1);
        // Official: t = i/steps for i = steps..1, as float32, not x1000.
        assert_eq!(t, step_t[i], "step {i}: model time");
        assert_close(
            &format!("{case} step {i} model input"),
            z_i,
            &states.i(i)?,
            LOOP_TOL,
        );
        let vc = rf.velocity(&io["model_out_cond"].i(i)?)?;
        if !guided {
            return Ok(vc);
        }
        // Guidance on all velocity channels, uncond from a separate forward (official).
        let vu = rf.velocity(&io["model_out_uncond"].i(i)?)?;
        vu.clone() + ((vc - vu)? * cfg)?
    })
    .unwrap();
    assert_eq!(calls.get(), steps, "one model call per Euler step");
    assert_eq!(out.states.len(), steps + 1);
    assert_eq!(out.x_preds.len(), steps);

    let mut worst = (String::new(), 0.0f64);
    for i in 0..=steps {
        let name = format!("states[{i}]");
        let e = assert_close(
            &format!("{case}/{name}"),
            &out.states[i],
            &states.i(i).unwrap(),
            LOOP_TOL,
        );
        if e > worst.1 || worst.0.is_empty() {
            worst = (name, e);
        }
    }
    // sample_with_xps returns [z, x-pred after step 1, ...].
    assert_close(&format!("{case}/xps[0]"), z, &xps.i(0).unwrap(), 0.0);
    for i in 1..=steps {
        let name = format!("xps[{i}]");
        let e = assert_close(
            &format!("{case}/{name}"),
            &out.x_preds[i - 1],
            &xps.i(i).unwrap(),
            LOOP_TOL,
        );
        if e > worst.1 {
            worst = (name, e);
        }
    }
    println!("sample_{case}: worst {} = {:.3e}", worst.0, worst.1);
}

#[test]
fn sample_pixel_euler() {
    check_sample("pixel", false, false);
}

#[test]
fn sample_tiny_cfg_euler() {
    check_sample("tiny_cfg", true, true);
}

// ---- Analytic checks of the integrators (f64 tensors) ----

/// z(1) and the fixed point x0 of the test field.
fn analytic_setup() -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let z1 = Tensor::new(&[[1.5f64, -0.7, 0.3], [2.0, 0.1, -1.2]], &dev).unwrap();
    let x0 = Tensor::new(&[[0.2f64, 0.4, -0.5], [-1.0, 0.0, 0.8]], &dev).unwrap();
    (z1, x0)
}

/// dz/dt = (1 + t)(z - x0): z(t) - x0 = (z(1) - x0) exp((t + t^2/2) - 3/2), so z(0) is known.
fn exact_z0(z1: &Tensor, x0: &Tensor) -> Tensor {
    ((z1 - x0).unwrap() * (-1.5f64).exp())
        .unwrap()
        .add(x0)
        .unwrap()
}

fn linear_field(x0: &Tensor) -> impl FnMut(&Tensor, f32) -> candle_core::Result<Tensor> + '_ {
    move |z, t| (z - x0)? * (1.0 + f64::from(t))
}

fn final_err(out: &ditmoe::diffusion::FlowSample, exact: &Tensor) -> f64 {
    common::rel_err(out.states.last().unwrap(), exact)
}

#[test]
fn heun_and_euler_converge_to_the_exact_solution() {
    let (z1, x0) = analytic_setup();
    let exact = exact_z0(&z1, &x0);
    let grid = FlowTimeGrid::uniform(1000).unwrap();
    let euler = sample_euler(&z1, &grid, linear_field(&x0)).unwrap();
    let heun = sample_heun(&z1, &grid, linear_field(&x0)).unwrap();
    let (e_euler, e_heun) = (final_err(&euler, &exact), final_err(&heun, &exact));
    let e_between = common::rel_err(euler.states.last().unwrap(), heun.states.last().unwrap());
    println!(
        "1000 steps: euler err {e_euler:.3e}, heun err {e_heun:.3e}, |euler-heun| {e_between:.3e}"
    );
    assert!(e_euler < 4e-3, "Euler with 1000 steps: {e_euler:e}");
    assert!(e_heun < 1e-5, "Heun with 1000 steps: {e_heun:e}");
    assert!(
        e_between < 4e-3,
        "Euler vs Heun with 1000 steps: {e_between:e}"
    );
}

#[test]
fn heun_beats_euler_at_few_steps_with_second_order_convergence() {
    let (z1, x0) = analytic_setup();
    let exact = exact_z0(&z1, &x0);
    let err = |steps: usize, heun: bool| {
        let grid = FlowTimeGrid::uniform(steps).unwrap();
        let out = if heun {
            sample_heun(&z1, &grid, linear_field(&x0)).unwrap()
        } else {
            sample_euler(&z1, &grid, linear_field(&x0)).unwrap()
        };
        final_err(&out, &exact)
    };
    let (euler4, heun4) = (err(4, false), err(4, true));
    println!("4 steps: euler err {euler4:.3e}, heun err {heun4:.3e}");
    assert!(
        euler4 > 1e-2,
        "Euler at 4 steps should be visibly off: {euler4:e}"
    );
    assert!(
        heun4 < euler4 / 3.0,
        "Heun ({heun4:e}) not clearly better than Euler ({euler4:e})"
    );
    // Halving the step: Euler error halves (1st order), Heun's quarters (2nd order, the final
    // Euler step contributes O(h^2) too).
    let euler_ratio = err(16, false) / err(32, false);
    let heun_ratio = err(16, true) / err(32, true);
    println!("error ratio 16->32 steps: euler {euler_ratio:.2}, heun {heun_ratio:.2}");
    assert!(
        (1.7..2.3).contains(&euler_ratio),
        "Euler order: ratio {euler_ratio}"
    );
    assert!(
        (3.4..4.6).contains(&heun_ratio),
        "Heun order: ratio {heun_ratio}"
    );
}

#[test]
fn heun_call_count_and_times() {
    let (z1, x0) = analytic_setup();
    let grid = FlowTimeGrid::uniform(5).unwrap();
    let mut seen = Vec::new();
    let out = sample_heun(&z1, &grid, |z, t| {
        seen.push(t);
        (z - &x0)? * (1.0 + f64::from(t))
    })
    .unwrap();
    // 2n - 1 evaluations: predictor at t_i, corrector at t_{i+1}, none at t = 0.
    assert_eq!(seen, vec![1.0, 0.8, 0.8, 0.6, 0.6, 0.4, 0.4, 0.2, 0.2]);
    assert_eq!(out.states.len(), 6);
    assert_eq!(out.x_preds.len(), 5);
}

/// On straight paths (velocity (z - x0)/t, singular at t = 0), Euler is exact and every
/// x-prediction is x0; Heun too, because its last step (ending at t = 0) is plain Euler and the
/// field is never evaluated at t = 0.
#[test]
fn straight_paths_are_integrated_exactly() {
    let (z1, x0) = analytic_setup();
    let grid = FlowTimeGrid::uniform(7).unwrap();
    let field = |z: &Tensor, t: f32| {
        assert!(t > 0.0, "field evaluated at t = 0");
        (z - &x0)? / f64::from(t)
    };
    for (name, out) in [
        ("euler", sample_euler(&z1, &grid, field).unwrap()),
        ("heun", sample_heun(&z1, &grid, field).unwrap()),
    ] {
        assert_close(
            &format!("{name} result"),
            out.states.last().unwrap(),
            &x0,
            1e-6,
        );
        for (i, xp) in out.x_preds.iter().enumerate() {
            assert_close(&format!("{name} x_pred[{i}]"), xp, &x0, 1e-6);
        }
    }
}

/// The grid and the model-time mapping are parameters: a flow-matching style grid with
/// `timestep = sigma * 1000` feeds the closure scaled times and steps by the sigma differences.
#[test]
fn custom_grid_and_model_time_scale() {
    let sigmas = vec![1.0, 0.75, 0.3, 0.0];
    let grid = FlowTimeGrid::new(sigmas.clone(), 1000.0).unwrap();
    assert_eq!(grid.steps(), 3);
    let z = Tensor::new(&[2.0f64, -4.0], &Device::Cpu).unwrap();
    let mut seen = Vec::new();
    let out = sample_euler(&z, &grid, |z, t| {
        seen.push(t);
        z.ones_like()
    })
    .unwrap();
    assert_eq!(seen, vec![1000.0, 750.0, 300.0]);
    // Constant velocity 1: z decreases by the total time span 1.0.
    let last = out.states.last().unwrap().to_vec1::<f64>().unwrap();
    assert!(
        (last[0] - 1.0).abs() < 1e-12 && (last[1] + 5.0).abs() < 1e-12,
        "{last:?}"
    );

    assert!(FlowTimeGrid::new(vec![1.0], 1.0).is_err());
    assert!(FlowTimeGrid::new(vec![0.0, 1.0], 1.0).is_err());
    assert!(FlowTimeGrid::new(vec![1.0, 0.5, 0.5], 1.0).is_err());
    assert!(FlowTimeGrid::new(vec![1.0, f64::NAN], 1.0).is_err());
    assert!(FlowTimeGrid::uniform(0).is_err());
    // A velocity that still carries the learned-sigma channels is rejected.
    let bad = sample_euler(&z, &FlowTimeGrid::uniform(2).unwrap(), |z, _| {
        Tensor::cat(&[z, z], 0)
    });
    assert!(bad.is_err());
}
