//! `ditmoe eval`: scores a class-conditional pixel model with the Fashion-MNIST classifier
//! (`--fit-classifier TRAIN_DIR` trains that classifier first), once or over a `--sweep` of
//! guidance scales, step counts and guidance intervals.
use super::usage;
use clap::Args;
use ditmoe::analysis::tradeoff::tradeoff_chart;
use ditmoe::analysis::{RunDefaults, SamplerKind};
use ditmoe::checkpoint::{write_atomic, ModelDir};
use ditmoe::eval::fit::{accuracy, fit, load, FitOptions};
use ditmoe::eval::images::load_split;
use ditmoe::eval::report::{class_grid, generate, score};
use ditmoe::eval::sweep::{markdown_table, tradeoff_series};
use ditmoe::eval::{classifier::SIDE, EvalReport, RealReference, SampleOptions};
use ditmoe::sampling::GuidanceInterval;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model folder to evaluate (its generate.json gives the default sampler, steps and guidance).
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
    /// Generated samples per class (at least 2).
    #[arg(long, default_value_t = 100)]
    per_class: usize,
    /// ddpm, ddim, dpm++2m, rf-euler or rf-heun [default: generate.json's, else ddpm].
    #[arg(long)]
    sampler: Option<String>,
    /// Sampling steps [default: generate.json's for its sampler, else the sampler's official count].
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale [default: generate.json's, else 4].
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// Guide only at noise levels in [LO, HI] (1 = pure noise), e.g. 0.2,0.8, as `ditmoe
    /// generate` [default: generate.json's, else every level].
    #[arg(long, value_name = "LO,HI", allow_hyphen_values = true)]
    guidance_interval: Option<String>,
    /// Evaluate every combination of guidance scales, step counts and guidance intervals, e.g.
    /// `--sweep cfg=1,1.5,2,3,4 steps=10,20,30 interval=0-1,0.2-0.8` (interval `0-1`: every
    /// level); an axis left out takes --cfg-scale/--steps/--guidance-interval.
    #[arg(long, num_args = 1..=3, value_name = "AXIS=LIST", conflicts_with = "grid")]
    sweep: Vec<String>,
    /// The sweep's trade-off chart (PNG); its markdown table goes beside it (.md)
    /// [default: beside --json as NAME-sweep.png, else eval-sweep.png].
    #[arg(long, requires = "sweep")]
    sweep_out: Option<PathBuf>,
    /// Seed of the sampling noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images sampled per forward batch.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Write a grid (one row per class, 8 samples) here.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Write the report as JSON here (with --sweep, the list of reports).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only (fit and) test the classifier; generate nothing.
    #[arg(long)]
    classifier_only: bool,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// The axes a `--sweep` gives (every guidance scale runs with every step count and every
/// guidance interval); an axis left out is `None`.
#[derive(Debug, PartialEq)]
struct Sweep {
    cfg: Option<Vec<f64>>,
    steps: Option<Vec<usize>>,
    /// None within: every level (`0-1`).
    interval: Option<Vec<Option<GuidanceInterval>>>,
}

/// One `interval=` value, `LO-HI`: the one split at a `-` that leaves a number on either side,
/// so that a bound written `1e-3` parses; `0-1` (every level) is None, as no interval.
fn parse_interval(value: &str) -> Result<Option<GuidanceInterval>, String> {
    let mut splits = value.match_indices('-').filter_map(|(at, _)| Some((value[..at].parse::<f64>().ok()?, value[at + 1..].parse::<f64>().ok()?)));
    let (Some((lo, hi)), None) = (splits.next(), splits.next()) else {
        return Err(format!("`{value}` is not LO-HI (two noise levels, e.g. 0.2-0.8)"));
    };
    let interval = GuidanceInterval::new(lo, hi).map_err(|e| e.to_string())?;
    Ok(Some(interval).filter(|i| !i.is_everywhere()))
}

/// Parses `--sweep`'s `cfg=LIST`, `steps=LIST` and `interval=LIST` (comma-separated).
fn parse_sweep(specs: &[String]) -> anyhow::Result<Sweep> {
    let (mut cfgs, mut stepss): (Option<Vec<f64>>, Option<Vec<usize>>) = (None, None);
    let mut intervals = None;
    for spec in specs {
        let (axis, list) =
            spec.split_once('=').ok_or_else(|| usage(format!("--sweep: `{spec}` is not cfg=LIST, steps=LIST or interval=LIST")))?;
        let values: Vec<&str> = list.split(',').map(str::trim).collect();
        if values.iter().any(|v| v.is_empty()) {
            return Err(usage(format!("--sweep: empty value in `{spec}`")));
        }
        match axis.trim() {
            "cfg" if cfgs.is_none() => {
                cfgs = Some(
                    values
                        .iter()
                        .map(|v| v.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| usage(format!("--sweep: cfg `{v}` in `{spec}` is not a number"))))
                        .collect::<anyhow::Result<_>>()?,
                )
            }
            "steps" if stepss.is_none() => {
                stepss = Some(
                    values
                        .iter()
                        .map(|v| v.parse::<usize>().ok().filter(|&n| n >= 1).ok_or_else(|| usage(format!("--sweep: steps `{v}` in `{spec}` is not a positive integer"))))
                        .collect::<anyhow::Result<_>>()?,
                )
            }
            "interval" if intervals.is_none() => {
                intervals = Some(
                    values
                        .iter()
                        .map(|v| parse_interval(v).map_err(|e| usage(format!("--sweep: interval in `{spec}`: {e}"))))
                        .collect::<anyhow::Result<_>>()?,
                )
            }
            "cfg" | "steps" | "interval" => return Err(usage(format!("--sweep: {} given twice", axis.trim()))),
            other => return Err(usage(format!("--sweep: unknown axis `{other}` in `{spec}` (cfg, steps or interval)"))),
        }
    }
    Ok(Sweep { cfg: cfgs, steps: stepss, interval: intervals })
}

