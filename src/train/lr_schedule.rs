//! The cosine learning-rate decay both trainers share.

/// Cosine annealing without restarts (Loshchilov & Hutter 2017, SGDR eq. 5; nanoGPT's
/// `get_lr`, Megatron's `cosine` style): `min + ½ (lr − min)(1 + cos(π · progress))` with
/// `min = lr · min_lr_ratio`. `progress` is the fraction of the decay done, clamped to [0, 1],
/// so the rate stays at the floor after the decay ends.
pub fn cosine_decay(lr: f64, min_lr_ratio: f64, progress: f64) -> f64 {
    let min = lr * min_lr_ratio;
    min + 0.5 * (lr - min) * (1.0 + (std::f64::consts::PI * progress.clamp(0.0, 1.0)).cos())
}

#[cfg(test)]
mod tests {
    use super::cosine_decay;

    #[test]
    fn starts_at_lr_ends_at_the_floor_and_halves_midway() {
        assert!((cosine_decay(1e-3, 0.1, 0.0) - 1e-3).abs() < 1e-15);
        assert!((cosine_decay(1e-3, 0.1, 1.0) - 1e-4).abs() < 1e-15);
        assert!((cosine_decay(1e-3, 0.1, 2.0) - 1e-4).abs() < 1e-15);
        assert!((cosine_decay(1e-3, 0.0, 0.5) - 5e-4).abs() < 1e-15);
    }
}
