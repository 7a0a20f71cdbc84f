//! `ditmoe eval` end to end on a tiny 3-class, 28×28 dataset: fit the classifier, train a tiny
//! pixel model for a few steps (28 padded to 32), then score its samples, once and over a
//! sweep; and the measures on synthetic features: k-NN precision and recall, per-class
//! Fréchet distance, the disjoint real subsets.
use candle_core::{Device, Tensor};
use ditmoe::eval::frechet::per_class_frechet;
use ditmoe::eval::{precision_recall, RealSubsets};
use ditmoe::train::{TrainConfig, Trainer};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::{Path, PathBuf};

use crate::common;
use common::scratch_dir;

/// Three trivially separable classes: dark, mid-grey and bright squares on black.
fn write_split(root: &Path, per_class: u32) {
    for class in 0..3u32 {
        let dir = root.join(format!("{class}_c"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let img = image::GrayImage::from_fn(28, 28, |x, y| {
                let inside = (6..22).contains(&x) && (6..22).contains(&y);
                image::Luma([if inside { (60 + 80 * class + (i * 3 + x + y) % 10) as u8 } else { 0 }])
            });
            img.save(dir.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// Writes the dataset under `root` and trains a tiny rectified-flow model for 3 steps; returns
/// its exported folder.
fn tiny_model(root: &Path) -> PathBuf {
    write_split(&root.join("train"), 12);
    write_split(&root.join("test"), 6);
    std::fs::write(
        root.join("model.json"),
        r#"{"input_size":32,"patch_size":8,"in_channels":1,"hidden_size":32,"depth":1,"num_heads":2,"mlp_ratio":2,
        "class_dropout_prob":0.1,"num_classes":3,"num_experts":2,"num_experts_per_tok":1,"learn_sigma":false,"n_shared_experts":1}"#,
    )
    .unwrap();
    let cfg: TrainConfig = serde_json::from_value(serde_json::json!({
        "model": root.join("model.json"), "data": root.join("train"), "out": root.join("run"),
        "objective": "rf", "image_size": 28, "global_batch": 12, "steps": 3, "lr": 1e-3, "num_workers": 0,
    }))
    .unwrap();
    Trainer::new(cfg, &ditmoe::ExecutionPlan::training(&Device::Cpu, ditmoe::Precision::F32), ditmoe::train::RunStart::New).unwrap().run(false).unwrap().ema_dir
}

#[test]
fn eval_reports_accuracy_and_frechet_distance() {
    let scratch = scratch_dir("eval");
    let root = scratch.to_path_buf();
    let model_dir = tiny_model(&root);

    let (clf, report) = (root.join("clf"), root.join("report.json"));
    let grid = root.join("grid.png");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ditmoe"))
        .args(["eval", "--model", &s(&model_dir), "--data", &s(&root.join("test")), "--classifier", &s(&clf)])
        .args(["--fit-classifier", &s(&root.join("train")), "--epochs", "8", "--per-class", "4", "--steps", "2"])
        .args(["--cfg-scale", "1.5", "--json", &s(&report), "--grid", &s(&grid)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(clf.join("model.safetensors").is_file() && clf.join("classifier.json").is_file());
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // Three separable classes: the classifier must learn them.
    assert!(r["real_accuracy"].as_f64().unwrap() > 0.9, "{r}");
    let gen = r["generated_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&gen), "{r}");
    assert_eq!(r["generated_per_class"].as_array().unwrap().len(), 3);
    let fd = r["frechet_distance"].as_f64().unwrap();
    assert!(fd.is_finite() && fd >= -1e-6, "{r}");
    // Test split of 6 per class, 4 generated per class: real subsets of 3 + 3 per class.
    assert_eq!(r["real_subsets"]["per_class"], serde_json::json!([3, 3, 3]), "{r}");
    // An untrained model's samples are far from the real images; real subsets are close.
    let (subset, real) = (r["frechet_distance_subset"].as_f64().unwrap(), r["frechet_distance_real"].as_f64().unwrap());
    assert!(subset > real && real >= -1e-6, "{r}");
    assert!((r["frechet_ratio"].as_f64().unwrap() - subset / real).abs() < 1e-9, "{r}");
    assert_eq!(r["frechet_per_class"].as_array().unwrap().len(), 3);
    assert_eq!(r["frechet_real_per_class"].as_array().unwrap().len(), 3);
    for key in ["precision_recall", "precision_recall_real"] {
        let pr = &r[key];
        assert_eq!(pr["k"], 3, "{r}");
        assert!(["precision", "recall"].iter().all(|m| (0.0..=1.0).contains(&pr[m].as_f64().unwrap())), "{r}");
    }
    assert_eq!(r["samples"]["sampler"], "rf-euler", "{r}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("precision / recall") && stdout.contains("real vs real"), "{stdout}");
    let png = image::open(&grid).unwrap();
    // One row per class, 4 columns of 32 px with 2 px padding.
    assert_eq!((png.width(), png.height()), (4 * 34 + 2, 3 * 34 + 2));
}

/// n rows of d-dimensional N(mean, sd²) features from a seeded generator.
fn gaussian(n: usize, d: usize, mean: f32, sd: f32, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * d).map(|_| { let z: f32 = StandardNormal.sample(&mut rng); mean + sd * z }).collect();
    Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
}

#[test]
fn precision_recall_of_identical_shifted_and_collapsed_sets() {
    let real = gaussian(400, 16, 0.0, 1.0, 1);
    // Every generated point sits on a real one: inside both manifolds.
    let same = precision_recall(&real, &real, 3).unwrap();
    assert_eq!((same.precision, same.recall), (1.0, 1.0));
    // A fresh draw of the same distribution: mostly inside both.
    let fresh = precision_recall(&real, &gaussian(400, 16, 0.0, 1.0, 2), 3).unwrap();
    assert!(fresh.precision > 0.6 && fresh.recall > 0.6, "{fresh:?}");
    // Shifted off the data by 2 in every coordinate (8 standard deviations in all): not precise.
    let shifted = precision_recall(&real, &gaussian(400, 16, 2.0, 1.0, 3), 3).unwrap();
    assert!(shifted.precision < 0.1, "{shifted:?}");
    // Collapsed onto the mode: precise, but covering little of the data.
    let collapsed = precision_recall(&real, &gaussian(400, 16, 0.0, 0.1, 4), 3).unwrap();
    assert!(collapsed.precision > 0.9 && collapsed.recall < 0.1, "{collapsed:?}");
    // Neighbourhoods need more than k points.
    assert!(precision_recall(&real, &gaussian(3, 16, 0.0, 1.0, 5), 3).is_err());
}

#[test]
fn per_class_frechet_of_identical_sets_is_zero() {
    let labels: Vec<u32> = (0..3).flat_map(|c| std::iter::repeat_n(c, 60)).collect();
    let x = gaussian(180, 8, 0.0, 1.0, 7);
    let fd = per_class_frechet(&x, &labels, &x, &labels, 3).unwrap();
    assert!(fd.iter().all(|d| d.abs() < 1e-6), "{fd:?}");
    // Shifting class 1 alone by 1 in every coordinate adds |dmu|² = 8 to its distance only.
    let shift = Tensor::new((0..180).map(|i| if (60..120).contains(&i) { 1f32 } else { 0.0 }).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let moved = x.broadcast_add(&shift.unsqueeze(1).unwrap()).unwrap();
    let fd = per_class_frechet(&moved, &labels, &x, &labels, 3).unwrap();
    assert!(fd[0].abs() < 1e-6 && fd[2].abs() < 1e-6 && (fd[1] - 8.0).abs() < 1e-6, "{fd:?}");
    // A class with a single row has no covariance.
    assert!(per_class_frechet(&x, &labels, &x.narrow(0, 0, 121).unwrap(), &labels[..121], 3).is_err());
}

#[test]
fn real_subsets_are_disjoint_stratified_and_seeded() {
    // Classes of 10, 7 and 12 images, interleaved as folders never are.
    let mut labels: Vec<u32> = [(0, 10), (1, 7), (2, 12)].iter().flat_map(|&(c, n)| std::iter::repeat_n(c, n)).collect();
    labels.rotate_left(5);
    let s = RealSubsets::draw(&labels, 3, 4, 0).unwrap();
    // Capped at half of each class: 7 images give 3 + 3.
    assert_eq!(s.per_class, vec![4, 3, 4]);
    assert_eq!(s.a.len(), 11);
    assert_eq!(s.b.len(), 11);
    let mut all: Vec<u32> = s.a.iter().chain(&s.b).copied().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 22, "a and b share no image");
    let want = s.labels();
    assert!(s.a.iter().zip(&want).all(|(&i, &l)| labels[i as usize] == l) && s.b.iter().zip(&want).all(|(&i, &l)| labels[i as usize] == l));
    assert_eq!(RealSubsets::draw(&labels, 3, 4, 0).unwrap(), s, "the same seed draws the same subsets");
    assert_ne!(RealSubsets::draw(&labels, 3, 4, 1).unwrap().a, s.a, "another seed draws others");
    let err = RealSubsets::draw(&labels, 4, 4, 0).unwrap_err().to_string();
    assert!(err.contains("class 3 has 0 real images"), "{err}");
}

#[test]
fn eval_sweep_writes_its_table_and_chart() {
    let scratch = scratch_dir("eval-sweep");
    let root = scratch.to_path_buf();
    let model_dir = tiny_model(&root);
    write_split(&root.join("test"), 6);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let eval = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ditmoe"))
            .args(["eval", "--model", &s(&model_dir), "--data", &s(&root.join("test")), "--classifier", &s(&root.join("clf"))])
            .args(["--per-class", "4"])
            .args(extra)
            .output()
            .unwrap()
    };
    let report = root.join("report.json");
    let sweep = ["--sweep", "cfg=1,3", "steps=2", "interval=0-1,0.2-0.8"];
    let out = eval(&[&["--fit-classifier", &s(&root.join("train")), "--epochs", "4", "--json", &s(&report)][..], &sweep].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let reports: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let cfgs: Vec<f64> = reports.as_array().unwrap().iter().map(|r| r["samples"]["cfg_scale"].as_f64().unwrap()).collect();
    assert_eq!(cfgs, vec![1.0, 3.0, 1.0, 3.0]);
    // Every level (0-1) is recorded as no interval.
    let intervals: Vec<&serde_json::Value> = reports.as_array().unwrap().iter().map(|r| &r["samples"]["guidance_interval"]).collect();
    let (everywhere, limited) = (serde_json::Value::Null, serde_json::json!([0.2, 0.8]));
    assert_eq!(intervals, vec![&everywhere, &everywhere, &limited, &limited]);
    // Beside the report: the table and the chart.
    let table = std::fs::read_to_string(root.join("report-sweep.md")).unwrap();
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| rf-euler | 2 |")).collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(rows[0].starts_with("| rf-euler | 2 | 1 | [0, 1] |") && rows[3].starts_with("| rf-euler | 2 | 3 | [0.2, 0.8] |"), "{table}");
    assert!(table.contains("Real vs real (9 + 9 disjoint real images"), "{table}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(rows[0]));
    let png = image::open(root.join("report-sweep.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1400, 600));
    // A malformed sweep fails before sampling, naming the flag.
    for bad in [
        &["--sweep", "cfg=1,x"][..],
        &["--sweep", "steps=2", "--steps", "3"],
        &["--sweep", "interval=0.8-0.2"],
        &["--sweep", "interval=0-1", "--guidance-interval", "0.2,0.8"],
    ] {
        let out = eval(bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("--sweep") || stderr.contains("--steps") || stderr.contains("--guidance-interval"), "{stderr}");
    }
}
