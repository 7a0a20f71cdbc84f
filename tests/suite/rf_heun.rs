//! `rf-heun` and `rf-euler` (`ditmoe::diffusion::{sample_heun, sample_euler}` on the grids
//! `RectifiedFlowSampler::for_model` builds) against diffusers' own
//! `FlowMatchHeunDiscreteScheduler` and `FlowMatchEulerDiscreteScheduler`:
//! `tests/fixtures/rf_heun/{heun,euler}_{diffusers,uniform}_{10,20}.safetensors`, made by
//! `scripts/make_rf_heun_fixture.py` with diffusers 0.35.2, record every model evaluation (the
//! sample and timestep given to the model, its output, what `scheduler.step` returned) of the
//! scheduler driven by a fixed analytic velocity field, which this test recomputes.
//!
//! The ODE is the same on both sides (`x = (1 - sigma) x0 + sigma noise`, velocity
//! `noise - x0`, sigma = our t from 1 to 0); diffusers feeds the model `sigma * 1000` where
//! DiT-MoE feeds t, and diffusers' own `set_timesteps(n)` grid is `linspace(1, 0.001, n)` then 0
//! where DiT-MoE's is `i / n`. So each scheduler is compared on both grids
//! (`tests/fixtures/rf_heun/README.md`):
//! - `diffusers`: our integrator on the recorded sigmas, fed `sigma * 1000`;
//! - `uniform` (the scheduler's `step` on DiT-MoE's grid): the sampler `generate` builds for a
//!   DiT-MoE model (fed t) and for a ProMoE model (fed `sigma * 1000`, diffusers' exact
//!   timesteps).
//!
//! Every model evaluation must see diffusers' sample and time, and every finished step must
//! land on diffusers' state: the whole run is closed loop (our own trajectory, the analytic
//! model evaluated on it), so errors accumulate over the steps as they would in use.
use crate::common;

use std::cell::RefCell;

use candle_core::{IndexOp, Tensor};
use common::{load_fixture, rel_err};
use ditmoe::config::DitConfig;
use ditmoe::diffusion::{sample_euler, sample_heun, FlowSample, FlowTimeGrid};
use ditmoe::sampling::{RectifiedFlowSampler, SamplerKind};

/// Max-norm relative error allowed on every evaluation input, model output and state (f32).
/// The worst seen is 2.3e-6 (Heun on diffusers' grid, at sigma 0.001): diffusers' own f32
/// round-off, whose states lie that far from the same recursion in f64, where ours lie
/// within 3e-7 of it on the uniform grid.
const TOL: f64 = 1e-5;

/// The fixture's velocity field (scripts/make_rf_heun_fixture.py), in f32 as torch computes it,
/// of the sample and `s` = sigma:
/// `(s - 0.25 (1 - s)) / (0.25 (1 - s)^2 + s^2) x + 0.1 sin(3 x + s)`.
fn fixture_velocity(x: &Tensor, s: f32) -> Tensor {
    let one_minus = 1.0 - s;
    let gain = (s - 0.25 * one_minus) / (0.25 * one_minus * one_minus + s * s);
    let linear = (x * f64::from(gain)).unwrap();
    let wiggle = (x.affine(3.0, f64::from(s)).unwrap().sin().unwrap() * 0.1).unwrap();
    (linear + wiggle).unwrap()
}

fn dit_config(promoe: bool) -> DitConfig {
    let extra = if promoe { r#", "promoe": {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 48}"# } else { "" };
    let json = format!(
        r#"{{"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2,
            "num_heads": 2, "mlp_ratio": 4, "class_dropout_prob": 0.1, "num_classes": 10, "num_experts": 4,
            "num_experts_per_tok": 2, "learn_sigma": false{extra}}}"#
    );
    DitConfig::from_json_str(&json, "rf_heun test model").unwrap()
}

#[derive(Default, Debug, Clone, Copy)]
struct Worst {
    eval_input: f64,
    model_output: f64,
    state: f64,
    state_step: usize,
    time: f64,
}

impl std::fmt::Display for Worst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "evaluation inputs {:.2e}, model outputs {:.2e}, states {:.2e} (worst at step {}), model time {:.1e}",
            self.eval_input, self.model_output, self.state, self.state_step, self.time
        )
    }
}

