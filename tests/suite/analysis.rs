//! `ditmoe::analysis`: the aggregation maths on hand-built routing records, saving and
//! reloading, heatmap rendering, and recording a real trajectory of the `pixel` fixture
//! model (the record must be what the model routes, whatever the batching).
use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_path, scratch_dir};
use ditmoe::analysis::aggregate::{entropy_bits, first_choice, load_by_class, load_by_patch, load_by_step, load_entropy, top_expert_by_patch};
use ditmoe::analysis::colormap::{expert_color, viridis};
use ditmoe::analysis::{figures, heatmap, record_trajectory, Heatmap, ImageRecord, Matrix, RecordRequest, RoutingTrajectory, SamplerKind, Scale, TrajectoryMeta};
use ditmoe::checkpoint::ModelDir;
use ditmoe::sampling::{Guidance, GuidanceInterval, GuidedModel, ImageNoise};
use ditmoe::{DitConfig, ForwardMode, Trace};

/// 4x4 input, patch 2: a 2x2 grid of 4 tokens; 2 layers, 4 experts, top-2; 3 classes.
fn small_config() -> DitConfig {
    DitConfig::from_json_str(
        r#"{"input_size": 4, "patch_size": 2, "in_channels": 1, "hidden_size": 8, "depth": 2, "num_heads": 2,
            "mlp_ratio": 2, "class_dropout_prob": 0.1, "num_classes": 3, "num_experts": 4,
            "num_experts_per_tok": 2, "learn_sigma": false}"#,
        "test",
    )
    .unwrap()
}

fn meta(classes: Vec<usize>, steps: usize) -> TrajectoryMeta {
    TrajectoryMeta {
        model: "hand-built".into(),
        config: small_config(),
        class_names: Some(vec!["zero".into(), "one".into(), "two".into()]),
        classes,
        seed: 7,
        sampler: "ddpm".into(),
        steps,
        guidance: 1.0,
        guidance_interval: None,
        timesteps: (0..steps).map(|s| (steps - 1 - s) as f64 * 100.0).collect(),
    }
}

/// One image's record from `pick(step, layer, token) -> [first, second]` expert ids; the
/// weights are 0.6/0.4, scores put 0.6/0.4 on the chosen experts, states encode (image, step).
fn image(steps: usize, tag: f32, pick: impl Fn(usize, usize, usize) -> [u32; 2]) -> ImageRecord {
    let mut r = ImageRecord::default();
    for s in 0..steps {
        for l in 0..2 {
            for t in 0..4 {
                let e = pick(s, l, t);
                r.experts.extend(e);
                r.weights.extend([0.6, 0.4]);
                let mut scores = [0.0f32; 4];
                // Out-of-range ids (the validation test) leave the scores alone.
                for (id, w) in e.iter().zip([0.6, 0.4]) {
                    if let Some(v) = scores.get_mut(*id as usize) {
                        *v = w;
                    }
                }
                r.scores.extend(scores);
            }
        }
        r.states.extend([tag * 100.0 + s as f32; 16]);
    }
    r.sample = vec![tag; 16];
    r
}

/// Image 0 (class 0): layer 0 routes token t to (t, (t+1)%4) at every step (position-bound);
/// layer 1 routes everything to (0, 1) at step 0 and (2, 3) afterwards (time-bound).
/// Image 1 (class 2): every token to (3, 2) in both layers at every step.
fn hand_built() -> RoutingTrajectory {
    let steps = 3;
    let a = image(steps, 0.0, |s, l, t| match l {
        0 => [t as u32, ((t + 1) % 4) as u32],
        _ if s == 0 => [0, 1],
        _ => [2, 3],
    });
    let b = image(steps, 1.0, |_, _, _| [3, 2]);
    RoutingTrajectory::new(meta(vec![0, 2], steps), vec![a, b]).unwrap()
}

