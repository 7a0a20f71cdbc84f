//! `ditmoe generate`: class-conditional images from a model folder (or a preset plus its
//! checkpoint) with DDPM, DDIM or rectified-flow sampling and classifier-free guidance, decoded
//! through the SD VAE for latent models, written as a PNG grid (one row per class) or one PNG
//! per image.
//!
//! Every input is checked before the model is loaded: a bad flag or file is a one-line usage
//! error (exit code 2) naming it, and nothing is written. The output is written atomically
//! once every image exists.
//!
//! Launched (`ditmoe launch --nproc-per-node N -- generate …`), the model is sharded by
//! experts: every rank loads only its block of each MoE layer's experts (by their global
//! names, from the one checkpoint) and runs the same sampling loop with the same seed, so the
//! same noise and the same batches on every rank, the MoE layers exchanging tokens with the
//! expert owners (`ditmoe::dist::expert_parallel`); rank 0 decodes and writes the images. This
//! is what a model too large for one device needs, not a speed-up: every rank computes the
//! whole batch outside the experts.
use super::launch::{join, leads, parallel_plan, reported};
use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::Args;
use ditmoe::checkpoint::{load_state_dict, ModelDir};
use ditmoe::dist::World;
use ditmoe::sampling::{
    Decoder, Guidance, GuidanceInterval, GuidedModel, ImageNoise, Images, Sampler, SamplerKind,
    VaeSpec, DIFFUSION_STEPS,
};
use ditmoe::{presets, DitConfig, DitMoe};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Optional per-model defaults, `<model dir>/generate.json`, e.g.
/// `{"sampler": "rf-euler", "steps": 30, "cfg_scale": 3.0, "guidance_interval": [0.2, 0.8]}`;
/// flags override them.
const DEFAULTS_FILE: &str = "generate.json";
/// Official `sample.py`'s `--cfg-scale` default.
const DEFAULT_CFG_SCALE: f64 = 4.0;

#[derive(Args)]
pub struct GenerateArgs {
    /// Model folder (config.json + model.safetensors, optional class_names.json and
    /// generate.json), or a preset name (see `ditmoe presets`) with --weights.
    #[arg(long, default_value = "assets/fashion-mnist")]
    model: String,
    /// The checkpoint of a preset --model (.pt/.pth/.safetensors).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Classes: ids or names from class_names.json (any case), comma-separated, or `all`.
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    class: String,
    /// Images per class.
    #[arg(long, default_value_t = 8, allow_hyphen_values = true)]
    num: i64,
    /// ddpm, ddim, rf-euler or rf-heun [default: generate.json's, else ddpm].
    #[arg(long)]
    sampler: Option<String>,
    /// Sampling steps [default: generate.json's, else 250 for ddpm/ddim, 50 for rf-*].
    #[arg(long, allow_hyphen_values = true)]
    steps: Option<i64>,
    /// Classifier-free guidance scale; 1 = no guidance [default: generate.json's, else 4.0].
    #[arg(long, allow_hyphen_values = true)]
    cfg_scale: Option<f64>,
    /// DDPM/DDIM: guide every latent channel, not the official first 3.
    #[arg(long)]
    guide_all_channels: bool,
    /// Guide only the steps whose noise level (1 = pure noise: the flow time t, or the
    /// DDPM/DDIM/DPM++ timestep / 1000) lies in [LO, HI], e.g. 0.2,0.8; the others run the
    /// conditional forward alone (Kynkäänniemi et al. 2024) [default: generate.json's, else
    /// every step].
    #[arg(long, value_name = "LO,HI", allow_hyphen_values = true)]
    guidance_interval: Option<String>,
    /// Seed of the noise; the same seed gives the same images on the same device.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per model batch (guidance doubles the forward batch).
    #[arg(long, default_value_t = 16, allow_hyphen_values = true)]
    batch_size: i64,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights dtype: f32, bf16 or f16 (the matmuls run in it; the residual stream stays f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// SD VAE for latent models: a diffusers folder (config.json +
    /// diffusion_pytorch_model.safetensors) or a safetensors file.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Output: a .png grid (rows = classes, columns = samples), or with --separate a folder
    /// [default: samples.png, or samples/ with --separate].
    #[arg(long)]
    out: Option<PathBuf>,
    /// One PNG per image (`<class>-<name>-<k>.png`) into the --out folder.
    #[arg(long)]
    separate: bool,
    /// Launched: spread each MoE layer's experts over groups of this many consecutive ranks,
    /// each rank loading only its slice [default: the world size].
    #[arg(long)]
    expert_parallel: Option<usize>,
}

/// `generate.json`: defaults for flags the user did not give.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateDefaults {
    sampler: Option<String>,
    steps: Option<i64>,
    cfg_scale: Option<f64>,
    /// `[lo, hi]`, as `--guidance-interval`.
    guidance_interval: Option<Vec<f64>>,
}

