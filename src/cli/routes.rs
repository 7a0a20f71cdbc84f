//! `ditmoe routes`: records which experts a model routes every token to along whole sampling
//! runs and writes the official analysis views (feizc/DiT-MoE `analysis/heatmap_*.py`) as
//! PNG heatmaps, JSON and CSV, plus the trajectory itself for `explorer` and scripts.
//!
//! Inputs are checked before the model loads; the output folder is written file by file,
//! each atomically, once the run has finished.
use anyhow::Context;
use clap::Args;
use ditmoe::analysis::aggregate::{load_by_class, load_by_patch, load_by_step, load_entropy, top_expert_by_patch};
use ditmoe::analysis::figures::{class_figure, entropy_figure, patch_figure, step_figure};
use ditmoe::analysis::heatmap::{png_bytes, tile};
use ditmoe::analysis::store::{DATA_FILE, META_FILE};
use ditmoe::analysis::{record_trajectory, RecordRequest, RoutingTrajectory, RunDefaults, SamplerKind};
use ditmoe::checkpoint::{write_atomic, ModelDir};
use ditmoe::sampling::Images;
use indicatif::ProgressStyle;
use serde_json::json;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Panels per row of the per-layer figures (the official 2 x 6 layout for 12 layers).
const PANELS_PER_ROW: usize = 6;

#[derive(Args)]
pub struct RoutesArgs {
    /// Model folder (config.json + model.safetensors, optional class_names.json, generate.json).
    #[arg(long, default_value = "assets/fashion-mnist")]
    model: PathBuf,
    /// Classes: ids or names (any case), comma-separated, or `all`.
    #[arg(long, default_value = "all")]
    class: String,
    /// Images per class.
    #[arg(long, default_value_t = 1)]
    num: usize,
    /// ddpm, ddim, rf-euler or rf-heun [default: the model's generate.json, else ddpm].
    #[arg(long)]
    sampler: Option<String>,
    /// Sampling steps [default: generate.json's, else 250 for ddpm/ddim, 50 for rf-*].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; 1 = none [default: generate.json's, else 4.0].
    #[arg(long, allow_hyphen_values = true)]
    cfg_scale: Option<f64>,
    /// Guide only the evaluations whose noise level (1 = pure noise: the flow time t, or the
    /// DDPM/DDIM timestep / 1000) lies in [LO, HI], e.g. 0.2,0.8, as `generate` does
    /// [default: generate.json's, else every evaluation].
    #[arg(long, value_name = "LO,HI", allow_hyphen_values = true)]
    guidance_interval: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per model batch (the record does not depend on it).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Output folder (created): PNG heatmaps, routes.json, CSVs, trajectory.{json,safetensors}.
    #[arg(long, default_value = "routes")]
    out: PathBuf,
    /// For a language model (a folder with tokenizer.json): the text whose tokens' experts are
    /// shown, as `ditmoe lm routes` does; the map goes to OUT/routes.png.
    #[arg(long)]
    prompt: Option<String>,
}

