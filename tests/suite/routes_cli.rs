//! `ditmoe routes` on the `pixel` fixture model: every output file, consistent with each
//! other and with the saved trajectory, and bad flags as one-line usage errors.
use crate::common;

use common::{fixture_path, scratch_dir};
use ditmoe::analysis::aggregate::load_by_step;
use ditmoe::analysis::RoutingTrajectory;
use std::process::Command;

fn ditmoe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ditmoe")).args(args).output().unwrap()
}

#[test]
fn routes_writes_heatmaps_tables_and_the_trajectory() {
    let out = scratch_dir("routes-cli");
    let model = fixture_path("models/pixel");
    let o = ditmoe(&[
        "routes", "--model", model.to_str().unwrap(), "--class", "2,5", "--num", "2", "--sampler", "ddim", "--steps", "10",
        "--cfg-scale", "3", "--guidance-interval", "0,0.7", "--seed", "4", "--batch-size", "3", "--out", out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("4 images (2 classes x 2)") && stdout.contains("ddim 10 steps") && stdout.contains("cfg 3 at levels [0, 0.7]"), "{stdout}");

    for png in ["by_step.png", "by_patch.png", "by_class.png", "entropy.png"] {
        let img = image::open(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(img.width() >= 50 && img.height() >= 30, "{png} is {}x{}", img.width(), img.height());
    }
    // samples.png: the 2 x 2 grid of 16 px images with 2 px padding.
    assert_eq!(image::open(out.join("samples.png")).unwrap().width(), 2 * 18 + 2);

    let traj = RoutingTrajectory::load(&out).unwrap();
    let d = traj.dims();
    assert_eq!((d.images, d.steps, d.layers, d.experts, d.grid), (4, 10, 2, 4, 8));
    assert_eq!(traj.meta.classes, vec![2, 2, 5, 5]);
    assert_eq!((traj.meta.seed, traj.meta.guidance, traj.meta.sampler.as_str()), (4, 3.0, "ddim"));
    assert_eq!(traj.meta.guidance_interval.map(|i| (i.lo(), i.hi())), Some((0.0, 0.7)));

    // routes.json holds the same numbers as the trajectory's aggregation.
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("routes.json")).unwrap()).unwrap();
    let layers = json["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    let by_step: Vec<Vec<f64>> = serde_json::from_value(layers[1]["load_by_step"].clone()).unwrap();
    assert_eq!(by_step, load_by_step(&traj, 1).to_rows());
    // Every step of every layer: 4 images x 64 tokens x top-2 selections.
    assert!(by_step.iter().all(|r| r.iter().sum::<f64>() == 4.0 * 64.0 * 2.0));
    let fractions: Vec<Vec<f64>> = serde_json::from_value(layers[0]["load_by_class"]["fractions"].clone()).unwrap();
    assert_eq!(fractions.len(), 2);
    assert!(fractions.iter().all(|r| (r.iter().sum::<f64>() - 1.0).abs() < 1e-9));
    let top: Vec<Vec<usize>> = serde_json::from_value(layers[0]["top_expert_by_patch"].clone()).unwrap();
    assert_eq!((top.len(), top[0].len()), (8, 8));
    assert_eq!(json["timesteps"].as_array().unwrap().len(), 10);
    assert_eq!(json["guidance_interval"], serde_json::json!([0.0, 0.7]));

    // The long CSVs: one line per (layer, step, expert) etc., summing to the same totals.
    let csv = std::fs::read_to_string(out.join("load_by_step.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("layer,step,timestep,expert,count"));
    let rows: Vec<Vec<String>> = lines.map(|l| l.split(',').map(String::from).collect()).collect();
    assert_eq!(rows.len(), 2 * 10 * 4);
    let layer1_step0: f64 = rows.iter().filter(|r| r[0] == "1" && r[1] == "0").map(|r| r[4].parse::<f64>().unwrap()).sum();
    assert_eq!(layer1_step0, 512.0);
    assert_eq!(std::fs::read_to_string(out.join("load_by_patch.csv")).unwrap().lines().count(), 1 + 2 * 64 * 4);
    assert_eq!(std::fs::read_to_string(out.join("load_by_class.csv")).unwrap().lines().count(), 1 + 2 * 2 * 4);
    assert_eq!(std::fs::read_to_string(out.join("entropy.csv")).unwrap().lines().count(), 1 + 2 * 10);
}

#[test]
fn routes_bad_flags_are_usage_errors() {
    let out = scratch_dir("routes-bad");
    let model = fixture_path("models/pixel");
    let m = model.to_str().unwrap();
    let o_dir = out.to_str().unwrap();
    for (args, needle) in [
        (vec!["--class", "12"], "out of range"),
        (vec!["--class", "shoe"], "`shoe`"),
        (vec!["--sampler", "euler"], "rf-euler"),
        (vec!["--sampler", "ddim", "--steps", "300"], "--steps"),
        (vec!["--num", "0"], "at least 1"),
        (vec!["--guidance-interval", "0.8,0.2"], "--guidance-interval"),
    ] {
        let mut full = vec!["routes", "--model", m, "--out", o_dir];
        full.extend(&args);
        let o = ditmoe(&full);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle) && err.lines().count() == 1, "{args:?}: {err}");
    }
    assert!(std::fs::read_dir(&out).unwrap().next().is_none(), "nothing written on a usage error");
}