impl GenerateDefaults {
    fn read(dir: Option<&Path>) -> anyhow::Result<(Self, String)> {
        let Some(path) = dir.map(|d| d.join(DEFAULTS_FILE)).filter(|p| p.exists()) else {
            return Ok((Self::default(), String::new()));
        };
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| super::usage(format!("{origin}: {e}")))?;
        let parsed = serde_json::from_str(&text).map_err(|e| super::usage(format!("{origin}: {e}")))?;
        Ok((parsed, origin))
    }
}

/// A model folder, or a preset with its checkpoint.
enum ModelSource {
    Folder(ModelDir),
    Preset { config: DitConfig, weights: PathBuf },
}

impl ModelSource {
    fn resolve(model: &str, weights: Option<&Path>) -> anyhow::Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            if let Some(w) = weights {
                return Err(super::usage(format!(
                    "--weights {}: only used with a preset --model; the folder {model} has its own weights",
                    w.display()
                )));
            }
            return Ok(Self::Folder(ModelDir::open(path).map_err(|e| super::usage(format!("--model: {e}")))?));
        }
        let Ok(preset) = presets::get(model) else {
            return Err(super::usage(format!(
                "--model {model}: no such model folder, and not a preset name (see `ditmoe presets`)"
            )));
        };
        match weights {
            None => Err(super::usage(format!("--model {}: a preset needs its checkpoint: give --weights FILE", preset.name))),
            Some(w) if !w.is_file() => Err(super::usage(format!("--weights {}: no such file", w.display()))),
            Some(w) => Ok(Self::Preset { config: preset.config, weights: w.to_path_buf() }),
        }
    }

    fn config(&self) -> &DitConfig {
        match self {
            Self::Folder(dir) => &dir.config,
            Self::Preset { config, .. } => config,
        }
    }

    fn folder(&self) -> Option<&Path> {
        match self {
            Self::Folder(dir) => Some(&dir.dir),
            Self::Preset { .. } => None,
        }
    }

    fn class_names(&self) -> Option<&[String]> {
        match self {
            Self::Folder(dir) => dir.class_names.as_deref(),
            Self::Preset { .. } => None,
        }
    }

    fn load(&self, plan: &ditmoe::ExecutionPlan) -> anyhow::Result<DitMoe> {
        Ok(match self {
            Self::Folder(dir) => dir.load(plan)?,
            Self::Preset { config, weights } => {
                plan.check_fits("the model's weights", config.weight_bytes(plan.weight_dtype(), plan.expert_parallel_size()))?;
                let vb = load_state_dict(weights)?.into_var_builder(config, plan)?;
                DitMoe::new(config, plan, vb)?
            }
        })
    }
}

/// A positive count from a flag (or generate.json), named in the error.
fn positive(value: i64, what: &str) -> anyhow::Result<usize> {
    if value < 1 {
        return Err(super::usage(format!("{what}: {value} must be at least 1")));
    }
    Ok(value as usize)
}

/// The sampler the flags (or generate.json) ask for. DDPM/DDIM clamp x_0 to [-1, 1] only for
/// pixel-space models (see `DdimSampler` on why clamping latents corrupts DDIM samples).
fn build_sampler(kind: SamplerKind, steps: usize, steps_from: &str, cfg: &DitConfig, pixel_space: bool) -> anyhow::Result<Sampler> {
    if kind.is_gaussian() && steps > DIFFUSION_STEPS {
        return Err(super::usage(format!(
            "{steps_from}: {steps} is more than the {DIFFUSION_STEPS} steps of the diffusion schedule"
        )));
    }
    kind.build(steps, cfg, pixel_space).map_err(|e| match kind {
        SamplerKind::Ddim => {
            super::usage(format!("{steps_from}: {e} (DDIM strides the schedule evenly: 10, 20, 25, 40, 50, 100, 125, 200, 250, 500, 1000, ...)"))
        }
        _ => super::usage(format!("{steps_from}: {e}")),
    })
}