#[test]
fn load_by_step_counts_every_top_k_slot() {
    let traj = hand_built();
    let l1 = load_by_step(&traj, 1);
    assert_eq!((l1.rows, l1.cols), (3, 4));
    // Step 0: image 0 puts its 4 tokens on experts 0 and 1, image 1 on 3 and 2.
    assert_eq!(l1.row(0), &[4.0, 4.0, 4.0, 4.0]);
    // Later steps: both images on 2 and 3 only.
    assert_eq!(l1.row(1), &[0.0, 0.0, 8.0, 8.0]);
    assert_eq!(l1.row(2), &[0.0, 0.0, 8.0, 8.0]);
    // Every (image, token) contributes k = 2 selections per step.
    let l0 = load_by_step(&traj, 0);
    for s in 0..3 {
        assert_eq!(l0.row(s).iter().sum::<f64>(), 2.0 * 4.0 * 2.0);
        // Layer 0, image 0: each expert is first choice of one token and second of another.
        assert_eq!(l0.row(s), &[2.0, 2.0, 2.0 + 4.0, 2.0 + 4.0]);
    }
}

#[test]
fn patch_views_follow_position() {
    let traj = hand_built();
    let only_a = traj.select_images(&[0]).unwrap();
    let p = load_by_patch(&only_a, 0);
    assert_eq!((p.rows, p.cols), (4, 4));
    // Token t took experts t and t+1 at all 3 steps.
    for t in 0..4 {
        let mut want = [0.0; 4];
        want[t] = 3.0;
        want[(t + 1) % 4] = 3.0;
        assert_eq!(p.row(t), &want, "token {t}");
    }
    // Ties (t and t+1 equally often) go to the lower id; token 3's tie is 3 vs 0 -> 0.
    assert_eq!(top_expert_by_patch(&only_a, 0), vec![0, 1, 2, 0]);
    // With image 1 added, 3 and 2 dominate every patch of layer 1.
    assert_eq!(top_expert_by_patch(&traj, 1), vec![2, 2, 2, 2]);
    // First choice of one step, one image: layer 0 of image 0 is the token index.
    assert_eq!(first_choice(&traj, 0, 1, 0), vec![0, 1, 2, 3]);
    assert_eq!(first_choice(&traj, 1, 0, 0), vec![3, 3, 3, 3]);
}

#[test]
fn class_table_is_per_class_fractions() {
    let traj = hand_built();
    let (classes, m) = load_by_class(&traj, 1);
    assert_eq!(classes, vec![0, 2], "only the run's classes, ascending");
    // Class 0 (image 0), layer 1: 8 of 24 selections on 0 and 1 (step 0), 16 on 2 and 3.
    let third = 1.0 / 6.0;
    let want = [third, third, 2.0 * third, 2.0 * third];
    m.row(0).iter().zip(want).for_each(|(g, w)| assert!((g - w).abs() < 1e-12, "{:?}", m.row(0)));
    assert_eq!(m.row(1), &[0.0, 0.0, 0.5, 0.5]);
}

#[test]
fn entropy_of_expert_load() {
    assert_eq!(entropy_bits(&[1.0, 1.0, 1.0, 1.0]), 2.0);
    assert_eq!(entropy_bits(&[0.0, 5.0, 5.0, 0.0]), 1.0);
    assert_eq!(entropy_bits(&[0.0, 0.0]), 0.0);
    assert!((entropy_bits(&[3.0, 1.0]) - 0.811_278_124_459_132_8).abs() < 1e-12);
    let traj = hand_built();
    let h = load_entropy(&traj);
    assert_eq!((h.rows, h.cols), (3, 2));
    // Layer 1: balanced at step 0, then two experts only.
    assert_eq!(h.get(0, 1), 2.0);
    assert_eq!(h.get(1, 1), 1.0);
    assert_eq!(h.get(2, 1), 1.0);
    // Layer 0: loads 2,2,6,6 out of 16.
    let want = entropy_bits(&[2.0, 2.0, 6.0, 6.0]);
    assert!((h.get(0, 0) - want).abs() < 1e-12 && want < 2.0 && want > 1.0);
}

