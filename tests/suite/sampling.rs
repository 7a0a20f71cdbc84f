//! `ditmoe::sampling` against the official loops, run end to end with the real `tiny` model:
//! `diffusion/loop_ddim25_cfg` and `loop_ddpm25_cfg` (official `p_sample_loop` /
//! `ddim_sample_loop` with `forward_with_cfg`, `create_diffusion("25")`, clip_denoised=False,
//! recorded noises) and `rectified_flow/sample_tiny_cfg` (`RectifiedFlow.sample`, 10 Euler
//! steps, cfg with a null-class forward). Every step is compared relatively: a random model is
//! not a denoiser, so the samples grow to ~1e3.
//!
//! The official Gaussian loops carry the doubled batch, but `forward_with_cfg` reads only its
//! first half and sample.py drops the second, so ours carries the conditional half only: the
//! comparisons are on the fixtures' first N/2 rows, which are the result.
//!
//! Plus the seeded path (same seed, same images; independent of batch splitting), the
//! unguided single batch at scale 1, guidance limited to an interval of noise levels, the
//! guided-channel switch, step validation and the PNG conversion.
use crate::common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixture_path, load_fixture, rel_err};
use ditmoe::checkpoint::ModelDir;
use ditmoe::diffusion::GaussianDiffusion;
use ditmoe::sampling::{
    DdimSampler, DdpmSampler, DpmSolverSampler, Evaluation, Guidance, GuidanceInterval, GuidedModel, ImageNoise, Images,
    RectifiedFlowSampler, Sampler,
};
use ditmoe::DitMoe;

/// Whole sampling loops (errors accumulate over the steps).
const LOOP_TOL: f64 = 1e-4;

fn tiny() -> DitMoe {
    ModelDir::open(&fixture_path("models/tiny")).unwrap().load(&ditmoe::ExecutionPlan::inference(&Device::Cpu, ditmoe::Precision::F32)).unwrap()
}

fn official_guidance(scale: f64) -> Guidance {
    Guidance { scale, guide_all_channels: false }
}

fn scalar_f32(t: &Tensor) -> f64 {
    f64::from(t.to_vec1::<f32>().unwrap()[0])
}

/// Everything the sampler fed the model, evaluation by evaluation.
#[derive(Default)]
struct Recorder {
    x: Vec<Tensor>,
    t: Vec<Tensor>,
    forward_batch: Vec<usize>,
}

impl Recorder {
    fn record(&mut self, e: &Evaluation) {
        assert_eq!(e.index, self.x.len(), "evaluations are reported in order");
        self.x.push(e.x.clone());
        self.t.push(e.t.clone());
        self.forward_batch.push(e.forward_batch);
    }
}