/// The message of a library error without the backtrace candle appends to it when
/// RUST_BACKTRACE is set: usage errors are one line.
fn first_line(e: impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

pub fn run(a: RoutesArgs) -> anyhow::Result<()> {
    if a.model.join(ditmoe::lm::trainer::TOKENIZER_FILE).is_file() {
        let prompt = a.prompt.as_deref().ok_or_else(|| super::usage(format!("--model {} is a language model (it has tokenizer.json): give --prompt TEXT", a.model.display())))?;
        std::fs::create_dir_all(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
        return super::lm::prompt_routes(&a.model, prompt, Some(&a.out.join("routes.png")), &a.device, &a.dtype);
    }
    if a.prompt.is_some() {
        return Err(super::usage(format!("--prompt is for language models; {} is an image model (no tokenizer.json)", a.model.display())));
    }
    let dir = ModelDir::open(&a.model).map_err(|e| super::usage(format!("--model: {}", first_line(e))))?;
    let cfg = dir.config.clone();
    let sampler = a.sampler.as_deref().map(str::parse::<SamplerKind>).transpose().map_err(|e| super::usage(format!("--sampler: {e}")))?;
    let defaults = RunDefaults::read(&dir.dir, sampler).map_err(|e| super::usage(first_line(e)))?;
    let classes = super::parse_classes(&a.class, cfg.num_classes, dir.class_names.as_deref())?;
    let guidance_interval = super::guidance_interval(a.guidance_interval.as_deref(), || Ok(defaults.guidance_interval))?;
    if a.num == 0 || a.batch_size == 0 {
        return Err(super::usage("--num and --batch-size must be at least 1"));
    }
    let req = RecordRequest {
        classes: classes.iter().flat_map(|&c| std::iter::repeat_n(c, a.num)).collect(),
        seed: a.seed,
        sampler: defaults.sampler,
        steps: a.steps.unwrap_or(defaults.steps),
        guidance: a.cfg_scale.unwrap_or(defaults.cfg_scale),
        guidance_interval,
        batch_size: a.batch_size,
    };
    // Sampler and guidance problems (DDIM stride, missing null class) before the model loads.
    req.sampler.build(req.steps, &cfg, cfg.is_pixel_space()).map_err(|e| super::usage(format!("--steps: {}", first_line(e))))?;
    if req.guidance != 1.0 && cfg.label_table_rows() == cfg.num_classes {
        return Err(super::usage(format!("--cfg-scale {}: the model has no null class; use --cfg-scale 1", req.guidance)));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| super::usage(format!("--out {}: {e}", a.out.display())))?;
    let plan = super::inference_plan(&a.device, &a.dtype)?;
    let device = plan.device.clone();
    let model = dir.load(&plan)?;

    let bar = ditmoe::progress::bar(0);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} evaluations, eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    let traj = record_trajectory(&model, &a.model.display().to_string(), dir.class_names.clone(), &req, &device, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
    })
    .context("sampling")?;
    bar.finish_and_clear();

    let written = write_outputs(&traj, &a.out, a.num)?;
    println!(
        "wrote {} files to {}: {} images ({} classes x {}), {} {} steps ({} evaluations), {}, {} layers x {} experts",
        written.len(),
        a.out.display(),
        traj.dims().images,
        classes.len(),
        a.num,
        req.sampler,
        req.steps,
        traj.dims().steps,
        traj.meta.guidance_label(),
        traj.dims().layers,
        traj.dims().experts
    );
    Ok(())
}

/// The output folder, counting what is written into it.
struct Outputs<'a> {
    dir: &'a Path,
    written: Vec<String>,
}

impl Outputs<'_> {
    fn bytes(&mut self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        write_atomic(&self.dir.join(name), bytes)?;
        self.written.push(name.to_string());
        Ok(())
    }
    fn png(&mut self, name: &str, img: &image::RgbImage) -> anyhow::Result<()> {
        self.bytes(name, &png_bytes(img)?)
    }
}

