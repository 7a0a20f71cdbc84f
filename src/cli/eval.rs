//! `ditmoe eval`: scores a class-conditional pixel model with the Fashion-MNIST classifier
//! (`--fit-classifier TRAIN_DIR` trains that classifier first).
use super::usage;
use clap::Args;
use ditmoe::checkpoint::ModelDir;
use ditmoe::eval::fit::{accuracy, fit, load, FitOptions};
use ditmoe::eval::images::load_split;
use ditmoe::eval::report::{class_grid, generate, score};
use ditmoe::eval::{classifier::SIDE, SampleOptions};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model folder to evaluate (its generate.json gives the default steps and guidance).
    #[arg(long, default_value = "assets/fashion-mnist")]
    model: PathBuf,
    /// Real test split (class folders).
    #[arg(long)]
    data: PathBuf,
    /// Classifier folder (model.safetensors + classifier.json).
    #[arg(long, default_value = "assets/fashion-mnist-classifier")]
    classifier: PathBuf,
    /// Train the classifier on these class folders first (and write it to --classifier).
    #[arg(long)]
    fit_classifier: Option<PathBuf>,
    /// Epochs of classifier training with --fit-classifier.
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Generated samples per class.
    #[arg(long, default_value_t = 100)]
    per_class: usize,
    /// rf-euler steps [default: generate.json's, else 30].
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale [default: generate.json's, else 1.5].
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// Seed of the sampling noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images sampled per forward batch.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Write a grid (one row per class, 8 samples) here.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only (fit and) test the classifier; generate nothing.
    #[arg(long)]
    classifier_only: bool,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let device = super::device(&a.device)?;
    let (test_x, test_y, names) = load_split(&a.data, SIDE, &device)?;
    if let Some(train_dir) = &a.fit_classifier {
        let (train_x, train_y, train_names) = load_split(train_dir, SIDE, &device)?;
        if train_names != names {
            return Err(usage(format!("{} and {} have different classes", train_dir.display(), a.data.display())));
        }
        let opts = FitOptions { epochs: a.epochs, batch: 128, lr: 1e-3, seed: a.seed };
        let t = Instant::now();
        fit((&train_x, &train_y), (&test_x, &test_y), names.len(), &opts, &a.classifier, &mut |e, loss, acc| {
            eprintln!("classifier epoch {e}: loss {loss:.4}, test accuracy {:.2}% ({:.0} s)", 100.0 * acc, t.elapsed().as_secs_f64());
        })?;
    }
    let (clf, _) = load(&a.classifier, &device)?;
    if a.classifier_only {
        println!("classifier test accuracy {:.2}%", 100.0 * accuracy(&clf, &test_x, &test_y)?);
        return Ok(());
    }
    let dir = ModelDir::open(&a.model)?;
    if dir.config.in_channels != 1 || dir.config.num_classes != names.len() {
        return Err(usage(format!("{}: eval needs a 1-channel model with {} classes", a.model.display(), names.len())));
    }
    let defaults: serde_json::Value = std::fs::read_to_string(a.model.join("generate.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let steps = a.steps.or(defaults["steps"].as_u64().map(|s| s as usize)).unwrap_or(30);
    let cfg_scale = a.cfg_scale.or(defaults["cfg_scale"].as_f64()).unwrap_or(1.5);
    let model = dir.load(&ditmoe::ExecutionPlan::inference(&device, ditmoe::Precision::F32))?;
    let opts = SampleOptions { per_class: a.per_class, steps, cfg_scale, seed: a.seed, batch: a.batch };
    let t = Instant::now();
    let samples = generate(&model, &opts, &device)?;
    let secs = t.elapsed().as_secs_f64();
    if let Some(path) = &a.grid {
        class_grid(&samples, a.per_class, names.len(), 8)?.write_png(path)?;
    }
    let report = score(&clf, &test_x, &test_y, &samples, names, opts, secs)?;
    println!("real test accuracy      {:.2}%", 100.0 * report.real_accuracy);
    println!("generated accuracy      {:.2}% ({:.1}% of real)", 100.0 * report.generated_accuracy, 100.0 * report.relative_accuracy);
    for (i, name) in report.class_names.iter().enumerate() {
        println!("  {name:<12} real {:6.2}%  generated {:6.2}%", 100.0 * report.real_per_class[i], 100.0 * report.generated_per_class[i]);
    }
    println!("Fréchet distance        {:.3} (real vs real at this size: {:.3})", report.frechet_distance, report.frechet_distance_real_halves);
    println!("sampling                {:.1} s for {} images ({} steps, cfg {})", secs, samples.dim(0)?, steps, cfg_scale);
    if let Some(path) = &a.json {
        ditmoe::checkpoint::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    Ok(())
}
