//! Every random draw of training is a pure function of (seed, step, stream): a fresh generator
//! is seeded from those three numbers for each use. Nothing random carries state from one
//! step to the next, so a resumed run only needs the step counter to draw exactly what the
//! uninterrupted run would have drawn (no generator state to serialise).
use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// What a draw is for; distinct streams give independent numbers within one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Label dropout for classifier-free guidance.
    LabelDrop,
    /// Diffusion timesteps (DDPM) or the logit-normal `nt` (RF).
    Time,
    /// The Gaussian noise added to the images.
    Noise,
    /// The language model's training windows (offsets into the token stream).
    TextWindows,
}

/// splitmix64 finaliser: spreads (seed, step, stream, micro) over all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator for one (seed, step, micro-batch, stream). (Reproducible for a fixed
/// `Cargo.lock`: `rand` does not promise the `StdRng` stream across versions.)
pub fn step_rng(seed: u64, step: u64, micro: usize, stream: Stream) -> StdRng {
    let s = mix(mix(mix(seed) ^ step) ^ (micro as u64)) ^ mix(stream as u64 + 1);
    StdRng::seed_from_u64(s)
}

/// `shape` standard-normal f32 values (drawn on the CPU, so every device sees the same numbers).
pub fn randn(rng: &mut StdRng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
    Tensor::from_vec(v, shape, device)
}

/// Classifier-free-guidance label dropout (official `LabelEmbedder.token_drop`): each label
/// becomes the null class `num_classes` with probability `p`.
pub fn drop_labels(rng: &mut StdRng, labels: &[u32], p: f64, null_class: u32) -> Vec<u32> {
    labels.iter().map(|&y| if p > 0.0 && rng.random::<f64>() < p { null_class } else { y }).collect()
}
