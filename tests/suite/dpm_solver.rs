//! `ditmoe::sampling::DpmSolverSampler` (`dpm++2m`) against diffusers' own
//! `DPMSolverMultistepScheduler` (DPM-Solver++, order 2, midpoint, final sigma 0, linspace
//! timesteps, epsilon, linear betas): `tests/fixtures/dpm_solver/dpm_{10,20}.safetensors`, made
//! by `scripts/make_dpm_fixture.py` with diffusers 0.35.2, record the timesteps, sigmas and
//! every step's sample and model output. Our solver, fed the recorded model outputs, must
//! reproduce every step's sample; plus the sampler end to end on the tiny model with
//! classifier-free guidance, built by name through `SamplerKind`.
use crate::common;

use candle_core::{Device, IndexOp, Tensor};
use common::{fixture_path, load_fixture, rel_err};
use ditmoe::checkpoint::ModelDir;
use ditmoe::model::dit::apply_cfg;
use ditmoe::sampling::{DpmSolverSampler, Evaluation, Guidance, GuidedModel, ImageNoise, Sampler, SamplerKind};
use ditmoe::DitMoe;

/// Per-step tolerance (max-norm relative, f32).
const STEP_TOL: f64 = 1e-5;

/// Tolerance of the open-loop replay (the recorded eps fed regardless of our state): with eps
/// fixed, the map x_t -> x_{t-1} multiplies a deviation of x by sqrt(ab_{t-1} / ab_t), about
/// 1 / 0.0064 = 156 from t = 999 to the end, so f32 last-bit differences grow to a few 1e-5
/// (diffusers itself, fed the same eps with its sigmas recomputed by a correctly rounded sqrt
/// instead of torch's, lands 2.9e-5 away from its own fixture).
const OPEN_LOOP_TOL: f64 = 1e-4;

/// The fixture's "model" (scripts/make_dpm_fixture.py), in f32 as torch computes it:
/// sqrt(1 - ab) x / (0.25 ab + (1 - ab)) + 0.1 sin(3 x + t / 100).
fn fixture_model(x: &Tensor, t: usize, alphas_cumprod: &[f32]) -> Tensor {
    let ab = alphas_cumprod[t];
    let s2 = 1.0 - ab;
    let denoise = ((x * f64::from(s2.sqrt())).unwrap() / f64::from(0.25 * ab + s2)).unwrap();
    let wiggle = (x.affine(3.0, f64::from((t as f64 / 100.0) as f32)).unwrap().sin().unwrap() * 0.1).unwrap();
    (denoise + wiggle).unwrap()
}