/// Every output file of a trajectory; returns their names.
fn write_outputs(traj: &RoutingTrajectory, out: &Path, per_class: usize) -> anyhow::Result<Vec<String>> {
    let d = traj.dims();
    let mut o = Outputs { dir: out, written: Vec::new() };
    traj.save(out)?;
    o.written.extend([META_FILE.to_string(), DATA_FILE.to_string()]);

    let step_panels: Vec<_> = (0..d.layers).map(|l| step_figure(traj, l, None).render()).collect();
    o.png("by_step.png", &tile(&step_panels, PANELS_PER_ROW, "expert load by timestep"))?;
    let patch_panels = (0..d.layers).map(|l| Ok(patch_figure(traj, l)?.render())).collect::<candle_core::Result<Vec<_>>>()?;
    o.png("by_patch.png", &tile(&patch_panels, PANELS_PER_ROW, "most-chosen expert by patch"))?;
    let class_panels: Vec<_> = (0..d.layers).map(|l| class_figure(traj, l).render()).collect();
    o.png("by_class.png", &tile(&class_panels, PANELS_PER_ROW, "expert share by class"))?;
    o.png("entropy.png", &entropy_figure(traj).render())?;
    if matches!(d.state.0, 1 | 3) {
        // Pixel-space samples are images already: one grid row per class, as `generate`.
        let (c, h, w) = d.state;
        let samples: Vec<f32> = (0..d.images).flat_map(|n| traj.sample(n).to_vec()).collect();
        let t = candle_core::Tensor::from_vec(samples, (d.images, c, h, w), &candle_core::Device::Cpu)?;
        o.bytes("samples.png", &Images::from_tensor(&t)?.grid(per_class)?.png()?)?;
    }

    let entropy = load_entropy(traj);
    let class_names: Vec<String> = traj.classes().iter().map(|&c| traj.meta.class_name(c)).collect();
    let per_layer: Vec<_> = (0..d.layers)
        .map(|l| {
            let (classes, by_class) = load_by_class(traj, l);
            let top = top_expert_by_patch(traj, l);
            json!({
                "layer": l,
                "load_by_step": load_by_step(traj, l).to_rows(),
                "load_by_patch": load_by_patch(traj, l).to_rows(),
                "top_expert_by_patch": top.chunks(d.grid).collect::<Vec<_>>(),
                "load_by_class": { "classes": classes, "fractions": by_class.to_rows() },
                "entropy_bits": (0..d.steps).map(|s| entropy.get(s, l)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let summary = json!({
        "model": traj.meta.model,
        "sampler": traj.meta.sampler,
        "steps": traj.meta.steps,
        "cfg_scale": traj.meta.guidance,
        "guidance_interval": traj.meta.guidance_interval,
        "seed": traj.meta.seed,
        "classes": traj.meta.classes,
        "class_names": class_names,
        "timesteps": traj.meta.timesteps,
        "num_experts": d.experts,
        "top_k": d.top_k,
        "grid": d.grid,
        "note": "counts are top-k selections (every slot), summed over images (and tokens or timesteps); load_by_class rows are fractions",
        "layers": per_layer,
    });
    o.bytes("routes.json", serde_json::to_string_pretty(&summary)?.as_bytes())?;
    o.bytes("load_by_step.csv", csv_by_step(traj).as_bytes())?;
    o.bytes("load_by_patch.csv", csv_by_patch(traj).as_bytes())?;
    o.bytes("load_by_class.csv", csv_by_class(traj).as_bytes())?;
    o.bytes("entropy.csv", csv_entropy(traj).as_bytes())?;
    Ok(o.written)
}

// Long-format CSVs (one value per line), the shape pandas/R group and pivot directly.

fn csv_by_step(traj: &RoutingTrajectory) -> String {
    let mut s = String::from("layer,step,timestep,expert,count\n");
    for l in 0..traj.dims().layers {
        let m = load_by_step(traj, l);
        for step in 0..m.rows {
            for e in 0..m.cols {
                let _ = writeln!(s, "{l},{step},{},{e},{}", traj.meta.timesteps[step], m.get(step, e));
            }
        }
    }
    s
}

fn csv_by_patch(traj: &RoutingTrajectory) -> String {
    let d = traj.dims();
    let mut s = String::from("layer,patch,row,col,expert,count,is_top\n");
    for l in 0..d.layers {
        let m = load_by_patch(traj, l);
        let top = m.argmax_rows();
        for (p, &best) in top.iter().enumerate() {
            for e in 0..m.cols {
                let _ = writeln!(s, "{l},{p},{},{},{e},{},{}", p / d.grid, p % d.grid, m.get(p, e), u8::from(best == e));
            }
        }
    }
    s
}

fn csv_by_class(traj: &RoutingTrajectory) -> String {
    let mut s = String::from("layer,class,name,expert,fraction\n");
    for l in 0..traj.dims().layers {
        let (classes, m) = load_by_class(traj, l);
        for (row, &c) in classes.iter().enumerate() {
            let name = traj.meta.class_name(c).replace(['"', ','], " ");
            for e in 0..m.cols {
                let _ = writeln!(s, "{l},{c},{name},{e},{}", m.get(row, e));
            }
        }
    }
    s
}

fn csv_entropy(traj: &RoutingTrajectory) -> String {
    let h = load_entropy(traj);
    let mut s = String::from("layer,step,timestep,entropy_bits\n");
    for l in 0..h.cols {
        for step in 0..h.rows {
            let _ = writeln!(s, "{l},{step},{},{}", traj.meta.timesteps[step], h.get(step, l));
        }
    }
    s
}