/// Where the images go.
enum Output {
    Grid(PathBuf),
    Separate(PathBuf),
}

impl Output {
    /// Checks that the output can be written (a probe file in its folder) before any sampling.
    fn check(out: Option<PathBuf>, separate: bool) -> anyhow::Result<Self> {
        let out = out.unwrap_or_else(|| PathBuf::from(if separate { "samples" } else { "samples.png" }));
        let shown = out.display().to_string();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let folder = if separate {
            if out.exists() && !out.is_dir() {
                return Err(super::usage(format!("--out {shown}: exists and is not a folder (--separate writes one PNG per image into a folder)")));
            }
            if out.is_dir() {
                out.clone()
            } else {
                parent
            }
        } else {
            let is_png = out.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("png"));
            if !is_png || out.is_dir() {
                return Err(super::usage(format!("--out {shown}: the grid is a PNG file; give a .png name (or --separate for a folder)")));
            }
            parent
        };
        if !folder.is_dir() {
            return Err(super::usage(format!("--out {shown}: folder {} does not exist", folder.display())));
        }
        let probe = folder.join(format!(".ditmoe-generate-probe.{}", std::process::id()));
        std::fs::File::create(&probe)
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| super::usage(format!("--out {shown}: cannot write in {}: {e}", folder.display())))?;
        Ok(if separate { Self::Separate(out) } else { Self::Grid(out) })
    }

    fn path(&self) -> &Path {
        match self {
            Self::Grid(p) | Self::Separate(p) => p,
        }
    }
}

/// The file `--separate` writes for each image, `<class>-<name>-<k>.png`, each checked against
/// the file-system limits before any sampling (a name too long would fail after it).
fn separate_file_names(dir: &Path, labels: &[usize], num: usize, names: Option<&[String]>) -> anyhow::Result<Vec<String>> {
    // POSIX NAME_MAX and PATH_MAX
    const NAME_MAX: usize = 255;
    const PATH_MAX: usize = 4096;
    let dir_len = std::path::absolute(dir).map(|p| p.as_os_str().len()).unwrap_or(0);
    labels
        .iter()
        .enumerate()
        .map(|(i, &class)| {
            let name = match names {
                Some(names) => format!("{class}-{}-{}.png", slug(&names[class]), i % num),
                None => format!("{class}-{}.png", i % num),
            };
            if name.len() > NAME_MAX || dir_len + 1 + name.len() > PATH_MAX {
                return Err(super::usage(format!(
                    "--separate: the file name for class {class} ({} bytes) is longer than the file system allows; shorten its name in class_names.json",
                    name.len()
                )));
            }
            Ok(name)
        })
        .collect()
}

/// A file-name-safe form of a class name: lowercase, runs of other characters as one `-`.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for ch in name.chars() {
        if ch.is_ascii_alphanumeric() {
            out.push(ch.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

fn progress_bar(total: usize) -> ProgressBar {
    let bar = ditmoe::progress::bar(total as u64);
    let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps, {rate} it/s, eta {eta}")
        .expect("valid progress template")
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.2}", s.per_sec());
        })
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let plan = super::inference_plan(&a.device, &a.dtype)?;
    let world = join(&plan.device)?;
    let result = generate_in(a, plan, world.as_ref());
    reported(world.as_ref(), result)
}

