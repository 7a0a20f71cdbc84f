//! `ditmoe encode`: pre-encode class folders into SD-VAE latent shards once, so latent models
//! train without running the VAE every step (the trainer reads a folder of shards as data).
use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::Args;
use ditmoe::data::{write_class_names, write_latent_shard, ClassFolderDataset, Dataset, Preprocess, CLASS_NAMES_FILE};
use ditmoe::sampling::VaeSpec;
use indicatif::ProgressStyle;
use rand::SeedableRng;
use std::path::PathBuf;

#[derive(Args)]
pub struct EncodeArgs {
    /// Class folders (`root/<class>/*.png|jpg|jpeg|webp`).
    #[arg(long)]
    data: PathBuf,
    /// The SD VAE: a diffusers folder (config.json + diffusion_pytorch_model.safetensors) or file.
    #[arg(long)]
    vae: PathBuf,
    /// Output folder for `shard-<k>.safetensors` and class_names.json.
    #[arg(long)]
    out: PathBuf,
    /// Image side after the official center crop (256 for the ImageNet models: 32x32 latents).
    #[arg(long, default_value_t = 256)]
    image_size: usize,
    /// Images per shard file.
    #[arg(long, default_value_t = 10000)]
    shard_size: usize,
    /// Images per VAE batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: EncodeArgs) -> anyhow::Result<()> {
    let device = super::device(&a.device)?;
    if a.shard_size == 0 || a.batch_size == 0 {
        return Err(super::usage("--shard-size and --batch-size must be at least 1"));
    }
    let vae = VaeSpec::open(&a.vae).map_err(|e| super::usage(format!("--vae: {e}")))?.load(&device)?;
    // Each VAE block after the first halves the resolution (8x for the SD VAE).
    let factor = 1usize << vae.config().block_out_channels.len().saturating_sub(1);
    if a.image_size == 0 || !a.image_size.is_multiple_of(factor) {
        return Err(super::usage(format!("--image-size {}: must be a positive multiple of {factor} (the VAE's downsampling)", a.image_size)));
    }
    // No random flip: the shards hold one fixed view per image (flip latents at training time).
    let pre = Preprocess::new(a.image_size, vae.config().in_channels)?.with_random_flip(false);
    let ds = ClassFolderDataset::open(&a.data, pre).map_err(|e| super::usage(format!("--data: {e}")))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    write_class_names(&a.out.join(CLASS_NAMES_FILE), ds.class_names())?;

    let bar = ditmoe::progress::bar(ds.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} images {per_sec} eta {eta}").expect("template"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0); // unused: no random flip
    let [c, h, w] = ds.sample_shape();
    for (k, start) in (0..ds.len()).step_by(a.shard_size).enumerate() {
        let end = (start + a.shard_size).min(ds.len());
        let (mut latents, mut labels) = (Vec::new(), Vec::new());
        for b in (start..end).step_by(a.batch_size) {
            let idx: Vec<usize> = (b..(b + a.batch_size).min(end)).collect();
            let mut pixels = Vec::with_capacity(idx.len() * c * h * w);
            for &i in &idx {
                let s = ds.get(i, &mut rng)?;
                pixels.extend(s.data);
                labels.push(s.label as i64);
            }
            let x = Tensor::from_vec(pixels, (idx.len(), c, h, w), &device)?;
            latents.push(vae.encode(&x)?.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?);
            bar.inc(idx.len() as u64);
        }
        let n = labels.len();
        let path = a.out.join(format!("shard-{k:05}.safetensors"));
        write_latent_shard(&path, &Tensor::cat(&latents, 0)?, &Tensor::from_vec(labels, n, &candle_core::Device::Cpu)?)?;
    }
    bar.finish();
    println!("encoded {} images into {}", ds.len(), a.out.display());
    Ok(())
}
