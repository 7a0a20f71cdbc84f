//! From samples to images in [-1, 1]: pixel-space models are images already; latent models
//! decode through the Stable Diffusion VAE (diffusers `AutoencoderKL`, e.g. sd-vae-ft-ema/mse),
//! as official `sample.py` does with `vae.decode(samples / 0.18215).sample`.
//!
//! The VAE is candle-transformers' `AutoEncoderKL` (it reads diffusers safetensors names, old
//! and new attention layouts), configured from the diffusers `config.json` beside the weights
//! when there is one, else from the SD defaults. It always runs in f32: decoding is once per
//! image, and SD VAEs are known to overflow in f16. It decodes a few images at a time
//! ([`VaeConfig::decode_chunk`]): the decoder works on each image alone, so the chunks give the images of
//! one whole-batch decode while bounding the convolutions' scratch memory.
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The latent scale of the SD VAE that DiT-MoE latents are trained with (official
/// `train.py`: `vae.encode(x).latent_dist.sample().mul_(0.18215)`).
pub const SD_LATENT_SCALE: f64 = 0.18215;

/// The im2col scratch one chunk of a VAE decode may take ([`VaeConfig::decode_chunk`]):
/// 5 GiB, 8 images of 256x256 with the SD VAE.
pub const DECODE_SCRATCH_BYTES: u64 = 5 << 30;

/// Weight file names looked for in a VAE folder, diffusers' first.
const VAE_WEIGHT_FILES: [&str; 3] = ["diffusion_pytorch_model.safetensors", "model.safetensors", "vae.safetensors"];

fn msg(path: &Path, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {e}", path.display()))
}

/// The fields of a diffusers `AutoencoderKL` `config.json` that shape the model; the others
/// (`_class_name`, `sample_size`, block types, ...) are ignored. Absent fields take the SD
/// VAE's values (sd-vae-ft-mse/ema).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            in_channels: 3,
            out_channels: 3,
            scaling_factor: SD_LATENT_SCALE,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }
}

impl VaeConfig {
    pub fn to_candle(&self) -> AutoEncoderKLConfig {
        AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv: self.use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
        }
    }

    /// How many images [`SdVae::decode`] decodes at once from (h, w) latents: as many
    /// as keep the largest convolution's scratch within [`DECODE_SCRATCH_BYTES`], at least one.
    /// candle runs a convolution as im2col + matmul (on CUDA without cuDNN too), and its
    /// column buffer, (N, H*W, C_in*9) f32, dwarfs every activation: at the SD VAE's last
    /// upsampling to 256x256 (256 channels in) it is 604 MB per image, 39 GB for 64 images,
    /// next to the diffusion model on the same GPU. 8 images of 256x256 per chunk, 2 of
    /// 512x512.
    pub fn decode_chunk(&self, h: usize, w: usize) -> usize {
        let per_image = self.decode_scratch_bytes(h, w).max(1);
        (DECODE_SCRATCH_BYTES / per_image).max(1) as usize
    }

    /// The column buffer of the decoder's largest 3x3 convolution for one image of (h, w)
    /// latents, in bytes (f32). Up block i runs at 2^i times the latent size; its first resnet
    /// and the upsampler before it read the previous block's channels.
    pub fn decode_scratch_bytes(&self, h: usize, w: usize) -> u64 {
        let channels: Vec<u64> = self.block_out_channels.iter().rev().map(|&c| c as u64).collect();
        let pixels = (h * w) as u64;
        (0..channels.len()).map(|i| (pixels << (2 * i)) * channels[i.saturating_sub(1)] * 9 * 4).max().unwrap_or(0)
    }

    fn validate(&self, origin: &Path) -> Result<()> {
        if self.block_out_channels.is_empty() || self.latent_channels == 0 || self.norm_num_groups == 0 {
            return Err(msg(origin, "block_out_channels, latent_channels and norm_num_groups must be non-empty / non-zero"));
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % self.norm_num_groups != 0) {
            return Err(msg(origin, format!("block_out_channels {c} is not a multiple of norm_num_groups {}", self.norm_num_groups)));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(msg(origin, format!("scaling_factor {} must be positive", self.scaling_factor)));
        }
        Ok(())
    }
}

/// A VAE on disk: its weights file and its configuration (read, not yet loaded), so callers
/// can check it against the model before any heavy work.
#[derive(Debug, Clone)]
pub struct VaeSpec {
    pub weights: PathBuf,
    pub config: VaeConfig,
}

