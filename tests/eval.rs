//! `ditmoe eval` end to end on a tiny 3-class, 28×28 dataset: fit the classifier, train a tiny
//! pixel model for a few steps (28 padded to 32), then score its samples.
use candle_core::Device;
use ditmoe::train::{TrainConfig, Trainer};
use std::path::Path;

mod common;
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

#[test]
fn eval_reports_accuracy_and_frechet_distance() {
    let scratch = scratch_dir("eval");
    let root = scratch.to_path_buf();
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
    let model_dir = Trainer::new(cfg, &ditmoe::ExecutionPlan::training(&Device::Cpu, ditmoe::Precision::F32), ditmoe::train::RunStart::New).unwrap().run(false).unwrap().ema_dir;

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
    // An untrained model's samples are far from the real images; real halves are close.
    assert!(fd > r["frechet_distance_real_halves"].as_f64().unwrap(), "{r}");
    let png = image::open(&grid).unwrap();
    // One row per class, 4 columns of 32 px with 2 px padding.
    assert_eq!((png.width(), png.height()), (4 * 34 + 2, 3 * 34 + 2));
}
