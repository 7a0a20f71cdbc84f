//! The official DiT image preprocessing.
//!
//! DiT `train.py` builds
//! `Compose([Lambda(center_crop_arr), RandomHorizontalFlip(), ToTensor(), Normalize(0.5, 0.5)])`
//! on images that torchvision's `ImageFolder` loader has `.convert("RGB")`-ed. This module
//! reproduces that chain on PIL-exact resampling ([`super::resample`]), keeping a single
//! luminance channel when the model is grayscale.

use super::resample::{Filter, U8Image};
use candle_core::{bail, Result};
use image::{DynamicImage, ImageReader};
use rand::{Rng, RngCore};
use std::path::Path;

/// Per-sample preprocessing to a square `image_size` model input with 1 or 3 channels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preprocess {
    image_size: usize,
    channels: usize,
    random_flip: bool,
}

impl Preprocess {
    /// DiT's training transform: center crop to `image_size`, random horizontal flip,
    /// scale to [-1, 1]. `channels` is the model's `in_channels` (1 = grayscale, 3 = RGB).
    pub fn new(image_size: usize, channels: usize) -> Result<Self> {
        if image_size == 0 {
            bail!("preprocess image_size must be positive");
        }
        if channels != 1 && channels != 3 {
            bail!("preprocess supports 1 (grayscale) or 3 (RGB) channels, got {channels}");
        }
        Ok(Self {
            image_size,
            channels,
            random_flip: true,
        })
    }

    /// Enables or disables the random horizontal flip (e.g. off for evaluation or encoding).
    pub fn with_random_flip(mut self, random_flip: bool) -> Self {
        self.random_flip = random_flip;
        self
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn random_flip(&self) -> bool {
        self.random_flip
    }

    /// `[C, H, W]` of every output.
    pub fn sample_shape(&self) -> [usize; 3] {
        [self.channels, self.image_size, self.image_size]
    }

    /// Decodes `path` and preprocesses it; the flip decision is drawn from `rng`.
    /// Errors (missing, unreadable, truncated or corrupt files) name the file.
    pub fn load(&self, path: &Path, rng: &mut dyn RngCore) -> Result<Vec<f32>> {
        let img = decode_image(path)?;
        let flip = self.draw_flip(rng);
        self.process(&img, flip)
    }

    /// Mirrors `RandomHorizontalFlip(p=0.5)`, which flips when `torch.rand(1) < p`: one
    /// `f32` draw from `rng` per sample, and none when flipping is disabled.
    pub fn draw_flip(&self, rng: &mut dyn RngCore) -> bool {
        self.random_flip && rng.random::<f32>() < 0.5
    }

    /// Converts to the model's channel count, center-crops, optionally mirrors left-right and
    /// scales to [-1, 1]. Returns CHW `f32` of length `C * image_size²`.
    pub fn process(&self, img: &DynamicImage, flip: bool) -> Result<Vec<f32>> {
        let img = center_crop_arr(&to_channels(img, self.channels)?, self.image_size)?;
        let (s, c) = (self.image_size, self.channels);
        let mut out = vec![0f32; c * s * s];
        for y in 0..s {
            for x in 0..s {
                let src_x = if flip { s - 1 - x } else { x };
                for ch in 0..c {
                    let v = img.data[(y * s + src_x) * c + ch];
                    // `ToTensor` (v / 255) then `Normalize(mean=0.5, std=0.5)`, in f32 as torch.
                    out[(ch * s + y) * s + x] = (f32::from(v) / 255.0 - 0.5) / 0.5;
                }
            }
        }
        Ok(out)
    }
}

/// Decodes an image file, detecting the format from its contents.
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    let reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| {
            candle_core::Error::Msg(format!("cannot open image {}: {e}", path.display()))
        })?;
    reader.decode().map_err(|e| {
        candle_core::Error::Msg(format!("cannot decode image {}: {e}", path.display()))
    })
}

/// PIL `convert("RGB")` (3 channels) or `convert("L")` (1 channel) to 8 bits.
pub fn to_channels(img: &DynamicImage, channels: usize) -> Result<U8Image> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    match channels {
        3 => U8Image::new(w, h, 3, img.to_rgb8().into_raw()),
        // Already-gray images (L, LA, 16-bit L) keep their luminance; alpha is dropped as PIL does.
        1 if !img.color().has_color() => U8Image::new(w, h, 1, img.to_luma8().into_raw()),
        // Colour to gray with PIL's ITU-R 601-2 fixed-point luma (`L24` in Convert.c), not the
        // `image` crate's Rec. 709 weights, so a grayscale model sees what PIL would produce.
        1 => {
            let rgb = img.to_rgb8();
            let luma = rgb
                .pixels()
                .map(|p| {
                    let [r, g, b] = p.0.map(u32::from);
                    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
                })
                .collect();
            U8Image::new(w, h, 1, luma)
        }
        _ => bail!("preprocess supports 1 or 3 channels, got {channels}"),
    }
}

/// DiT `train.py` / ADM `center_crop_arr`: halve with BOX while the short side is at least
/// twice `image_size` (cheap, alias-free downscaling), BICUBIC-resize so the short side equals
/// `image_size`, then take the central `image_size` square.
pub fn center_crop_arr(img: &U8Image, image_size: usize) -> Result<U8Image> {
    let mut img = img.clone();
    while img.width.min(img.height) >= 2 * image_size {
        img = img.resize(img.width / 2, img.height / 2, Filter::Box)?;
    }
    let scale = image_size as f64 / img.width.min(img.height) as f64;
    // Python's `round` rounds half to even.
    let w = (img.width as f64 * scale).round_ties_even() as usize;
    let h = (img.height as f64 * scale).round_ties_even() as usize;
    let img = img.resize(w, h, Filter::Bicubic)?;
    img.crop(
        (img.width - image_size) / 2,
        (img.height - image_size) / 2,
        image_size,
        image_size,
    )
}
