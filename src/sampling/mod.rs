//! Sampling images from a DiT-MoE model, as the official `sample.py` does, for every process
//! the model may have been trained with:
//!
//! * [`guidance`]: classifier-free guidance in the official layouts, shared by all samplers,
//!   optionally limited to an interval of noise levels.
//! * [`gaussian`]: DDPM (`p_sample`, learned sigma) and DDIM loops over a respaced diffusion.
//! * [`dpm_solver`]: DPM-Solver++ (2M) as diffusers' `DPMSolverMultistepScheduler`.
//! * [`flow`]: rectified-flow Euler/Heun sampling.
//! * [`sampler`]: the [`Sampler`] callers hold, with explicit-noise and seeded entry points.
//! * [`noise`]: per-image seeded noise streams.
//! * [`decode`]: samples to images (pixel space, or the SD VAE for latent models).
//! * [`image_grid`]: images to PNG grids or files, written atomically.
pub mod decode;
pub mod dpm_solver;
pub mod flow;
pub mod gaussian;
pub mod guidance;
pub mod image_grid;
pub mod kind;
pub mod noise;
pub mod sampler;

pub use decode::{Decoder, SdVae, VaeConfig, VaeSpec, SD_LATENT_SCALE};
pub use dpm_solver::{DpmSolverSampler, DpmSolverState};
pub use flow::RectifiedFlowSampler;
pub use gaussian::{DdimSampler, DdpmSampler, DIFFUSION_STEPS};
pub use guidance::{Evaluation, Guidance, GuidanceInterval, GuidedModel};
pub use image_grid::Images;
pub use kind::SamplerKind;
pub use noise::ImageNoise;
pub use sampler::Sampler;
