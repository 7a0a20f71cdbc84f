//! Pillow-exact image resizing.
//!
//! DiT's `center_crop_arr` is defined in terms of `PIL.Image.resize` with the BOX and BICUBIC
//! filters. The `image` crate's filters differ from Pillow's in pass order and intermediate
//! precision (±1 grey level), so the two resamplers used by the official preprocessing are
//! re-implemented here following Pillow 13's `libImaging/Resample.c` (`precompute_coeffs`,
//! `normalize_coeffs_8bpc`, `ImagingResampleHorizontal_8bpc`/`Vertical_8bpc` and
//! `ImagingResampleInner`): a separable convolution with 22-bit fixed-point coefficients and
//! rounding to 8 bits after each pass. Outputs are bit-identical to Pillow 13.0.

use candle_core::{bail, Result};

/// An 8-bit interleaved (row-major, HWC) image with 1 (PIL mode "L") or 3 (mode "RGB")
/// channels: the two modes DiT's pipeline works in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct U8Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl U8Image {
    /// Wraps interleaved pixels, checking that `data` holds exactly `width * height * channels`
    /// bytes and that the channel count is one PIL's 8-bit resampler handles here.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        if channels != 1 && channels != 3 {
            bail!("U8Image supports 1 or 3 channels, got {channels}");
        }
        if data.len() != width * height * channels {
            bail!(
                "U8Image {width}x{height}x{channels} needs {} bytes, got {}",
                width * height * channels,
                data.len()
            );
        }
        Ok(Self {
            width,
            height,
            channels,
            data,
        })
    }

    /// The sub-image `[x, x + width) × [y, y + height)`, like numpy slicing
    /// `arr[y:y + height, x:x + width]` in `center_crop_arr`.
    pub fn crop(&self, x: usize, y: usize, width: usize, height: usize) -> Result<Self> {
        if x + width > self.width || y + height > self.height {
            bail!(
                "crop {width}x{height} at ({x}, {y}) exceeds image {}x{}",
                self.width,
                self.height
            );
        }
        let c = self.channels;
        let mut data = Vec::with_capacity(width * height * c);
        for row in y..y + height {
            let start = (row * self.width + x) * c;
            data.extend_from_slice(&self.data[start..start + width * c]);
        }
        Ok(Self {
            width,
            height,
            channels: c,
            data,
        })
    }

    /// `PIL.Image.resize((width, height), resample=filter)` for 8-bit images.
    pub fn resize(&self, width: usize, height: usize, filter: Filter) -> Result<Self> {
        if width == 0 || height == 0 || self.width == 0 || self.height == 0 {
            bail!(
                "cannot resize {}x{} image to {width}x{height}",
                self.width,
                self.height
            );
        }
        // `ImagingResampleInner`: each pass runs only if its axis changes size, so resizing to
        // the same size is an exact copy, as in `Image.resize`. Since Pillow 13 the vertical
        // pass goes first when the height shrinks by more than twice as many pixels as the
        // width (a speed-up that changes rounding); Pillow <= 12 always went horizontal first,
        // which differs by at most a grey level or two on such images.
        let (dw, dh) = (
            self.width as i64 - width as i64,
            self.height as i64 - height as i64,
        );
        let vertical_first = dh > 0 && dh > 2 * dw;
        let mut img = self.clone();
        if vertical_first && height != img.height {
            img = resample_vertical(&img, height, filter);
        }
        if width != img.width {
            img = resample_horizontal(&img, width, filter);
        }
        if height != img.height {
            img = resample_vertical(&img, height, filter);
        }
        Ok(img)
    }
}

/// The two Pillow resampling filters `center_crop_arr` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BOX`: each output pixel is the area average of its footprint.
    Box,
    /// `Image.BICUBIC`: Keys cubic convolution with a = -0.5, support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
        }
    }

    /// Pillow's `box_filter` / `bicubic_filter`.
    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// `PRECISION_BITS` in Resample.c: 32 bits minus 8 for the pixel and 2 spare for overflow.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index and the fixed-point weights of the inputs it reads.
struct Coeffs {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the full-image box
/// `(0, in_size)`.
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    // Downscaling widens the filter so every input pixel contributes (antialiasing).
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero, which `as i64` reproduces.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let raw: Vec<f64> = (xmin..xmax)
            .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                // Round half away from zero, then truncate: `(int)(±0.5 + w * (1 << 22))`.
                if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                }
            })
            .collect();
        start.push(xmin);
        weights.push(fixed);
    }
    Coeffs { start, weights }
}

/// Accumulates with Pillow's rounding bias and clamps to 8 bits (`clip8`).
fn convolve(taps: impl Iterator<Item = (u8, i32)>) -> u8 {
    let acc = taps.fold(1i64 << (PRECISION_BITS - 1), |acc, (v, w)| {
        acc + i64::from(v) * i64::from(w)
    });
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn resample_horizontal(img: &U8Image, width: usize, filter: Filter) -> U8Image {
    let c = img.channels;
    let coeffs = precompute_coeffs(img.width, width, filter);
    let mut data = Vec::with_capacity(width * img.height * c);
    for row in img.data.chunks_exact(img.width * c) {
        for (start, weights) in coeffs.start.iter().zip(&coeffs.weights) {
            for ch in 0..c {
                data.push(convolve(
                    weights
                        .iter()
                        .enumerate()
                        .map(|(k, &w)| (row[(start + k) * c + ch], w)),
                ));
            }
        }
    }
    U8Image {
        width,
        height: img.height,
        channels: c,
        data,
    }
}

fn resample_vertical(img: &U8Image, height: usize, filter: Filter) -> U8Image {
    let c = img.channels;
    let stride = img.width * c;
    let coeffs = precompute_coeffs(img.height, height, filter);
    let mut data = Vec::with_capacity(img.width * height * c);
    for (start, weights) in coeffs.start.iter().zip(&coeffs.weights) {
        for i in 0..stride {
            data.push(convolve(
                weights
                    .iter()
                    .enumerate()
                    .map(|(k, &w)| (img.data[(start + k) * stride + i], w)),
            ));
        }
    }
    U8Image {
        width: img.width,
        height,
        channels: c,
        data,
    }
}