/// Runs `sampler` on a fixture's z/labels with the fixture's step noises and compares the state
/// after every step, the timesteps fed to the model and the batch layout.
fn replay_gaussian_loop(name: &str, sampler: Sampler) {
    let io = load_fixture(&format!("diffusion/{name}.safetensors"));
    let model = tiny();
    let y = io["y"].to_vec1::<i64>().unwrap();
    let n = y.len() / 2;
    let null = model.config().null_class() as i64;
    assert!(y[n..].iter().all(|&l| l == null), "second half of y is the null class: {y:?}");
    let classes: Vec<usize> = y[..n].iter().map(|&l| l as usize).collect();
    let z_doubled = &io["noise"];
    let z = z_doubled.narrow(0, 0, n).unwrap();
    assert_eq!(rel_err(&z_doubled.narrow(0, n, n).unwrap(), &z), 0.0, "official z = cat[z, z]");
    let guided = GuidedModel::new(&model, &classes, official_guidance(scalar_f32(&io["cfg_scale"])), &Device::Cpu).unwrap();

    let samples = &io["samples"];
    let steps = samples.dim(0).unwrap();
    assert_eq!(sampler.steps(), steps);
    assert_eq!(io["steps_t"].to_vec1::<i64>().unwrap(), (0..steps as i64).rev().collect::<Vec<_>>());
    let step_noises = io.get("step_noises");
    let mut noise_calls = 0;
    let mut rec = Recorder::default();
    let result = sampler
        .sample(
            &guided,
            &z,
            &mut |k| {
                assert_eq!(k, noise_calls, "step noises are drawn in step order");
                noise_calls += 1;
                step_noises.expect("this loop draws no step noise").i(k)?.narrow(0, 0, n)
            },
            &mut |e| rec.record(e),
        )
        .unwrap();
    assert_eq!(noise_calls, if step_noises.is_some() { steps } else { 0 });
    assert_eq!(rec.x.len(), steps, "one model evaluation per step");
    assert!(rec.forward_batch.iter().all(|&b| b == 2 * n), "guided: one doubled batch per step");

    let model_t = io["model_t"].to_vec1::<i64>().unwrap();
    for (k, (ours, &official)) in rec.t.iter().zip(&model_t).enumerate() {
        assert_eq!(ours.to_vec1::<i64>().unwrap(), vec![official; n], "step {k}: timesteps fed to the model");
    }
    let mut worst = (0, 0.0f64);
    for k in 0..steps {
        // The state after step k is what step k+1 was evaluated on; the last is the result.
        let ours = if k + 1 < steps { &rec.x[k + 1] } else { &result };
        let official = samples.i(k).unwrap().narrow(0, 0, n).unwrap();
        let e = rel_err(ours, &official);
        assert!(e <= LOOP_TOL, "{name}: step {k} sample: relative error {e:.3e} > {LOOP_TOL:.0e}");
        if e >= worst.1 {
            worst = (k, e);
        }
    }
    println!("{name}: worst step {} relative error {:.3e} (final {:.3e})", worst.0, worst.1, rel_err(&result, &samples.i(steps - 1).unwrap().narrow(0, 0, n).unwrap()));
}

#[test]
fn ddpm_loop_matches_official() {
    let diffusion = GaussianDiffusion::create("25", true).unwrap();
    replay_gaussian_loop("loop_ddpm25_cfg", Sampler::Ddpm(DdpmSampler::new(diffusion, false)));
}

/// The fixture ran `ddim_sample_loop` (eta 0) on `create_diffusion("25")`, so the DDIM sampler
/// is built on that respacing (`with_steps` would stride as "ddim25").
#[test]
fn ddim_loop_matches_official() {
    let diffusion = GaussianDiffusion::create("25", true).unwrap();
    replay_gaussian_loop("loop_ddim25_cfg", Sampler::Ddim(DdimSampler::new(diffusion, 0.0, false).unwrap()));
}

#[test]
fn rectified_flow_euler_matches_official_end_to_end() {
    let io = load_fixture("rectified_flow/sample_tiny_cfg.safetensors");
    let model = tiny();
    let classes: Vec<usize> = io["cond"].to_vec1::<i64>().unwrap().iter().map(|&c| c as usize).collect();
    let null = model.config().null_class() as i64;
    assert!(io["null_cond"].to_vec1::<i64>().unwrap().iter().all(|&c| c == null));
    let n = classes.len();
    let steps = io["steps"].to_vec1::<i64>().unwrap()[0] as usize;
    let guided = GuidedModel::new(&model, &classes, official_guidance(scalar_f32(&io["cfg_scale"])), &Device::Cpu).unwrap();
    let sampler = Sampler::RectifiedFlow(RectifiedFlowSampler::new(steps, false).unwrap());
    assert_eq!(sampler.evaluations(), steps);
    let mut rec = Recorder::default();
    let result = sampler.sample(&guided, &io["z"], &mut |_| panic!("rectified flow draws no step noise"), &mut |e| rec.record(e)).unwrap();

    let states = &io["states"];
    let step_t = io["step_t"].to_vec1::<f32>().unwrap();
    let mut worst = (0, 0.0f64);
    assert_eq!(rec.t.len(), steps);
    for (k, (ours, &official)) in rec.t.iter().zip(&step_t).enumerate() {
        assert_eq!(ours.to_vec1::<f32>().unwrap(), vec![official; n], "step {k}: t fed to the model");
    }
    assert!(rec.forward_batch.iter().all(|&b| b == 2 * n), "guided: one doubled batch per step");
    for k in 0..=steps {
        let ours = if k < steps { &rec.x[k] } else { &result };
        let e = rel_err(ours, &states.i(k).unwrap());
        assert!(e <= LOOP_TOL, "sample_tiny_cfg: states[{k}] relative error {e:.3e} > {LOOP_TOL:.0e}");
        if e >= worst.1 {
            worst = (k, e);
        }
    }
    println!("sample_tiny_cfg (real model): worst states[{}] relative error {:.3e}", worst.0, worst.1);
}

