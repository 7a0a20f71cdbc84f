//! Images in [-1, 1] to PNG files: a grid (torchvision `make_grid` layout: `cols` per row,
//! 2 px black padding) or one file per image, each written to a temporary file and renamed,
//! so a failure never leaves half a file.
use crate::checkpoint::write_atomic;
use candle_core::{bail, DType, Result, Tensor};
use image::{ExtendedColorType, ImageEncoder};
use std::path::Path;

/// torchvision `make_grid`'s default padding.
const GRID_PADDING: usize = 2;

/// 8-bit images, (N, H, W, C) row-major: grayscale (C = 1) or RGB (C = 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    pub count: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
}

impl Images {
    /// (N, C, H, W) in [-1, 1] -> 8 bits as official `save_image(normalize=True,
    /// value_range=(-1, 1))`: clamp, map to [0, 1], `* 255 + 0.5`, truncate.
    pub fn from_tensor(x: &Tensor) -> Result<Self> {
        let (count, channels, height, width) = x.dims4()?;
        if channels != 1 && channels != 3 {
            bail!("images need 1 (grayscale) or 3 (RGB) channels, got {channels}")
        }
        let u8s = ((x.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
            .affine(1.0, 0.5)?
            .clamp(0f32, 255f32)?
            .floor()?
            .permute((0, 2, 3, 1))?
            .to_dtype(DType::U8)?;
        let pixels = u8s.flatten_all()?.to_vec1::<u8>()?;
        Ok(Self { count, channels, height, width, pixels })
    }

    pub fn append(&mut self, other: Images) -> Result<()> {
        if (other.channels, other.height, other.width) != (self.channels, self.height, self.width) {
            bail!(
                "cannot append {}x{}x{} images to {}x{}x{} ones",
                other.channels, other.height, other.width, self.channels, self.height, self.width
            )
        }
        self.count += other.count;
        self.pixels.extend(other.pixels);
        Ok(())
    }

    fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// Image `i` alone.
    pub fn get(&self, i: usize) -> Result<Images> {
        if i >= self.count {
            bail!("image {i} of {}", self.count)
        }
        let len = self.image_len();
        Ok(Self { count: 1, pixels: self.pixels[i * len..(i + 1) * len].to_vec(), ..*self })
    }

    /// The images tiled `cols` per row (the last row may be short) on a black background with
    /// 2 px padding around and between them (`make_grid(nrow=cols)`), as one image.
    pub fn grid(&self, cols: usize) -> Result<Images> {
        if cols == 0 || self.count == 0 {
            bail!("a grid needs at least one image and one column")
        }
        let rows = self.count.div_ceil(cols);
        let (h, w, c) = (self.height, self.width, self.channels);
        let (gh, gw) = (rows * (h + GRID_PADDING) + GRID_PADDING, cols * (w + GRID_PADDING) + GRID_PADDING);
        let mut pixels = vec![0u8; gh * gw * c];
        for i in 0..self.count {
            let (y0, x0) = ((i / cols) * (h + GRID_PADDING) + GRID_PADDING, (i % cols) * (w + GRID_PADDING) + GRID_PADDING);
            for y in 0..h {
                let src = i * self.image_len() + y * w * c;
                let dst = ((y0 + y) * gw + x0) * c;
                pixels[dst..dst + w * c].copy_from_slice(&self.pixels[src..src + w * c]);
            }
        }
        Ok(Self { count: 1, channels: c, height: gh, width: gw, pixels })
    }

    /// The PNG encoding of a single image.
    pub fn png(&self) -> Result<Vec<u8>> {
        if self.count != 1 {
            bail!("a PNG holds one image, not {}", self.count)
        }
        let color = if self.channels == 1 { ExtendedColorType::L8 } else { ExtendedColorType::Rgb8 };
        let mut bytes = Vec::new();
        image::codecs::png::PngEncoder::new(&mut bytes)
            .write_image(&self.pixels, self.width as u32, self.height as u32, color)
            .map_err(|e| candle_core::Error::Msg(format!("PNG encoding: {e}")))?;
        Ok(bytes)
    }

    /// Writes a single image as a PNG, atomically.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.png()?)
    }
}