#[test]
fn records_are_validated_and_images_selectable() {
    let steps = 3;
    let good = || image(steps, 0.0, |_, _, _| [0, 1]);
    let bad_id = image(steps, 0.0, |_, _, _| [0, 4]);
    let err = RoutingTrajectory::new(meta(vec![0], steps), vec![bad_id]).unwrap_err().to_string();
    assert!(err.contains("expert id 4"), "{err}");
    let mut short = good();
    short.weights.pop();
    let err = RoutingTrajectory::new(meta(vec![0], steps), vec![short]).unwrap_err().to_string();
    assert!(err.contains("weights"), "{err}");
    let err = RoutingTrajectory::new(meta(vec![5], steps), vec![good()]).unwrap_err().to_string();
    assert!(err.contains("class 5"), "{err}");

    let traj = hand_built();
    assert_eq!(traj.images_of_class(2), vec![1]);
    let b = traj.select_images(&[1]).unwrap();
    assert_eq!(b.meta.classes, vec![2]);
    assert_eq!(b.token_experts(0, 2, 1, 3), &[3, 2]);
    assert_eq!(b.state(0, 2)[0], 102.0);
    assert!(traj.select_images(&[2]).is_err());

    // Appending another batch of the same run keeps the layout; another schedule is refused.
    let mut a = traj.select_images(&[0]).unwrap();
    a.append(traj.select_images(&[1]).unwrap()).unwrap();
    assert_eq!(a, traj);
    let mut other = meta(vec![0], steps);
    other.timesteps[0] += 1.0;
    let mismatched = RoutingTrajectory::new(other, vec![good()]).unwrap();
    assert!(a.append(mismatched).is_err());
}