/// Runs our integrator on `grid` from the fixture's `x_T` with the analytic field, checking
/// each evaluation against diffusers' (`sigma_of(model_time)` turns the time our sampler feeds
/// into sigma; `time_of(timestep)` diffusers' recorded timestep into our model time) and each
/// state after it.
fn replay(file: &str, heun: bool, grid: &FlowTimeGrid, time_of: impl Fn(f32) -> f32, sigma_of: impl Fn(f32) -> f32) -> Worst {
    let io = load_fixture(&format!("rf_heun/{file}.safetensors"));
    let steps = grid.steps();
    let evals = if heun { 2 * steps - 1 } else { steps };
    let timesteps = io["timesteps"].to_vec1::<f32>().unwrap();
    assert_eq!(timesteps.len(), evals, "{file}: evaluations");

    // The grid itself: diffusers' sigmas, each once.
    let sigmas = io["sigmas"].to_vec1::<f32>().unwrap();
    assert_eq!(sigmas.len(), steps + 1, "{file}: grid length");
    let grid_err = grid.times().iter().zip(&sigmas).map(|(a, &b)| (a - f64::from(b)).abs()).fold(0.0, f64::max);
    assert!(grid_err <= 1e-7, "{file}: grid differs from diffusers' sigmas by {grid_err:.2e}: {:?} vs {sigmas:?}", grid.times());

    let (eval_sample, model_output, states) = (&io["eval_sample"], &io["model_output"], &io["states"]);
    let worst = RefCell::new(Worst::default());
    let mut e = 0;
    let velocity = |x: &Tensor, t: f32| -> candle_core::Result<Tensor> {
        assert!(e < evals, "{file}: more than diffusers' {evals} evaluations");
        let want_t = time_of(timesteps[e]);
        let dt = f64::from((t - want_t).abs() / want_t.abs().max(1e-6));
        assert!(dt <= 1e-6, "{file}: evaluation {e}: model time {t} where diffusers feeds {} ({want_t})", timesteps[e]);
        let ein = rel_err(x, &eval_sample.i(e).unwrap());
        assert!(ein <= TOL, "{file}: evaluation {e} (timestep {}): input sample relative error {ein:.3e} > {TOL:.0e}", timesteps[e]);
        let v = fixture_velocity(x, sigma_of(t));
        let eout = rel_err(&v, &model_output.i(e).unwrap());
        assert!(eout <= TOL, "{file}: evaluation {e}: model output relative error {eout:.3e} > {TOL:.0e}");
        let mut w = worst.borrow_mut();
        w.eval_input = w.eval_input.max(ein);
        w.model_output = w.model_output.max(eout);
        w.time = w.time.max(dt);
        e += 1;
        Ok(v)
    };
    let run: FlowSample = if heun { sample_heun(&io["x_T"], grid, velocity) } else { sample_euler(&io["x_T"], grid, velocity) }.unwrap();
    assert_eq!(e, evals, "{file}: model evaluations");
    assert_eq!(run.states.len(), steps + 1);
    let mut w = worst.into_inner();
    for (k, ours) in run.states.iter().enumerate() {
        let err = rel_err(ours, &states.i(k).unwrap());
        assert!(err <= TOL, "{file}: state after step {k} (sigma {}): relative error {err:.3e} > {TOL:.0e}", sigmas[k]);
        if err >= w.state {
            (w.state, w.state_step) = (err, k);
        }
    }
    // diffusers' own step outputs chain: each is the next evaluation's sample.
    let step_out = &io["step_out"];
    for k in 0..evals - 1 {
        assert_eq!(rel_err(&step_out.i(k).unwrap(), &eval_sample.i(k + 1).unwrap()), 0.0, "{file}: step_out[{k}] is eval_sample[{}]", k + 1);
    }
    assert_eq!(rel_err(&step_out.i(evals - 1).unwrap(), &states.i(steps).unwrap()), 0.0, "{file}: the last step_out is the result");
    w
}

