//! Seeded sampling noise: one host RNG stream per image, keyed by (seed, image index).
//!
//! Keying by image rather than drawing a whole batch from one stream makes every image depend
//! only on the seed and its place in the run: the same seed gives the same images whatever
//! `--batch-size` splits the run into (the model treats every image alone). The initial noise
//! and every per-step DDPM noise come from the image's stream, in step order.
use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::ops::Range;

#[derive(Debug, Clone)]
pub struct ImageNoise {
    streams: Vec<StdRng>,
}

impl ImageNoise {
    /// The streams of images `images` (indices within the whole run) for `seed`.
    pub fn new(seed: u64, images: Range<usize>) -> Self {
        let streams = images
            .map(|i| {
                // (seed, index) as the 256-bit ChaCha key: distinct pairs never share a stream.
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&seed.to_le_bytes());
                key[8..16].copy_from_slice(&(i as u64).to_le_bytes());
                StdRng::from_seed(key)
            })
            .collect();
        Self { streams }
    }

    /// Number of images (streams).
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Standard normal f32 noise (N, C, H, W) with `per_image = (C, H, W)`; image i's values
    /// come from stream i.
    pub fn draw(&mut self, per_image: (usize, usize, usize), device: &Device) -> Result<Tensor> {
        let (c, h, w) = per_image;
        let mut values = Vec::with_capacity(self.streams.len() * c * h * w);
        for rng in &mut self.streams {
            values.extend((0..c * h * w).map(|_| rng.sample::<f32, _>(StandardNormal)));
        }
        Tensor::from_vec(values, (self.streams.len(), c, h, w), device)
    }
}