fn seeded(sampler: &Sampler, model: &DitMoe, classes: &[usize], scale: f64, seed: u64, first_image: usize) -> (Tensor, Recorder) {
    let guided = GuidedModel::new(model, classes, official_guidance(scale), &Device::Cpu).unwrap();
    sample_recorded(sampler, &guided, seed, first_image)
}

/// Seed 0 from image 0, guided at `scale` only at the levels in `interval`.
fn seeded_in(sampler: &Sampler, model: &DitMoe, classes: &[usize], scale: f64, interval: Option<GuidanceInterval>) -> (Tensor, Recorder) {
    let guided = GuidedModel::new(model, classes, official_guidance(scale), &Device::Cpu).unwrap().guided_in(interval);
    sample_recorded(sampler, &guided, 0, 0)
}

fn sample_recorded(sampler: &Sampler, guided: &GuidedModel, seed: u64, first_image: usize) -> (Tensor, Recorder) {
    let mut noise = ImageNoise::new(seed, first_image..first_image + guided.batch());
    let mut rec = Recorder::default();
    let out = sampler.sample_seeded(guided, &mut noise, &mut |e| rec.record(e)).unwrap();
    (out, rec)
}

/// One of each sampling process, at few steps.
fn every_sampler() -> Vec<Sampler> {
    vec![
        Sampler::Ddpm(DdpmSampler::with_steps(5, true, false).unwrap()),
        Sampler::Ddim(DdimSampler::with_steps(10, true, 0.0, false).unwrap()),
        Sampler::DpmSolver(DpmSolverSampler::with_steps(5, false).unwrap()),
        Sampler::RectifiedFlow(RectifiedFlowSampler::new(4, false).unwrap()),
        Sampler::RectifiedFlow(RectifiedFlowSampler::new(3, true).unwrap()),
    ]
}

fn interval(lo: f64, hi: f64) -> Option<GuidanceInterval> {
    Some(GuidanceInterval::new(lo, hi).unwrap())
}

#[test]
fn same_seed_same_images_different_seed_different_images() {
    let model = tiny();
    for sampler in [
        Sampler::Ddpm(DdpmSampler::with_steps(5, true, false).unwrap()),
        Sampler::RectifiedFlow(RectifiedFlowSampler::new(4, true).unwrap()),
    ] {
        let (a, _) = seeded(&sampler, &model, &[1, 2, 3], 4.0, 7, 0);
        let (b, _) = seeded(&sampler, &model, &[1, 2, 3], 4.0, 7, 0);
        let (c, _) = seeded(&sampler, &model, &[1, 2, 3], 4.0, 8, 0);
        assert_eq!(rel_err(&a, &b), 0.0, "{sampler:?}: same seed, same images");
        assert!(rel_err(&a, &c) > 1e-2, "{sampler:?}: another seed gives other images");
        // Each image has its own stream: a run split into two batches gives the same images.
        let (first, _) = seeded(&sampler, &model, &[1, 2], 4.0, 7, 0);
        let (second, _) = seeded(&sampler, &model, &[3], 4.0, 7, 2);
        let split = Tensor::cat(&[&first, &second], 0).unwrap();
        let e = rel_err(&split, &a);
        assert!(e < 1e-5, "{sampler:?}: batch splitting changed the images by {e:.3e}");
    }
}