/// Our integrator on diffusers' own `set_timesteps(n)` grid, fed `sigma * 1000` as diffusers does.
fn diffusers_grid(kind: &str, steps: usize) {
    let file = format!("{kind}_diffusers_{steps}");
    let io = load_fixture(&format!("rf_heun/{file}.safetensors"));
    let sigmas: Vec<f64> = io["sigmas"].to_vec1::<f32>().unwrap().iter().map(|&s| f64::from(s)).collect();
    assert!((sigmas[steps - 1] - 0.001).abs() < 1e-9, "{file}: diffusers' last nonzero sigma is 1/1000, got {}", sigmas[steps - 1]);
    let grid = FlowTimeGrid::new(sigmas, 1000.0).unwrap();
    let w = replay(&file, kind == "heun", &grid, |t| t, |t| t / 1000.0);
    println!("{file}: {w}");
}

/// The uniform grid the samplers use: a DiT-MoE model fed t, a ProMoE model fed `sigma * 1000`.
fn uniform_grid(kind: &str, steps: usize) {
    let file = format!("{kind}_uniform_{steps}");
    let heun = kind == "heun";
    let name = if heun { "rf-heun" } else { "rf-euler" };
    let sampler_kind: SamplerKind = name.parse().unwrap();
    for promoe in [false, true] {
        let cfg = dit_config(promoe);
        let sampler = RectifiedFlowSampler::for_model(&cfg, steps, heun).unwrap();
        assert_eq!(sampler.evaluations(), if heun { 2 * steps - 1 } else { steps });
        // `generate --sampler rf-heun/rf-euler` builds the same.
        let built = sampler_kind.build(steps, &cfg, false).unwrap();
        assert_eq!((built.steps(), built.evaluations()), (sampler.steps(), sampler.evaluations()), "{name}");
        let w = if promoe {
            assert_eq!(sampler.grid().model_time_scale(), 1000.0);
            replay(&file, heun, sampler.grid(), |t| t, |t| t / 1000.0)
        } else {
            assert_eq!(sampler.grid(), &FlowTimeGrid::uniform(steps).unwrap());
            replay(&file, heun, sampler.grid(), |t| t / 1000.0, |t| t)
        };
        println!("{file} ({}, {name}): {w}", if promoe { "ProMoE, fed sigma * 1000" } else { "DiT-MoE, fed t" });
    }
}

#[test]
fn heun_10_steps_matches_diffusers_on_its_grid() {
    diffusers_grid("heun", 10);
}

#[test]
fn heun_20_steps_matches_diffusers_on_its_grid() {
    diffusers_grid("heun", 20);
}

#[test]
fn heun_10_steps_matches_diffusers_on_the_dit_moe_grid() {
    uniform_grid("heun", 10);
}

#[test]
fn heun_20_steps_matches_diffusers_on_the_dit_moe_grid() {
    uniform_grid("heun", 20);
}

#[test]
fn euler_10_steps_matches_diffusers_on_its_grid() {
    diffusers_grid("euler", 10);
}

#[test]
fn euler_20_steps_matches_diffusers_on_its_grid() {
    diffusers_grid("euler", 20);
}

#[test]
fn euler_10_steps_matches_diffusers_on_the_dit_moe_grid() {
    uniform_grid("euler", 10);
}

#[test]
fn euler_20_steps_matches_diffusers_on_the_dit_moe_grid() {
    uniform_grid("euler", 20);
}

/// The two grids differ at the same step count: DiT-MoE's ends at 1/n before 0, diffusers' at
/// 1/1000, so its last Euler step is shorter and the other steps longer.
#[test]
fn the_grids_differ_as_documented() {
    let io = load_fixture("rf_heun/heun_diffusers_10.safetensors");
    let theirs = io["sigmas"].to_vec1::<f32>().unwrap();
    let ours = FlowTimeGrid::uniform(10).unwrap();
    let want: Vec<f32> = (0..10).map(|i| (1.0 - 0.999 * i as f64 / 9.0) as f32).chain([0.0]).collect();
    assert!(theirs.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-7), "diffusers' grid is linspace(1, 0.001, n) then 0: {theirs:?}");
    assert_eq!(ours.times()[9], 0.1);
    let uniform = load_fixture("rf_heun/heun_uniform_10.safetensors");
    let recorded: Vec<f64> = uniform["sigmas"].to_vec1::<f32>().unwrap().iter().map(|&s| f64::from(s)).collect();
    assert!(recorded.iter().zip(ours.times()).all(|(a, b)| (a - b).abs() < 1e-7));
}