/// `generate` on this process's share of the job (see the module docs): with `world`, the
/// experts sharded over the ranks, rank 0 decoding, writing and printing.
fn generate_in(a: GenerateArgs, plan: ditmoe::ExecutionPlan, world: Option<&World>) -> anyhow::Result<()> {
    // Everything that can be wrong with the inputs is checked before the model is loaded.
    let source = ModelSource::resolve(&a.model, a.weights.as_deref())?;
    let cfg = source.config().clone();
    let (defaults, defaults_file) = GenerateDefaults::read(source.folder())?;
    let from_file = |key: &str| format!("{defaults_file}: {key}");

    let (sampler_name, sampler_from) = match (&a.sampler, &defaults.sampler) {
        (Some(s), _) => (s.clone(), "--sampler".to_string()),
        (None, Some(s)) => (s.clone(), from_file("sampler")),
        (None, None) => ("ddpm".to_string(), "--sampler".to_string()),
    };
    let sampler_name = sampler_name.parse::<SamplerKind>().map_err(|e| super::usage(format!("{sampler_from}: {e}")))?;
    // generate.json's steps belong to its sampler; another sampler takes its own default.
    let json_steps_apply = defaults.sampler.as_deref().is_none_or(|s| s.parse::<SamplerKind>() == Ok(sampler_name));
    let (steps, steps_from) = match (a.steps, defaults.steps.filter(|_| json_steps_apply)) {
        (Some(s), _) => (s, "--steps".to_string()),
        (None, Some(s)) => (s, from_file("steps")),
        (None, None) => (sampler_name.official_steps() as i64, "--steps".to_string()),
    };
    let steps = positive(steps, &steps_from)?;
    let (cfg_scale, scale_from) = match (a.cfg_scale, defaults.cfg_scale) {
        (Some(s), _) => (s, "--cfg-scale".to_string()),
        (None, Some(s)) => (s, from_file("cfg_scale")),
        (None, None) => (DEFAULT_CFG_SCALE, "--cfg-scale".to_string()),
    };
    if !cfg_scale.is_finite() {
        return Err(super::usage(format!("{scale_from}: {cfg_scale} is not a finite number")));
    }
    if cfg_scale != 1.0 && cfg.label_table_rows() == cfg.num_classes {
        return Err(super::usage(format!(
            "{scale_from}: {cfg_scale} needs the null class, but this model has none (class_dropout_prob 0); use --cfg-scale 1"
        )));
    }
    let guidance_interval = super::guidance_interval(a.guidance_interval.as_deref(), || {
        let bounds = defaults.guidance_interval.as_deref();
        bounds.map(GuidanceInterval::from_bounds).transpose().map_err(|e| super::usage(format!("{}: {e}", from_file("guidance_interval"))))
    })?;
    let classes = super::parse_classes(&a.class, cfg.num_classes, source.class_names())?;
    let num = positive(a.num, "--num")?;
    let batch_size = positive(a.batch_size, "--batch-size")?;

    let vae = match &a.vae {
        Some(path) => {
            let spec = VaeSpec::open(path).map_err(|e| super::usage(format!("--vae: {e}")))?;
            if spec.config.latent_channels != cfg.in_channels {
                return Err(super::usage(format!(
                    "--vae {}: the VAE has {} latent channels but the model has in_channels {}",
                    path.display(),
                    spec.config.latent_channels,
                    cfg.in_channels
                )));
            }
            Some(spec)
        }
        None if matches!(cfg.in_channels, 1 | 3) => None,
        None => {
            return Err(super::usage(format!(
                "--vae: the model samples {}-channel latents; give the VAE that decodes them with --vae DIR_OR_FILE (e.g. sd-vae-ft-ema)",
                cfg.in_channels
            )))
        }
    };
    let sampler = build_sampler(sampler_name, steps, &steps_from, &cfg, vae.is_none())?;
    let output = Output::check(a.out.clone(), a.separate)?;
    // Class-major order: image i is sample i % num of class classes[i / num] (grid row i / num).
    let labels: Vec<usize> = classes.iter().flat_map(|&c| std::iter::repeat_n(c, num)).collect();
    // every file --separate will write, checked before any sampling
    let file_names = match &output {
        Output::Separate(dir) => separate_file_names(dir, &labels, num, source.class_names())?,
        Output::Grid(_) => Vec::new(),
    };
    let plan = parallel_plan(world, plan, a.expert_parallel)?;
    let writes = leads(world);
    let device = plan.device.clone();

    let model = source.load(&plan)?;
    // only the writing rank decodes
    let decoder = match vae.as_ref().filter(|_| writes) {
        Some(spec) => Decoder::Vae(Box::new(spec.load(&device).map_err(|e| super::usage(format!("--vae: {e}")))?)),
        None => Decoder::PixelSpace,
    };
    let guidance = Guidance { scale: cfg_scale, guide_all_channels: a.guide_all_channels };

    let evaluations = labels.len().div_ceil(batch_size) * sampler.evaluations();
    let bar = if writes { progress_bar(evaluations) } else { ProgressBar::hidden() };
    // Seconds of sampling and of the decode, each between device synchronisations (the GPU
    // runs asynchronously), summed over the batches; loading, the NaN check, the copy to the
    // host and the PNG writing are outside both.
    let (mut sampling_s, mut decode_s) = (0.0, 0.0);
    let mut images: Option<Images> = None;
    let mut broken = Vec::new();
    let mut graph_warned = false;
    for (b, batch) in labels.chunks(batch_size).enumerate() {
        let first = b * batch_size;
        device.synchronize()?;
        let start = Instant::now();
        let guided = GuidedModel::new(&model, batch, guidance, &device)?.guided_in(guidance_interval);
        let mut noise = ImageNoise::new(a.seed, first..first + batch.len());
        let samples = sampler.sample_seeded(&guided, &mut noise, &mut |_| bar.inc(1)).context("sampling")?;
        device.synchronize()?;
        sampling_s += start.elapsed().as_secs_f64();
        if let (_, Some(e)) = guided.graph_replays() {
            // Still correct, only slower: say so once.
            if !graph_warned {
                bar.suspend(|| eprintln!("note: the forward could not be captured as a CUDA graph, so it ran step by step: {e}"));
                graph_warned = true;
            }
        }
        // the sampler's buffers (the captured graph's among them) go before the decode needs room
        drop((guided, noise));
        if !writes {
            continue;
        }
        let start = Instant::now();
        let decoded = decoder.decode(&samples).context("decoding")?;
        device.synchronize()?;
        decode_s += start.elapsed().as_secs_f64();
        drop(samples);
        // a NaN or infinity would come out black: find which images have one
        broken.extend(non_finite_images(&decoded)?.into_iter().map(|j| first + j));
        let decoded = Images::from_tensor(&decoded)?;
        match &mut images {
            Some(all) => all.append(decoded)?,
            None => images = Some(decoded),
        }
    }
    bar.finish_and_clear();
    if !writes {
        return Ok(());
    }
    let images = images.context("no images were sampled")?;
    if !broken.is_empty() {
        let which: Vec<String> = broken.iter().map(|&i| format!("image {} (class {}, sample {})", i, labels[i], i % num)).collect();
        anyhow::bail!(
            "{} of {} images came out NaN or infinite, so nothing was written: {}. The weights or --cfg-scale {cfg_scale} make the model diverge.",
            broken.len(),
            labels.len(),
            which.join(", ")
        );
    }

    match &output {
        Output::Grid(path) => images.grid(num)?.write_png(path)?,
        Output::Separate(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("--out {}", dir.display()))?;
            for (i, name) in file_names.iter().enumerate() {
                images.get(i)?.write_png(&dir.join(name))?;
            }
        }
    }
    let total_s = sampling_s + decode_s;
    let interval = GuidanceInterval::describe(guidance_interval);
    println!(
        "wrote {}: {} classes x {num} images of {}x{} ({}, {} steps, cfg {cfg_scale}{interval}, seed {}); sampled {} images in {total_s:.3} s (sampling {sampling_s:.3} s, {} {decode_s:.3} s): {:.2} images/s",
        output.path().display(),
        classes.len(),
        images.width,
        images.height,
        sampler_name.name(),
        sampler.steps(),
        a.seed,
        images.count,
        if vae.is_some() { "VAE decode" } else { "decode" },
        images.count as f64 / total_s.max(1e-9),
    );
    Ok(())
}

/// The images of `decoded` (N, ...) that hold a NaN or an infinity, by index: counted on its
/// device (|x| <= f32::MAX is false exactly there), one number per image to the host.
fn non_finite_images(decoded: &Tensor) -> candle_core::Result<Vec<usize>> {
    let x = decoded.flatten_from(1)?.to_dtype(DType::F32)?;
    let values = x.dim(1)? as f32;
    let finite = x.abs()?.le(f32::MAX as f64)?.to_dtype(DType::F32)?.sum(1)?.to_vec1::<f32>()?;
    Ok(finite.iter().enumerate().filter(|(_, &f)| f < values).map(|(j, _)| j).collect())
}