/// The PNG of a sweep: `--sweep-out`, else beside the JSON report, else in the working folder.
fn sweep_png(a: &EvalArgs) -> PathBuf {
    match (&a.sweep_out, &a.json) {
        (Some(p), _) => p.clone(),
        (None, Some(json)) => json.with_file_name(format!("{}-sweep.png", json.file_stem().unwrap_or_default().to_string_lossy())),
        (None, None) => PathBuf::from("eval-sweep.png"),
    }
}

fn print_report(r: &EvalReport, n_images: usize) {
    let (pr, prr) = (&r.precision_recall, &r.precision_recall_real);
    let n_real: usize = r.real_subsets.per_class.iter().sum();
    println!("real test accuracy      {:.2}%", 100.0 * r.real_accuracy);
    println!("generated accuracy      {:.2}% ({:.1}% of real)", 100.0 * r.generated_accuracy, 100.0 * r.relative_accuracy);
    println!("Fréchet distance        {:.3} (generated vs the whole real split)", r.frechet_distance);
    println!(
        "  at equal size         {:.3} generated vs {n_real} real; {:.3} real vs real ({n_real} + {n_real} disjoint, seed {}): ratio {:.2}",
        r.frechet_distance_subset, r.frechet_distance_real, r.real_subsets.seed, r.frechet_ratio
    );
    println!("precision / recall      {:.3} / {:.3} (k = {}; real vs real {:.3} / {:.3})", pr.precision, pr.recall, pr.k, prr.precision, prr.recall);
    println!("  {:<12} {:>8} {:>10} {:>8} {:>8}", "class", "real", "generated", "FD", "FD real");
    for (i, name) in r.class_names.iter().enumerate() {
        println!(
            "  {name:<12} {:7.2}% {:9.2}% {:8.2} {:8.2}",
            100.0 * r.real_per_class[i],
            100.0 * r.generated_per_class[i],
            r.frechet_per_class[i],
            r.frechet_real_per_class[i]
        );
    }
    let o = &r.samples;
    let interval = GuidanceInterval::describe(o.guidance_interval);
    println!("sampling                {:.1} s for {n_images} images ({} {} steps, cfg {}{interval})", r.sampling_seconds, o.sampler, o.steps, o.cfg_scale);
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
    if a.per_class < 2 {
        return Err(usage(format!("--per-class: {} is fewer than the 2 samples per class the per-class Fréchet distance needs", a.per_class)));
    }
    let dir = ModelDir::open(&a.model)?;
    if dir.config.in_channels != 1 || dir.config.num_classes != names.len() {
        return Err(usage(format!("{}: eval needs a 1-channel model with {} classes", a.model.display(), names.len())));
    }
    let sampler = a.sampler.as_deref().map(str::parse::<SamplerKind>).transpose().map_err(|e| usage(format!("--sampler: {e}")))?;
    let defaults = RunDefaults::read(&a.model, sampler)?;
    let steps = a.steps.unwrap_or(defaults.steps);
    let cfg_scale = a.cfg_scale.unwrap_or(defaults.cfg_scale);
    let guidance_interval = super::guidance_interval(a.guidance_interval.as_deref(), || Ok(defaults.guidance_interval))?;
    let sweep = parse_sweep(&a.sweep)?;
    if sweep.cfg.is_some() && a.cfg_scale.is_some() {
        return Err(usage("--cfg-scale: --sweep's cfg list sets the guidance; give one or the other"));
    }
    if sweep.steps.is_some() && a.steps.is_some() {
        return Err(usage("--steps: --sweep's steps list sets the steps; give one or the other"));
    }
    if sweep.interval.is_some() && a.guidance_interval.is_some() {
        return Err(usage("--guidance-interval: --sweep's interval list sets the guidance interval; give one or the other"));
    }
    let steps_flag = if sweep.steps.is_some() { "--sweep" } else { "--steps" };
    let (cfg_list, steps_list) = (sweep.cfg.unwrap_or_else(|| vec![cfg_scale]), sweep.steps.unwrap_or_else(|| vec![steps]));
    let interval_list = sweep.interval.unwrap_or_else(|| vec![guidance_interval]);
    for &s in &steps_list {
        defaults.sampler.build(s, &dir.config, true).map_err(|e| usage(format!("{steps_flag}: {} with {s} steps: {e}", defaults.sampler)))?;
    }
    let model = dir.load(&ditmoe::ExecutionPlan::inference(&device, ditmoe::Precision::F32))?;
    let reference = RealReference::new(&clf, &test_x, &test_y, names, a.per_class)?;
    let mut reports = Vec::new();
    // Each (steps, interval) pair's guidance scales run one after the other: one line of the chart.
    for &steps in &steps_list {
        for &guidance_interval in &interval_list {
            for &cfg_scale in &cfg_list {
                let opts = SampleOptions { per_class: a.per_class, sampler: defaults.sampler, steps, cfg_scale, guidance_interval, seed: a.seed, batch: a.batch };
                let t = Instant::now();
                let samples = generate(&model, &opts, &device)?;
                let secs = t.elapsed().as_secs_f64();
                if let Some(path) = &a.grid {
                    class_grid(&samples, a.per_class, reference.class_names.len(), 8)?.write_png(path)?;
                }
                let report = score(&clf, &reference, &samples, opts, secs)?;
                if a.sweep.is_empty() {
                    print_report(&report, samples.dim(0)?);
                } else {
                    eprintln!(
                        "{steps} steps, cfg {cfg_scale}{}: accuracy {:.1}%, Fréchet ratio {:.2}, precision {:.3}, recall {:.3} ({secs:.0} s)",
                        GuidanceInterval::describe(guidance_interval),
                        100.0 * report.generated_accuracy,
                        report.frechet_ratio,
                        report.precision_recall.precision,
                        report.precision_recall.recall
                    );
                }
                reports.push(report);
            }
        }
    }
    if let Some(path) = &a.json {
        let json = if a.sweep.is_empty() { serde_json::to_string_pretty(&reports[0])? } else { serde_json::to_string_pretty(&reports)? };
        write_atomic(path, json.as_bytes())?;
    }
    if !a.sweep.is_empty() {
        write_sweep(&a, &reports)?;
    }
    Ok(())
}