#[test]
fn scale_one_runs_a_single_unguided_batch() {
    let model = tiny();
    let ddim = Sampler::Ddim(DdimSampler::with_steps(10, true, 0.0, false).unwrap());
    let heun = Sampler::RectifiedFlow(RectifiedFlowSampler::new(3, true).unwrap());
    for sampler in [ddim, heun] {
        let (_, guided) = seeded(&sampler, &model, &[4, 5], 1.5, 0, 0);
        let (_, plain) = seeded(&sampler, &model, &[4, 5], 1.0, 0, 0);
        assert_eq!(plain.x.len(), sampler.evaluations());
        assert!(guided.forward_batch.iter().all(|&b| b == 4), "{sampler:?}: guided batches are doubled");
        assert!(plain.forward_batch.iter().all(|&b| b == 2), "{sampler:?}: scale 1 runs the conditional half only");
    }
}

/// No interval and `[0, 1]` (which holds every level) are the same run, bit for bit: every
/// evaluation guided, as before intervals existed (the official loops above run without one).
#[test]
fn guidance_interval_zero_to_one_is_guidance_everywhere() {
    let model = tiny();
    for sampler in every_sampler() {
        let (everywhere, rec) = seeded_in(&sampler, &model, &[1, 2], 4.0, None);
        let (zero_to_one, rec01) = seeded_in(&sampler, &model, &[1, 2], 4.0, interval(0.0, 1.0));
        assert_eq!(rel_err(&zero_to_one, &everywhere), 0.0, "{sampler:?}: [0, 1] is no interval");
        assert_eq!(rec.forward_batch, vec![4; sampler.evaluations()], "{sampler:?}");
        assert_eq!(rec01.forward_batch, rec.forward_batch, "{sampler:?}");
    }
}

/// An interval that holds none of the levels a sampler visits guides no evaluation: the run is
/// scale 1's exactly, every forward of batch N (no null-class half at all).
#[test]
fn guidance_interval_holding_no_step_is_conditional_sampling() {
    let model = tiny();
    // No sampler here visits a level in [0.01, 0.02]: the flow grids stop at t = 1/4 and 1/3,
    // the Gaussian timesteps are 0 or at least 100.
    for sampler in every_sampler() {
        let (outside, rec) = seeded_in(&sampler, &model, &[1, 2], 4.0, interval(0.01, 0.02));
        let (plain, _) = seeded_in(&sampler, &model, &[1, 2], 1.0, None);
        assert_eq!(rel_err(&outside, &plain), 0.0, "{sampler:?}: no step guided is scale 1");
        assert_eq!(rec.forward_batch, vec![2; sampler.evaluations()], "{sampler:?}: conditional forwards only");
    }
}