impl VaeSpec {
    /// `path` is a diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors`)
    /// or a safetensors file (with an optional `config.json` beside it).
    pub fn open(path: &Path) -> Result<Self> {
        let weights = if path.is_dir() {
            VAE_WEIGHT_FILES.iter().map(|f| path.join(f)).find(|p| p.is_file()).ok_or_else(|| {
                msg(path, format!("no VAE weights in this folder (looked for {})", VAE_WEIGHT_FILES.join(", ")))
            })?
        } else if path.is_file() {
            path.to_path_buf()
        } else {
            return Err(msg(path, "no such VAE file or folder"));
        };
        if weights.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(msg(&weights, "VAE weights must be safetensors (diffusers `diffusion_pytorch_model.safetensors`)"));
        }
        let config_path = weights.with_file_name("config.json");
        let config = if config_path.is_file() {
            let s = std::fs::read_to_string(&config_path).map_err(|e| msg(&config_path, e))?;
            let c: VaeConfig = serde_json::from_str(&s).map_err(|e| msg(&config_path, e))?;
            c.validate(&config_path)?;
            c
        } else {
            VaeConfig::default()
        };
        Ok(Self { weights, config })
    }

    /// Loads the weights (f32) onto `device`; a missing or misshapen tensor names the file.
    pub fn load(&self, device: &Device) -> Result<SdVae> {
        let tensors = candle_core::safetensors::load(&self.weights, &Device::Cpu).map_err(|e| msg(&self.weights, e))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let c = &self.config;
        let vae = AutoEncoderKL::new(vb, c.in_channels, c.out_channels, c.to_candle()).map_err(|e| msg(&self.weights, e))?;
        Ok(SdVae { vae, config: c.clone() })
    }
}

/// A loaded SD VAE.
pub struct SdVae {
    vae: AutoEncoderKL,
    config: VaeConfig,
}

impl std::fmt::Debug for SdVae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdVae").field("config", &self.config).finish_non_exhaustive()
    }
}

impl SdVae {
    /// Scaled latents (N, latent_channels, h, w) -> images (N, out_channels, h*s, w*s) in about
    /// [-1, 1]: `vae.decode(latents / scaling_factor)`, [`VaeConfig::decode_chunk`] images at a time.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        self.decode_in_chunks(latents, self.config.decode_chunk(h, w))
    }

    /// [`Self::decode`] `chunk` images at a time (the last chunk may be smaller), the chunks'
    /// images concatenated on the latents' device. Every layer of the decoder works on each
    /// image alone (convolutions, group norms, the mid-block attention over one image's
    /// pixels), so the chunk size bounds the memory, not the images.
    pub fn decode_in_chunks(&self, latents: &Tensor, chunk: usize) -> Result<Tensor> {
        let c = latents.dim(1)?;
        if c != self.config.latent_channels {
            bail!("latents have {c} channels, the VAE decodes {}", self.config.latent_channels)
        }
        in_chunks(latents, chunk, |part| self.vae.decode(&(part.to_dtype(DType::F32)? / self.config.scaling_factor)?))
    }

    /// Images (N, 3, H, W) in [-1, 1] -> scaled latents (N, latent_channels, H/8, W/8):
    /// `vae.encode(x).latent_dist.sample() * scaling_factor`, as the official `train.py`
    /// encodes every batch (the draw is candle's, so it is not seeded).
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let dist = self.vae.encode(&images.to_dtype(DType::F32)?)?;
        dist.sample()? * self.config.scaling_factor
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }
}

/// `f` over `chunk` images of `x` at a time (the last chunk may be smaller), the results
/// concatenated along the batch.
fn in_chunks(x: &Tensor, chunk: usize, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let n = x.dim(0)?;
    if chunk == 0 {
        bail!("a VAE chunk must hold at least one image")
    }
    if n <= chunk {
        return f(x);
    }
    let parts = (0..n).step_by(chunk).map(|start| f(&x.narrow(0, start, chunk.min(n - start))?)).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// How a model's samples become images.
#[derive(Debug)]
pub enum Decoder {
    /// The samples are images in [-1, 1] (pixel-space models, 1 or 3 channels).
    PixelSpace,
    /// Boxed: the VAE is large next to the unit variant.
    Vae(Box<SdVae>),
}

impl Decoder {
    /// Samples (N, C, H, W) -> images (N, C', H', W') in about [-1, 1], f32.
    pub fn decode(&self, samples: &Tensor) -> Result<Tensor> {
        match self {
            Self::PixelSpace => samples.to_dtype(DType::F32),
            Self::Vae(vae) => vae.decode(samples),
        }
    }
}
