//! Padding a dataset's samples up to the model's input size with the background value -1
//! (black after the [-1, 1] scaling). Fashion-MNIST is 28×28 and the bundled model is 32×32
//! (patch 4 needs a multiple of 4 and a power-of-two grid): padding keeps every pixel as drawn,
//! where the official center-crop transform would upsample and blur.
use crate::data::{Dataset, Sample};
use candle_core::{bail, Result};
use rand::RngCore;
use std::sync::Arc;

pub const BACKGROUND: f32 = -1.0;

pub struct PadDataset {
    inner: Arc<dyn Dataset>,
    size: usize,
}

impl PadDataset {
    pub fn new(inner: Arc<dyn Dataset>, size: usize) -> Result<Self> {
        let [_, h, w] = inner.sample_shape();
        if h > size || w > size {
            bail!("cannot pad {h}×{w} samples to {size}×{size}");
        }
        Ok(Self { inner, size })
    }
}

/// Centres CHW `data` of side (h, w) in a `size`² canvas filled with -1.
pub fn pad_chw(data: &[f32], c: usize, h: usize, w: usize, size: usize) -> Vec<f32> {
    let (top, left) = ((size - h) / 2, (size - w) / 2);
    let mut out = vec![BACKGROUND; c * size * size];
    for ch in 0..c {
        for y in 0..h {
            let src = &data[(ch * h + y) * w..(ch * h + y + 1) * w];
            let dst = (ch * size + top + y) * size + left;
            out[dst..dst + w].copy_from_slice(src);
        }
    }
    out
}

impl Dataset for PadDataset {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn sample_shape(&self) -> [usize; 3] {
        [self.inner.sample_shape()[0], self.size, self.size]
    }
    fn class_names(&self) -> &[String] {
        self.inner.class_names()
    }
    fn get(&self, index: usize, rng: &mut dyn RngCore) -> Result<Sample> {
        let [c, h, w] = self.inner.sample_shape();
        let s = self.inner.get(index, rng)?;
        Ok(Sample { data: pad_chw(&s.data, c, h, w, self.size), label: s.label })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_centred_with_background() {
        let data: Vec<f32> = (0..4).map(|v| v as f32).collect(); // 1×2×2
        let out = pad_chw(&data, 1, 2, 2, 4);
        assert_eq!(
            out,
            vec![-1., -1., -1., -1., -1., 0., 1., -1., -1., 2., 3., -1., -1., -1., -1., -1.]
        );
    }
}