#[test]
fn save_and_reload_without_the_model() {
    let dir = scratch_dir("analysis-store");
    let traj = hand_built();
    traj.save(&dir).unwrap();
    assert!(ditmoe::analysis::is_trajectory_dir(&dir));
    let back = RoutingTrajectory::load(&dir).unwrap();
    assert_eq!(back, traj);
    // The arrays are plain safetensors, shaped (N, S, L, T, k).
    let raw = candle_core::safetensors::load(dir.join("trajectory.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(raw["experts"].dims(), &[2, 3, 2, 4, 2]);
    assert_eq!(raw["experts"].dtype(), DType::U32);
    assert_eq!(raw["states"].dims(), &[2, 3, 1, 4, 4]);

    // Metadata that disagrees with the arrays is named.
    let json = std::fs::read_to_string(dir.join("trajectory.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&json).unwrap();
    m["timesteps"].as_array_mut().unwrap().pop();
    std::fs::write(dir.join("trajectory.json"), m.to_string()).unwrap();
    let err = RoutingTrajectory::load(&dir).unwrap_err().to_string();
    assert!(err.contains("experts") && err.contains("trajectory.safetensors"), "{err}");
}

#[test]
fn heatmap_colours_and_layout() {
    let m = Matrix::from_rows(&[vec![0.0, 1.0], vec![2.0, 4.0]]).unwrap();
    let h = Heatmap::values(&m, Scale::MinMax);
    assert_eq!(h.color(0, 0), viridis(0.0));
    assert_eq!(h.color(1, 1), viridis(1.0));
    assert_eq!(h.color(1, 0), viridis(0.5));
    assert_ne!(viridis(0.0), viridis(1.0));
    let cells = h.cells_image();
    assert_eq!(cells.dimensions(), (2, 2));
    assert_eq!(cells.get_pixel(1, 0).0, viridis(0.25));
    // A fixed range clamps values outside it.
    assert_eq!(Heatmap::values(&m, Scale::Range(0.0, 2.0)).color(1, 1), viridis(1.0));

    let e = Heatmap::experts(&[0, 1, 2, 1], 2, 2, 3).unwrap();
    assert_eq!(e.color(1, 1), expert_color(1));
    assert_ne!(expert_color(0), expert_color(1));
    assert!(Heatmap::experts(&[0, 3], 1, 2, 3).is_err());
    // Colours stay distinct past the 20-colour palette (16E and larger models).
    let many: std::collections::HashSet<_> = (0..64).map(expert_color).collect();
    assert_eq!(many.len(), 64);

    // The decorated figure holds the cells at their size, and marks the chosen column.
    let fig = Heatmap::values(&m, Scale::MinMax).title("t").labels("x", "y").x_tick_labels(["a".into(), "b".into()]).cell(10, 10).mark_col(Some(1));
    let img = fig.render();
    assert!(img.width() > 20 && img.height() > 20);
    let red = img.pixels().filter(|p| p.0 == [230, 30, 30]).count();
    assert_eq!(red, 2 * 10 + 2 * 20 - 4, "outline of a 10x20 column");
    let tiled = heatmap::tile(&[img.clone(), img.clone(), img.clone()], 2, "");
    assert_eq!(tiled.dimensions(), (2 * img.width(), 2 * img.height()));
    // Rows are as tall as their tallest panel, not the tallest overall.
    let small = image::RgbImage::new(10, 5);
    assert_eq!(heatmap::tile(&[img.clone(), small.clone(), small], 1, "").height(), img.height() + 10);

    let traj = hand_built();
    let png = heatmap::png_bytes(&figures::step_figure(&traj, 1, Some(0)).render()).unwrap();
    let decoded = image::load_from_memory(&png).unwrap();
    assert!(decoded.width() > 3 && decoded.height() > 4);
}

/// A rendered heatmap, through PNG and back, has the size its layout gives (8-pixel margins,
/// 4-pixel gaps, a 15-pixel title line, 12-pixel tick and axis-label lines, cells at their
/// size, the colour bar on the right) and its label areas hold text of the right extent.
#[test]
fn heatmap_png_size_and_labels() {
    use ditmoe::analysis::text::{line_height, text_width};
    let rows: Vec<Vec<f64>> = (0..4).map(|r| (0..6).map(|c| (r * 6 + c) as f64).collect()).collect();
    let m = Matrix::from_rows(&rows).unwrap();
    let fig = Heatmap::values(&m, Scale::Range(0.0, 30.0))
        .title("Routing by step")
        .labels("timestep", "expert")
        .x_tick_labels((0..6).map(|c| format!("t{c}")))
        .y_tick_labels((0..4).map(|r| format!("E{r}")))
        .cell(20, 16);
    let png = heatmap::png_bytes(&fig.render()).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();

    let (line, title_line) = (line_height(12.0), line_height(15.0));
    let tick_w = (0..4).map(|r| text_width(&format!("E{r}"), 12.0)).max().unwrap();
    let (left, top) = (8 + line + 4 + tick_w + 4, 8 + title_line + 4);
    let legend_w = 12 + 4 + text_width("30", 12.0).max(text_width("0", 12.0));
    assert_eq!(img.dimensions(), (left + 120 + 8 + legend_w + 8, top + 64 + 4 + 2 * (line + 4) + 8));
    // The cells, 20x16 each, start at (left, top).
    assert_eq!(img.get_pixel(left, top).0, viridis(0.0));
    assert_eq!(img.get_pixel(left + 119, top + 63).0, viridis(23.0 / 30.0));
    assert_eq!(img.get_pixel(left + 20, top + 16).0, viridis(7.0 / 30.0));
    assert_ne!(img.get_pixel(left - 1, top).0, viridis(0.0));

    // Dark (text) pixels in a band, and the columns they span.
    let ink = |x0: u32, y0: u32, x1: u32, y1: u32| {
        let dark: Vec<u32> = (y0..y1).flat_map(|y| (x0..x1).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 128)).map(|(x, _)| x).collect();
        (dark.len(), dark.iter().min().copied(), dark.iter().max().copied())
    };
    let (n, x_min, x_max) = ink(0, 0, img.width(), top);
    let title_w = text_width("Routing by step", 15.0);
    assert!(n > 100, "title band holds {n} dark pixels");
    assert!(x_min.unwrap() >= 8 && x_min.unwrap() <= 10 && x_max.unwrap() <= 8 + title_w && x_max.unwrap() + 4 >= 8 + title_w, "title ink spans {x_min:?}..={x_max:?}, its text {title_w} pixels from 8");
    let (n, ..) = ink(8, top, 8 + line, top + 64);
    assert!(n > 40, "y axis label column holds {n} dark pixels");
    let (n, ..) = ink(8 + line + 4, top, left, top + 64);
    assert!(n > 40, "y tick column holds {n} dark pixels");
    let (n, ..) = ink(left, top + 64 + 4, left + 120, top + 64 + 4 + line);
    assert!(n > 40, "x tick row holds {n} dark pixels");
    let (n, ..) = ink(left, top + 64 + 4 + line + 4, left + 120, img.height());
    assert!(n > 40, "x axis label row holds {n} dark pixels");
    let (n, ..) = ink(left + 120 + 8 + 16, top, img.width(), top + line);
    assert!(n > 10, "colour bar's top value holds {n} dark pixels");
}

fn pixel_model() -> (ModelDir, ditmoe::DitMoe) {
    let dir = ModelDir::open(&fixture_path("models/pixel")).unwrap();
    let model = dir.load(&ditmoe::ExecutionPlan::inference(&Device::Cpu, ditmoe::Precision::F32)).unwrap();
    (dir, model)
}

#[test]
fn recorded_routing_is_the_models() {
    let (dir, model) = pixel_model();
    let cfg = model.config().clone();
    let req = RecordRequest { classes: vec![1, 4, 4], seed: 3, sampler: SamplerKind::Ddim, steps: 5, guidance: 2.0, guidance_interval: None, batch_size: 3 };
    let mut seen = Vec::new();
    let traj = record_trajectory(&model, "pixel", dir.class_names.clone(), &req, &Device::Cpu, &mut |p| seen.push(p)).unwrap();
    let d = traj.dims();
    assert_eq!((d.images, d.steps, d.layers, d.tokens, d.top_k, d.experts, d.grid), (3, 5, 2, 64, 2, 4, 8));
    assert_eq!(seen.len(), 5);
    assert_eq!(seen.last().map(|p| (p.done, p.total)), Some((5, 5)));
    // DDIM over 5 steps feeds the original timesteps, from noise down.
    assert!(traj.meta.timesteps.windows(2).all(|w| w[0] > w[1]), "{:?}", traj.meta.timesteps);

    // Evaluation 2, re-run by hand on the recorded state with the guided labels: the
    // conditional rows of its routing are the record.
    let s = 2;
    let states: Vec<f32> = (0..3).flat_map(|n| traj.state(n, s).to_vec()).collect();
    let x = Tensor::from_vec(states, (3, 3, 16, 16), &Device::Cpu).unwrap();
    let x2 = Tensor::cat(&[&x, &x], 0).unwrap();
    let t = Tensor::new(vec![traj.meta.timesteps[s] as i64; 6], &Device::Cpu).unwrap();
    let y = Tensor::new(&[1u32, 4, 4, 10, 10, 10], &Device::Cpu).unwrap();
    let mut trace = Trace::routing();
    model.forward_full(&x2, &t, &y, ForwardMode::Eval, &mut trace).unwrap();
    for (l, r) in trace.routing.iter().enumerate() {
        let experts = r.experts.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
        let weights = r.weights.to_vec2::<f32>().unwrap();
        for n in 0..3 {
            for tok in 0..64 {
                assert_eq!(traj.token_experts(n, s, l, tok), experts[n * 64 + tok].as_slice(), "layer {l} image {n} token {tok}");
                let w = traj.token_weights(n, s, l, tok);
                assert!(w.iter().zip(&weights[n * 64 + tok]).all(|(a, b)| (a - b).abs() < 1e-6));
                let scores = traj.token_scores(n, s, l, tok);
                assert!((scores.iter().sum::<f32>() - 1.0).abs() < 1e-4);
                // Gate weights are the chosen experts' softmax scores (norm_topk_prob off).
                let first = experts[n * 64 + tok][0] as usize;
                assert!((scores[first] - w[0]).abs() < 1e-6, "score {} vs weight {}", scores[first], w[0]);
            }
        }
    }

    // Recording does not change the samples: the same run without the record.
    let sampler = SamplerKind::Ddim.build(5, &cfg, true).unwrap();
    let guided = GuidedModel::new(&model, &[1, 4, 4], Guidance { scale: 2.0, guide_all_channels: false }, &Device::Cpu).unwrap();
    let plain = sampler.sample_seeded(&guided, &mut ImageNoise::new(3, 0..3), &mut |_| {}).unwrap();
    let plain = plain.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let recorded: Vec<f32> = (0..3).flat_map(|n| traj.sample(n).to_vec()).collect();
    assert_eq!(plain, recorded);
    assert!(guided.take_routing().is_empty(), "no record unless asked for");
}

#[test]
fn recording_is_independent_of_batching() {
    let (_, model) = pixel_model();
    let req = RecordRequest { classes: vec![0, 7, 7], seed: 11, sampler: SamplerKind::Euler, steps: 3, guidance: 1.0, guidance_interval: None, batch_size: 3 };
    let whole = record_trajectory(&model, "pixel", None, &req, &Device::Cpu, &mut |_| {}).unwrap();
    let mut total = 0;
    let split = record_trajectory(&model, "pixel", None, &RecordRequest { batch_size: 2, ..req.clone() }, &Device::Cpu, &mut |p| total = p.total).unwrap();
    assert_eq!(total, 6, "two batches of 3 evaluations");
    assert_eq!(split.meta, whole.meta);
    for n in 0..3 {
        // Rounding differences may flip a near-tie between two experts, nothing more.
        let (a, b) = (split.image(n).experts, whole.image(n).experts);
        let flipped = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(flipped * 200 <= a.len(), "image {n}: {flipped} of {} choices differ", a.len());
        // Another batch size changes the matmul shapes, so the states agree to rounding only.
        let (a, b) = (split.image(n).states, whole.image(n).states);
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "image {n}: states differ by {worst}");
    }
    // Flow times run from 1 (noise) towards 0.
    assert_eq!(whole.meta.timesteps[0], 1.0);
    assert!(record_trajectory(&model, "pixel", None, &RecordRequest { classes: vec![], ..req }, &Device::Cpu, &mut |_| {}).is_err());
}

/// Guidance limited to the levels [0, 0.7], as generate.json may set it: the evaluations above
/// 0.7 run the conditional forward alone, so up to there the record is an unguided run's; the
/// interval is in the metadata and survives saving. At scale 1 an interval changes nothing.
#[test]
fn recording_guides_in_the_interval_only() {
    let (_, model) = pixel_model();
    let interval = GuidanceInterval::new(0.0, 0.7).unwrap();
    let unguided = RecordRequest { classes: vec![2, 6], seed: 5, sampler: SamplerKind::Euler, steps: 4, guidance: 1.0, guidance_interval: None, batch_size: 2 };
    let record = |req: &RecordRequest| record_trajectory(&model, "pixel", None, req, &Device::Cpu, &mut |_| {}).unwrap();
    let plain = record(&unguided);
    assert_eq!(record(&RecordRequest { guidance_interval: Some(interval), ..unguided.clone() }), plain, "scale 1 guides no step");

    let guided = record(&RecordRequest { guidance: 2.0, guidance_interval: Some(interval), ..unguided });
    assert_eq!(guided.meta.guidance_interval, Some(interval));
    assert_eq!(guided.meta.guidance_label(), "cfg 2 at levels [0, 0.7]");
    // Flow times 1, 0.75, 0.5, 0.25: two evaluations above the interval, two inside it.
    let above = guided.meta.timesteps.iter().take_while(|&&t| t > 0.7).count();
    assert_eq!((above, guided.dims().steps), (2, 4), "{:?}", guided.meta.timesteps);
    for n in 0..2 {
        let (g, p) = (guided.image(n), plain.image(n));
        for s in 0..above {
            assert_eq!(guided.state(n, s), plain.state(n, s), "image {n} evaluation {s}");
            for l in 0..guided.dims().layers {
                for t in 0..guided.dims().tokens {
                    assert_eq!(guided.token_experts(n, s, l, t), plain.token_experts(n, s, l, t), "image {n} evaluation {s} layer {l} token {t}");
                }
            }
        }
        assert_ne!(g.sample, p.sample, "image {n}: the steps inside the interval are guided");
    }

    let dir = scratch_dir("trajectory-interval");
    guided.save(&dir).unwrap();
    assert_eq!(RoutingTrajectory::load(&dir).unwrap().meta.guidance_interval, Some(interval));
    // A trajectory saved before intervals existed was guided everywhere; bad bounds are named.
    let meta_path = dir.join("trajectory.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("guidance_interval");
    std::fs::write(&meta_path, m.to_string()).unwrap();
    assert_eq!(RoutingTrajectory::load(&dir).unwrap().meta.guidance_interval, None);
    m["guidance_interval"] = serde_json::json!([0.8, 0.2]);
    std::fs::write(&meta_path, m.to_string()).unwrap();
    let err = RoutingTrajectory::load(&dir).unwrap_err().to_string();
    assert!(err.contains("trajectory.json") && err.contains("guidance interval"), "{err}");
}

#[test]
fn sampler_names_match_generate() {
    for k in SamplerKind::ALL {
        assert_eq!(k.name().parse::<SamplerKind>().unwrap(), k);
    }
    assert_eq!("RF-Heun".parse::<SamplerKind>().unwrap(), SamplerKind::Heun);
    assert!("euler".parse::<SamplerKind>().unwrap_err().contains("rf-euler"));
}
