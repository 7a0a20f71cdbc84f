//! Diffusion processes of DiT-MoE, mirroring the official `diffusion/` package
//! (github:feizc/DiT-MoE): the Gaussian (DDPM/DDIM) diffusion built by `create_diffusion`
//! with timestep respacing, and the rectified flow used by the official `train.py`/`sample.py`.
//!
//! * [`schedule`]: the f64 beta schedule and every derived array (`GaussianDiffusion.__init__`).
//! * [`respace`]: `space_timesteps` and the `SpacedDiffusion` beta rebuild.
//! * [`gaussian`]: q/p maths, DDPM and DDIM steps, training losses (`gaussian_diffusion.py`).
//! * [`rectified_flow`]: the rectified-flow objective and Euler/Heun samplers over a
//!   parameterised time grid (`rectified_flow.py`).

pub mod gaussian;
pub mod rectified_flow;
pub mod respace;
pub mod schedule;

pub use gaussian::{
    approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl,
    GaussianDiffusion, PMeanVariance, Posterior, SampleOut, TrainingLosses, VarianceType,
};
pub use rectified_flow::{
    euler_step, sample_euler, sample_euler_indexed, sample_heun, sample_heun_indexed, shift_time, x_prediction, FlowSample, FlowTimeGrid,
    RectifiedFlow, RfTrainOut,
};
pub use respace::{respace_betas, space_timesteps};
pub use schedule::{linear_betas, DiffusionSchedule};