/// A partial interval guides exactly the evaluations whose level lies in it, both ends included
/// (the levels 0.3 and 0.6 are on these grids): flow time t = i / 10, Gaussian timestep / 1000.
#[test]
fn guidance_interval_guides_exactly_the_levels_inside_it() {
    let model = tiny();
    let (n, guided_in) = (2, interval(0.3, 0.6));
    let batches = |guided: &[usize], evaluations: usize| -> Vec<usize> {
        (0..evaluations).map(|k| if guided.contains(&k) { 2 * n } else { n }).collect()
    };
    let cases = [
        // t = 1.0, 0.9, ..., 0.1: 0.6, 0.5, 0.4 and 0.3 guided.
        (Sampler::RectifiedFlow(RectifiedFlowSampler::new(10, false).unwrap()), batches(&[4, 5, 6, 7], 10)),
        // Heun evaluates t_i, then t_{i+1} (t_9 = 0.1 alone): 1, .9, .9, .8, .8, .7, .7, .6, .6, ...
        (Sampler::RectifiedFlow(RectifiedFlowSampler::new(10, true).unwrap()), batches(&[7, 8, 9, 10, 11, 12, 13, 14], 19)),
        // "ddim10" strides by 100: timesteps 900, 800, ..., 0.
        (Sampler::Ddim(DdimSampler::with_steps(10, true, 0.0, false).unwrap()), batches(&[3, 4, 5, 6], 10)),
        // "10" spaces 0..999 by 111: timesteps 999, 888, 777, 666, 555, 444, 333, 222, 111, 0.
        (Sampler::Ddpm(DdpmSampler::with_steps(10, true, false).unwrap()), batches(&[4, 5, 6], 10)),
        // diffusers' linspace: timesteps 999, 899, 799, 699, 599, 500, 400, 300, 200, 100.
        (Sampler::DpmSolver(DpmSolverSampler::with_steps(10, false).unwrap()), batches(&[4, 5, 6, 7], 10)),
    ];
    for (sampler, want) in cases {
        let (partial, rec) = seeded_in(&sampler, &model, &[1, 2], 4.0, guided_in);
        assert_eq!(rec.forward_batch, want, "{sampler:?}: forward batch per evaluation");
        // Up to the first guided evaluation the trajectory is the unguided one; from the state
        // after it, it is not (the first guided step changed it).
        let first = want.iter().position(|&b| b == 2 * n).unwrap();
        let (plain, unguided) = seeded_in(&sampler, &model, &[1, 2], 1.0, None);
        for k in 0..=first {
            assert_eq!(rel_err(&rec.x[k], &unguided.x[k]), 0.0, "{sampler:?}: evaluation {k} is on the unguided trajectory");
        }
        assert!(rel_err(&rec.x[first + 1], &unguided.x[first + 1]) > 0.0, "{sampler:?}: the guided evaluation {first} moved the state");
        let (everywhere, _) = seeded_in(&sampler, &model, &[1, 2], 4.0, None);
        assert!(rel_err(&partial, &plain) > 0.0 && rel_err(&partial, &everywhere) > 0.0, "{sampler:?}");
    }
}

#[test]
fn bad_guidance_intervals_are_rejected() {
    for (lo, hi) in [(0.8, 0.2), (-0.1, 0.5), (0.2, 1.5), (f64::NAN, 0.5), (0.2, f64::INFINITY)] {
        let err = GuidanceInterval::new(lo, hi).unwrap_err().to_string();
        assert!(err.contains("guidance interval needs 0 <= lo <= hi <= 1"), "[{lo}, {hi}]: {err}");
    }
    assert!(GuidanceInterval::from_bounds(&[0.2]).unwrap_err().to_string().contains("two bounds"));
    assert_eq!(GuidanceInterval::from_bounds(&[0.2, 0.8]).unwrap(), GuidanceInterval::new(0.2, 0.8).unwrap());
    assert_eq!("0.2, 0.8".parse::<GuidanceInterval>().unwrap(), GuidanceInterval::new(0.2, 0.8).unwrap());
    for bad in ["0.2", "0.2,0.8,0.9", "a,0.8", "0.8,0.2", "-0.1,0.5", "0,NaN"] {
        assert!(bad.parse::<GuidanceInterval>().is_err(), "{bad}");
    }
    let i = GuidanceInterval::new(0.3, 0.6).unwrap();
    assert!(i.contains(0.3) && i.contains(0.6) && !i.contains(0.299) && !i.contains(0.601) && !i.contains(f64::NAN));
    assert_eq!(i.to_string(), "[0.3, 0.6]");
    assert!(GuidanceInterval::new(0.0, 1.0).unwrap().is_everywhere() && !i.is_everywhere());
}