#[allow(clippy::needless_range_loop)] // k indexes the fixture tensors and the timesteps alike
fn replay(steps: usize) {
    let io = load_fixture(&format!("dpm_solver/dpm_{steps}.safetensors"));
    let sampler = DpmSolverSampler::with_steps(steps, false).unwrap();
    assert_eq!(sampler.steps(), steps);
    let timesteps: Vec<usize> = io["timesteps"].to_vec1::<i64>().unwrap().iter().map(|&t| t as usize).collect();
    assert_eq!(sampler.timesteps(), timesteps.as_slice(), "timesteps");

    let sigmas = io["sigmas"].to_vec1::<f32>().unwrap();
    assert_eq!(sampler.sigmas().len(), sigmas.len());
    // Within an ulp: torch's f32 sqrt is not always correctly rounded, ours is.
    let sigma_err = sampler.sigmas().iter().zip(&sigmas).map(|(a, b)| if *b == 0.0 { (a - b).abs() as f64 } else { ((a - b) / b).abs() as f64 }).fold(0.0, f64::max);
    assert!(sigma_err < 1e-6, "{steps} steps: sigmas relative error {sigma_err:.3e}");

    let (sample_in, eps, sample_out) = (&io["sample_in"], &io["model_output"], &io["sample_out"]);
    assert_eq!(rel_err(&io["x_T"], &sample_in.i(0).unwrap()), 0.0, "sample_in[0] is x_T");

    // Step by step: each step fed diffusers' own sample and model output (the multistep
    // history is then diffusers' too) must give diffusers' next sample.
    let mut state = sampler.start();
    let mut worst_step = (0, 0.0f64);
    for k in 0..steps {
        let out = state.step(&eps.i(k).unwrap(), &sample_in.i(k).unwrap()).unwrap();
        let e = rel_err(&out, &sample_out.i(k).unwrap());
        assert!(e <= STEP_TOL, "{steps} steps: step {k} (t = {}) sample: relative error {e:.3e} > {STEP_TOL:.0e}", timesteps[k]);
        if e >= worst_step.1 {
            worst_step = (k, e);
        }
    }
    assert_eq!(state.index(), steps);
    assert!(state.step(&eps.i(0).unwrap(), &sample_in.i(0).unwrap()).is_err(), "no step after the last");

    // Closed loop: our own trajectory, the fixture's model evaluated on our samples.
    let alphas_cumprod = io["alphas_cumprod"].to_vec1::<f32>().unwrap();
    let mut state = sampler.start();
    let mut x = io["x_T"].clone();
    let mut worst_closed = (0, 0.0f64);
    for k in 0..steps {
        let e_eps = rel_err(&fixture_model(&x, timesteps[k], &alphas_cumprod), &eps.i(k).unwrap());
        assert!(e_eps <= STEP_TOL, "{steps} steps: fixture model at step {k}: relative error {e_eps:.3e}");
        x = state.step(&fixture_model(&x, timesteps[k], &alphas_cumprod), &x).unwrap();
        let e = rel_err(&x, &sample_out.i(k).unwrap());
        assert!(e <= STEP_TOL, "{steps} steps: closed loop, step {k} sample: relative error {e:.3e} > {STEP_TOL:.0e}");
        if e >= worst_closed.1 {
            worst_closed = (k, e);
        }
    }

    // Open loop: the recorded model outputs fed along our own trajectory.
    let mut state = sampler.start();
    let mut x = io["x_T"].clone();
    let mut worst_open = (0, 0.0f64);
    for k in 0..steps {
        x = state.step(&eps.i(k).unwrap(), &x).unwrap();
        let e = rel_err(&x, &sample_out.i(k).unwrap());
        assert!(e <= OPEN_LOOP_TOL, "{steps} steps: open loop, step {k} sample: relative error {e:.3e} > {OPEN_LOOP_TOL:.0e}");
        if e >= worst_open.1 {
            worst_open = (k, e);
        }
    }
    println!(
        "dpm_{steps}: sigmas max rel err {sigma_err:.3e}; step by step worst (step {}) {:.3e}; closed loop worst (step {}) {:.3e}; open loop worst (step {}) {:.3e}",
        worst_step.0, worst_step.1, worst_closed.0, worst_closed.1, worst_open.0, worst_open.1
    );
}

#[test]
fn dpm_solver_10_steps_matches_diffusers() {
    replay(10);
}

#[test]
fn dpm_solver_20_steps_matches_diffusers() {
    replay(20);
}

/// One step goes straight to sigma 0: the result is the x0 prediction (x - sigma eps) / alpha.
#[test]
fn one_step_is_the_x0_prediction() {
    let dev = Device::Cpu;
    let sampler = DpmSolverSampler::with_steps(1, false).unwrap();
    assert_eq!(sampler.timesteps(), &[999]);
    let sigma = f64::from(sampler.sigmas()[0]);
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let x = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap();
    let eps = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap();
    let out = sampler.start().step(&eps, &x).unwrap();
    let want = ((&x - (&eps * (sigma * alpha)).unwrap()).unwrap() / alpha).unwrap();
    assert!(rel_err(&out, &want) < 1e-5);
    let clipped = DpmSolverSampler::with_steps(1, true).unwrap().start().step(&eps, &x).unwrap();
    // (Compared with our own unclipped result: at alpha ~ 0.006 the x0 prediction cancels
    // away ~8 bits, enough to put single entries on the other side of the clamp.)
    assert!(rel_err(&clipped, &out.clamp(-1f32, 1f32).unwrap()) < 1e-6, "clip_x0 clamps the x0 prediction");
}

