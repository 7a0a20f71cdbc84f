//! `ditmoe convert`: an official checkpoint (PyTorch `.pt`/`.pth`, state dict at the top or
//! under `ema`/`model`/`module`, or safetensors) into a model folder, validated against the
//! config of a preset or a config.json.
use clap::Args;
use ditmoe::checkpoint::ModelDir;
use ditmoe::{presets, DitConfig};
use std::path::PathBuf;

#[derive(Args)]
pub struct ConvertArgs {
    /// The checkpoint to convert.
    #[arg(long)]
    weights: PathBuf,
    /// A preset name (see `ditmoe presets`), e.g. DiT-MoE-S/2-8E2A.
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// Or a config.json.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Use the timm attention names (`attn.qkv`/`attn.proj`) for XL/G presets, as train.py builds them.
    #[arg(long)]
    timm_attn: bool,
    /// Output model folder (a new one, unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Replace the model in an existing --out folder.
    #[arg(long)]
    overwrite: bool,
    /// Stored dtype of the converted weights.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(a: ConvertArgs) -> anyhow::Result<()> {
    let mut cfg: DitConfig = match (&a.preset, &a.config) {
        (Some(p), _) => presets::get(p).map_err(|e| super::usage(format!("--preset: {e}")))?.config,
        (None, Some(c)) => DitConfig::from_file(c)?,
        (None, None) => return Err(super::usage("give --preset or --config")),
    };
    if a.timm_attn {
        cfg.use_flash_attn = false;
    }
    let dtype = super::dtype(&a.dtype)?;
    let holds_model = ["config.json", "model.safetensors"].iter().any(|f| a.out.join(f).exists());
    if holds_model && !a.overwrite {
        return Err(super::usage(format!("--out {}: already holds a model; pass --overwrite to replace it, or choose another folder", a.out.display())));
    }
    let dir = ModelDir::write(&a.out, &cfg, &a.weights, dtype, None)?;
    let (total, _) = cfg.param_counts();
    println!("wrote {} ({:.1}M parameters, {:?})", dir.dir.display(), total as f64 / 1e6, dtype);
    Ok(())
}