/// The Gaussian layout guides channels 0..3 and leaves channel 3 (and the sigma half) with the
/// conditional values; `guide_all_channels` guides channel 3 as well; scale 1 is the plain
/// conditional forward; rectified flow guides every channel.
#[test]
fn guided_channels_follow_the_official_layouts() {
    let model = tiny();
    let dev = Device::Cpu;
    let (n, s) = (2usize, 3.0);
    let x = Tensor::randn(0f32, 1.0, (n, 4, 8, 8), &dev).unwrap();
    let t = Tensor::new(&[500i64, 500], &dev).unwrap();
    let cond = model.forward(&x, &t, &Tensor::new(&[1u32, 2], &dev).unwrap()).unwrap();
    let uncond = model.forward(&x, &t, &Tensor::new(&[10u32, 10], &dev).unwrap()).unwrap();
    let full = (&uncond + ((&cond - &uncond).unwrap() * s).unwrap()).unwrap();
    let out = |all: bool, scale: f64| {
        GuidedModel::new(&model, &[1, 2], Guidance { scale, guide_all_channels: all }, &dev).unwrap().gaussian_output(&x, &t, 0.5).unwrap()
    };
    let official = out(false, s);
    let close = |a: &Tensor, b: &Tensor| rel_err(a, b) < 1e-5;
    assert!(close(&official.narrow(1, 0, 3).unwrap(), &full.narrow(1, 0, 3).unwrap()), "channels 0..3 guided");
    assert!(close(&official.narrow(1, 3, 5).unwrap(), &cond.narrow(1, 3, 5).unwrap()), "channel 3 and sigma: conditional");
    let all = out(true, s);
    assert!(close(&all.narrow(1, 0, 4).unwrap(), &full.narrow(1, 0, 4).unwrap()), "guide_all_channels: every eps channel");
    assert!(close(&all.narrow(1, 4, 4).unwrap(), &cond.narrow(1, 4, 4).unwrap()), "sigma half stays conditional");
    assert_eq!(rel_err(&out(false, 1.0), &cond), 0.0, "scale 1 is the conditional forward itself");
    let t_flow = Tensor::new(&[0.5f32, 0.5], &dev).unwrap();
    let v = GuidedModel::new(&model, &[1, 2], Guidance { scale: s, guide_all_channels: false }, &dev).unwrap().velocity(&x, &t_flow, 0.5).unwrap();
    let vc = model.forward(&x, &t_flow, &Tensor::new(&[1u32, 2], &dev).unwrap()).unwrap().narrow(1, 0, 4).unwrap();
    let vu = model.forward(&x, &t_flow, &Tensor::new(&[10u32, 10], &dev).unwrap()).unwrap().narrow(1, 0, 4).unwrap();
    let v_official = (&vu + ((&vc - &vu).unwrap() * s).unwrap()).unwrap();
    assert!(close(&v, &v_official), "rectified flow: every velocity channel guided, sigma half dropped");
}

#[test]
fn bad_labels_and_step_counts_are_rejected() {
    let model = tiny();
    let err = GuidedModel::new(&model, &[10], official_guidance(4.0), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("class 10 out of range"), "{err}");
    assert!(DdpmSampler::with_steps(0, true, false).is_err());
    assert!(DdpmSampler::with_steps(1001, true, false).is_err());
    assert!(DdpmSampler::with_steps(1000, true, false).is_ok());
    let err = DdimSampler::with_steps(300, true, 0.0, false).unwrap_err().to_string();
    assert!(err.contains("300"), "{err}");
    assert!(RectifiedFlowSampler::new(0, false).is_err());
}

#[test]
fn images_map_like_save_image_and_tile_like_make_grid() {
    let dev = Device::Cpu;
    // -1 -> 0, 1 -> 255, 0 -> 128 ((0 + 1) / 2 * 255 + 0.5 truncated), out of range clamps.
    let x = Tensor::new(&[-1f32, 1.0, 0.0, 5.0, -3.0, 0.5], &dev).unwrap().reshape((6, 1, 1, 1)).unwrap();
    let images = Images::from_tensor(&x).unwrap();
    assert_eq!(images.pixels, vec![0, 255, 128, 255, 0, 191]);
    let rgb = Images::from_tensor(&Tensor::zeros((3, 3, 4, 5), DType::F32, &dev).unwrap()).unwrap();
    let grid = rgb.grid(2).unwrap();
    assert_eq!((grid.width, grid.height, grid.channels), (2 * (5 + 2) + 2, 2 * (4 + 2) + 2, 3));
    // Padding is black, image pixels are 128; the empty fourth cell stays black.
    let at = |x: usize, y: usize| grid.pixels[(y * grid.width + x) * 3];
    assert_eq!((at(0, 0), at(2, 2), at(6, 5), at(9, 8), at(9, 2)), (0, 128, 128, 0, 128));
    let png = grid.png().unwrap();
    let decoded = image::load_from_memory(&png).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (16, 14));
}
