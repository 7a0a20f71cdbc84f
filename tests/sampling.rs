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
//! unguided single batch at scale 1, the guided-channel switch, step validation and the PNG
//! conversion.
mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixture_path, load_fixture, rel_err};
use ditmoe::checkpoint::ModelDir;
use ditmoe::diffusion::GaussianDiffusion;
use ditmoe::sampling::{
    DdimSampler, DdpmSampler, Evaluation, Guidance, GuidedModel, ImageNoise, Images, RectifiedFlowSampler, Sampler,
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
    let mut noise = ImageNoise::new(seed, first_image..first_image + classes.len());
    let mut rec = Recorder::default();
    let out = sampler.sample_seeded(&guided, &mut noise, &mut |e| rec.record(e)).unwrap();
    (out, rec)
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
        GuidedModel::new(&model, &[1, 2], Guidance { scale, guide_all_channels: all }, &dev).unwrap().gaussian_output(&x, &t).unwrap()
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
    let v = GuidedModel::new(&model, &[1, 2], Guidance { scale: s, guide_all_channels: false }, &dev).unwrap().velocity(&x, &t_flow).unwrap();
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