#[test]
fn dpm_solver_is_a_gaussian_sampler_by_name() {
    let k: SamplerKind = "dpm++2m".parse().unwrap();
    assert_eq!(k, SamplerKind::DpmSolver2M);
    assert_eq!(k.name(), "dpm++2m");
    assert!(k.is_gaussian());
    assert_eq!(k.official_steps(), 20);
    assert!(SamplerKind::ALL.contains(&k));
    assert!("dpm".parse::<SamplerKind>().unwrap_err().contains("dpm++2m"));
}

fn tiny() -> DitMoe {
    ModelDir::open(&fixture_path("models/tiny")).unwrap().load(&ditmoe::ExecutionPlan::inference(&Device::Cpu, ditmoe::Precision::F32)).unwrap()
}

/// `SamplerKind::build` -> `Sampler::sample_seeded` on the tiny (learned-sigma, 4-channel latent)
/// model with guidance 4: one doubled forward per step at the solver's timesteps, and every
/// step is the solver step on the official guided eps (channels 0..3 guided, channel 3
/// conditional, the sigma half dropped).
#[test]
fn dpm_solver_samples_end_to_end_with_guidance() {
    let model = tiny();
    let dev = Device::Cpu;
    let cfg = model.config().clone();
    assert!(cfg.learn_sigma && cfg.in_channels == 4);
    let steps = 8;
    let sampler = SamplerKind::DpmSolver2M.build(steps, &cfg, false).unwrap();
    let Sampler::DpmSolver(solver) = &sampler else { panic!("dpm++2m builds {sampler:?}") };
    assert_eq!((sampler.steps(), sampler.evaluations()), (steps, steps));
    let classes = [1usize, 7];
    let scale = 4.0;
    let run = || {
        let guided = GuidedModel::new(&model, &classes, Guidance { scale, guide_all_channels: false }, &dev).unwrap();
        let mut noise = ImageNoise::new(3, 0..classes.len());
        let mut xs = Vec::new();
        let mut ts = Vec::new();
        let mut batches = Vec::new();
        let out = sampler
            .sample_seeded(&guided, &mut noise, &mut |e: &Evaluation| {
                assert_eq!((e.index, e.total), (xs.len(), steps));
                xs.push(e.x.clone());
                ts.push(e.t.to_vec1::<i64>().unwrap());
                batches.push(e.forward_batch);
            })
            .unwrap();
        (out, xs, ts, batches)
    };
    let (out, xs, ts, batches) = run();
    assert_eq!(out.dims(), &[2, 4, 8, 8]);
    assert!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    assert!(batches.iter().all(|&b| b == 4), "guided: one doubled batch per step");
    for (k, t) in ts.iter().enumerate() {
        assert_eq!(t, &vec![solver.timesteps()[k] as i64; 2], "step {k}: timesteps fed to the model");
    }
    assert_eq!(rel_err(&run().0, &out), 0.0, "same seed, same images");

    // Replay with the guided eps computed by hand from two plain forwards.
    let cond_y = Tensor::new(&[1u32, 7], &dev).unwrap();
    let null = cfg.null_class() as u32;
    let mut state = solver.start();
    for k in 0..steps {
        let x = &xs[k];
        let t = Tensor::new(ts[k].as_slice(), &dev).unwrap();
        let x2 = Tensor::cat(&[x, x], 0).unwrap();
        let t2 = Tensor::cat(&[&t, &t], 0).unwrap();
        let y2 = Tensor::cat(&[&cond_y, &Tensor::new(&[null, null], &dev).unwrap()], 0).unwrap();
        let raw = model.forward(&x2, &t2, &y2).unwrap();
        let eps = apply_cfg(&raw, scale, 3).unwrap().narrow(0, 0, 2).unwrap().narrow(1, 0, 4).unwrap();
        let next = state.step(&eps, x).unwrap();
        let ours = if k + 1 < steps { &xs[k + 1] } else { &out };
        let e = rel_err(ours, &next);
        assert!(e < 1e-5, "step {k}: sampler vs hand-guided solver step: relative error {e:.3e}");
    }
}
