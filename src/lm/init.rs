//! The initial weights of a language model trained from scratch, transformers'
//! `PreTrainedModel._init_weights` for these families: every linear and embedding weight (the
//! routers and the shared-expert gate included) `normal_(0, initializer_range)`, biases zero,
//! RMSNorm weights one. Applied by name, in name order, from one seeded generator, so a run's
//! start is a function of its seed alone.
use candle_core::{Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// transformers' default `initializer_range`.
pub const INITIALIZER_RANGE: f64 = 0.02;

/// Sets every variable (sorted by name) to its initial value.
pub fn initialize(vars: &[(String, Var)], seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, INITIALIZER_RANGE as f32).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    for (name, var) in vars {
        let (shape, dev) = (var.shape().clone(), var.device().clone());
        let value = if name.ends_with("norm.weight") {
            Tensor::ones(&shape, var.dtype(), &dev)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(&shape, var.dtype(), &dev)?
        } else {
            let v: Vec<f32> = (0..shape.elem_count()).map(|_| normal.sample(&mut rng)).collect();
            Tensor::from_vec(v, &shape, &dev)?.to_dtype(var.dtype())?
        };
        var.set(&value)?;
    }
    Ok(())
}