/// Prints the sweep's table, writes it beside the chart, and draws the chart.
fn write_sweep(a: &EvalArgs, reports: &[EvalReport]) -> anyhow::Result<()> {
    let table = markdown_table(reports);
    print!("{table}");
    let png = sweep_png(a);
    let o = &reports[0].samples;
    let n = o.per_class * reports[0].class_names.len();
    let title = format!("{}: {}, {n} samples, seed {}", a.model.display(), o.sampler, o.seed);
    let chart = tradeoff_chart(&title, &tradeoff_series(reports))?;
    ditmoe::analysis::heatmap::save_png(&chart, &png).map_err(|e| usage(format!("--sweep-out: {e}")))?;
    write_atomic(&png.with_extension("md"), table.as_bytes())?;
    eprintln!("wrote {} and {}", png.display(), png.with_extension("md").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_axes_parse_and_malformed_ones_name_the_flag() {
        let specs = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_sweep(&specs(&["cfg=1,1.5", "steps=10,20"])).unwrap(),
            Sweep { cfg: Some(vec![1.0, 1.5]), steps: Some(vec![10, 20]), interval: None }
        );
        assert_eq!(parse_sweep(&specs(&["steps=10"])).unwrap(), Sweep { cfg: None, steps: Some(vec![10]), interval: None });
        let interval = |lo, hi| Some(GuidanceInterval::new(lo, hi).unwrap());
        // 0-1 is every level, as no interval; a bound may be written with an exponent.
        assert_eq!(
            parse_sweep(&specs(&["interval=0-1,0.1-0.7, 0.2-0.8,1e-3-0.5", "cfg=2"])).unwrap(),
            Sweep { cfg: Some(vec![2.0]), steps: None, interval: Some(vec![None, interval(0.1, 0.7), interval(0.2, 0.8), interval(1e-3, 0.5)]) }
        );
        for bad in [
            &["cfg"][..],
            &["cfg=1,,2"],
            &["cfg=x"],
            &["steps=0"],
            &["seed=1"],
            &["cfg=1", "cfg=2"],
            &["interval=0.2"],
            &["interval=0.2,0.8"],
            &["interval=0.8-0.2"],
            &["interval=-0.1-0.5"],
            &["interval=0.2-1.5"],
            &["interval=NaN-0.5"],
            &["interval=0-0.5-1"],
            &["interval=0-1", "interval=0.2-0.8"],
        ] {
            let err = parse_sweep(&specs(bad)).unwrap_err().to_string();
            assert!(err.starts_with("--sweep: "), "{bad:?}: {err}");
        }
    }
}
