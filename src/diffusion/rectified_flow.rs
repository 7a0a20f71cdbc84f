//! Rectified flow, mirroring the official `diffusion/rectified_flow.py::RectifiedFlow`.
//!
//! Convention (official): **t = 0 is data, t = 1 is noise**, `z_t = (1 - t) x + t z1`, and the
//! model predicts the velocity `dz/dt = z1 - x`. The model is fed t itself (float in [0, 1],
//! not x1000).
//!
//! Sampling is split into a reusable integrator over an arbitrary decreasing time grid
//! ([`FlowTimeGrid`], which also owns the t -> model-timestep mapping) and a velocity closure
//! supplied by the caller, so classifier-free guidance, learned-sigma channel stripping and any
//! other model plumbing stay with the caller. The official sampler is
//! `sample_euler(z, &FlowTimeGrid::uniform(n)?, ..)`; flow-matching samplers with shifted sigmas
//! and `timestep = sigma * 1000` reuse the same step with `FlowTimeGrid::new(sigmas, 1000.0)`.
//!
//! ProMoE (github:ali-vilab/ProMoE `train.py`/`sample.py`) is this flow with two parameters:
//! the logit-normal time is shifted, `sigma = shift u / (1 + (shift - 1) u)`, and the model is
//! fed `sigma * 1000` ([`RectifiedFlow::flow_matching`]); it samples with diffusers'
//! `FlowMatchEulerDiscreteScheduler`, which is [`sample_euler`] on
//! [`FlowTimeGrid::shifted_sigmas`].

use candle_core::{bail, Result, Tensor};

/// Official `RectifiedFlow` (with its defaults `ln=True`, `stratified=False`): the training
/// objective; sampling is [`sample_euler`] / [`sample_heun`]. `shift` and `model_time_scale`
/// are 1 there; ProMoE's flow matching sets them ([`Self::flow_matching`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RectifiedFlow {
    learn_sigma: bool,
    shift: f64,
    model_time_scale: f64,
}

/// The timestep shift of SD3-style flow matching, `shift t / (1 + (shift - 1) t)` (ProMoE
/// `get_sigmas_timesteps` and `get_sampling_sigmas`; diffusers' scheduler `shift`). It
/// multiplies the odds `t / (1 - t)` by `shift`, so two shifts compose into their product.
pub fn shift_time(t: f64, shift: f64) -> f64 {
    shift * t / (1.0 + (shift - 1.0) * t)
}

/// Everything `RectifiedFlow.forward` computes (official names), for the caller's loss and
/// logging (`batchwise_loss` pairs t with `batchwise_mse`).
#[derive(Debug, Clone)]
pub struct RfTrainOut {
    /// `sigmoid(nt)` (shifted when `shift != 1`), shape `[N]`: the interpolation time; the
    /// model was fed `t * model_time_scale` (t itself for the official rectified flow).
    pub t: Tensor,
    /// `(1 - t) x + t z1`, the model input.
    pub zt: Tensor,
    /// `z1 - x`, the target velocity.
    pub target: Tensor,
    /// The predicted velocity (first half of the channels when learn_sigma).
    pub vtheta: Tensor,
    /// Per-sample `mean over C,H,W of (z1 - x - vtheta)^2`, shape `[N]`.
    pub batchwise_mse: Tensor,
    /// `batchwise_mse.mean()`, a scalar: the training loss.
    pub loss: Tensor,
}

impl RectifiedFlow {
    /// `RectifiedFlow(model)`: only the model's `learn_sigma` matters to the maths.
    pub fn new(learn_sigma: bool) -> Self {
        Self { learn_sigma, shift: 1.0, model_time_scale: 1.0 }
    }

    /// ProMoE's objective (`train.py`): `u = sigmoid(nt)` (logit-normal, `logit_mean` 0,
    /// `logit_std` 1), `sigma = shift_time(u, shift)` (`cfg.shift`, 1.0 released), the model fed
    /// `sigma * model_time_scale` (`num_train_timesteps` = 1000); the same interpolation
    /// `(1 - sigma) x + sigma noise` and target `noise - x`.
    pub fn flow_matching(learn_sigma: bool, shift: f64, model_time_scale: f64) -> Result<Self> {
        if !(shift > 0.0 && shift.is_finite() && model_time_scale > 0.0 && model_time_scale.is_finite()) {
            bail!("RectifiedFlow: shift {shift} and model_time_scale {model_time_scale} must be positive");
        }
        Ok(Self { learn_sigma, shift, model_time_scale })
    }

    pub fn learn_sigma(&self) -> bool {
        self.learn_sigma
    }

    /// The velocity part of a model output: `vtheta.chunk(2, dim=1)[0]` when learn_sigma (the
    /// sigma half is ignored by rectified flow), else the output itself.
    pub fn velocity(&self, model_output: &Tensor) -> Result<Tensor> {
        if !self.learn_sigma {
            return Ok(model_output.clone());
        }
        let c2 = model_output.dim(1)?;
        if c2 % 2 != 0 {
            bail!(
                "RectifiedFlow::velocity: learn_sigma output needs an even channel count, got shape {:?}",
                model_output.dims()
            );
        }
        model_output.narrow(1, 0, c2 / 2)
    }

    /// `RectifiedFlow.forward(x, cond)` with its two random draws supplied: `nt` (`[N]`, the
    /// `torch.randn((b,))` that gives the logit-normal `t = sigmoid(nt)`) and `z1` (noise shaped
    /// like `x`). `model(zt, t)` is called once with t as an f32 tensor `[N]` in (0, 1) (times
    /// `model_time_scale`) and must return the raw model output (`2C` channels when learn_sigma).
    pub fn training_losses<F>(
        &self,
        x: &Tensor,
        nt: &Tensor,
        z1: &Tensor,
        model: F,
    ) -> Result<RfTrainOut>
    where
        F: FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
    {
        let b = x.dim(0)?;
        if nt.dims() != [b] {
            bail!(
                "RectifiedFlow: nt has shape {:?}, expected [{b}]",
                nt.dims()
            );
        }
        if z1.dims() != x.dims() {
            bail!(
                "RectifiedFlow: z1 has shape {:?}, expected {:?}",
                z1.dims(),
                x.dims()
            );
        }
        let u = candle_nn::ops::sigmoid(nt)?;
        // `shift_time(u, shift)` elementwise (ProMoE `get_sigmas_timesteps`).
        let t = if self.shift == 1.0 { u } else { ((&u * self.shift)? / ((&u * (self.shift - 1.0))? + 1.0)?)? };
        let mut texp_shape = vec![1usize; x.rank()];
        texp_shape[0] = b;
        let texp = t.reshape(texp_shape)?;
        let zt = (texp.affine(-1.0, 1.0)?.broadcast_mul(x)? + texp.broadcast_mul(z1)?)?;
        let model_t = if self.model_time_scale == 1.0 { t.clone() } else { (&t * self.model_time_scale)? };
        let vtheta = self.velocity(&model(&zt, &model_t)?)?;
        if vtheta.dims() != x.dims() {
            bail!(
                "RectifiedFlow: velocity has shape {:?}, expected {:?}",
                vtheta.dims(),
                x.dims()
            );
        }
        let target = (z1 - x)?;
        let batchwise_mse = (&target - &vtheta)?.sqr()?.flatten_from(1)?.mean(1)?;
        let loss = batchwise_mse.mean_all()?;
        Ok(RfTrainOut {
            t,
            zt,
            target,
            vtheta,
            batchwise_mse,
            loss,
        })
    }
}

/// The times an ODE sampler visits, from the noise end to the data end (strictly decreasing),
/// and the factor mapping a time to the timestep the model is fed.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowTimeGrid {
    times: Vec<f64>,
    model_time_scale: f64,
}

impl FlowTimeGrid {
    /// A grid `times[0] > times[1] > ... > times[n]` (n >= 1 steps); the model is fed
    /// `times[i] * model_time_scale` (1.0 for the official rectified flow, 1000.0 for
    /// flow-matching models trained on `sigma * 1000`).
    pub fn new(times: Vec<f64>, model_time_scale: f64) -> Result<Self> {
        if times.len() < 2 {
            bail!(
                "FlowTimeGrid: need at least 2 times (1 step), got {}",
                times.len()
            );
        }
        if let Some(t) = times.iter().find(|t| !t.is_finite()) {
            bail!("FlowTimeGrid: non-finite time {t}");
        }
        if times.windows(2).any(|w| w[0] <= w[1]) {
            bail!("FlowTimeGrid: times must be strictly decreasing, got {times:?}");
        }
        if !model_time_scale.is_finite() {
            bail!("FlowTimeGrid: non-finite model_time_scale {model_time_scale}");
        }
        Ok(Self {
            times,
            model_time_scale,
        })
    }

    /// The official `RectifiedFlow.sample` grid: `t = i / steps` for i = steps..0 (computed in
    /// f64 as Python does, fed to the model as f32), model timestep = t.
    pub fn uniform(steps: usize) -> Result<Self> {
        if steps == 0 {
            bail!("FlowTimeGrid::uniform: steps must be > 0");
        }
        let n = steps as f64;
        Self::new((0..=steps).rev().map(|i| i as f64 / n).collect(), 1.0)
    }

    /// diffusers `FlowMatchEulerDiscreteScheduler` as ProMoE's `sample.py` sets it up:
    /// `sigmas = shift_time(linspace(1, 0, steps + 1)[:steps], shift)` (`get_sampling_sigmas`;
    /// pass `sample_shift * cfg.shift`, since the scheduler shifts the given sigmas again by its
    /// own `shift`, both 1.0 released), rounded to f32 as the scheduler stores them, then the
    /// terminal 0; the model is fed `sigma * num_train_timesteps` (f32 product, as diffusers).
    pub fn shifted_sigmas(steps: usize, shift: f64, num_train_timesteps: f64) -> Result<Self> {
        if steps == 0 {
            bail!("FlowTimeGrid::shifted_sigmas: steps must be > 0");
        }
        if !(shift > 0.0 && shift.is_finite()) {
            bail!("FlowTimeGrid::shifted_sigmas: shift {shift} must be positive");
        }
        let n = steps as f64;
        let mut times: Vec<f64> = (0..steps).map(|i| shift_time(1.0 - i as f64 / n, shift) as f32 as f64).collect();
        times.push(0.0);
        Self::new(times, num_train_timesteps)
    }

    pub fn times(&self) -> &[f64] {
        &self.times
    }

    pub fn model_time_scale(&self) -> f64 {
        self.model_time_scale
    }

    /// Number of integration steps (`times().len() - 1`).
    pub fn steps(&self) -> usize {
        self.times.len() - 1
    }

    /// The timestep the model is fed at grid point `i`, as f32 (official: `torch.tensor(t)`).
    pub fn model_time(&self, i: usize) -> f32 {
        (self.times[i] * self.model_time_scale) as f32
    }
}

/// The trajectory of a flow sampler.
#[derive(Debug, Clone)]
pub struct FlowSample {
    /// `[z (at times[0]), z after step 1, ..., z after step n]` (n + 1 states): the official
    /// `sample` list; `states.last()` is the result.
    pub states: Vec<Tensor>,
    /// The x (data) prediction at each step, `z - t * v` from the state *before* the step and
    /// the velocity evaluated there (n entries). The official `sample_with_xps` list is
    /// `[states[0]] ++ x_preds`.
    pub x_preds: Vec<Tensor>,
}

/// One Euler step of `dz/dt = v` from `t_cur` to `t_next`: `z + (t_next - t_cur) v`, written as
/// the official `z - dt * v` with `dt = t_cur - t_next` (f32, as `torch.tensor([dt])`).
pub fn euler_step(z: &Tensor, v: &Tensor, t_cur: f64, t_next: f64) -> Result<Tensor> {
    z - (v * (t_cur - t_next))?
}

/// The data prediction at time t: `x = z_t - t v` (straight path from x at t=0 to z1 at t=1).
pub fn x_prediction(z: &Tensor, v: &Tensor, t: f64) -> Result<Tensor> {
    z - (v * t)?
}

fn eval_velocity<F>(velocity: &mut F, z: &Tensor, i: usize) -> Result<Tensor>
where
    F: FnMut(&Tensor, usize) -> Result<Tensor>,
{
    let v = velocity(z, i)?;
    if v.dims() != z.dims() {
        bail!(
            "flow sampler: velocity has shape {:?} but z has {:?} (strip learned-sigma channels in the closure)",
            v.dims(),
            z.dims()
        );
    }
    Ok(v)
}

/// Euler integration of the flow ODE along `grid` (official `RectifiedFlow.sample` and
/// `sample_with_xps` in one pass, with `grid = FlowTimeGrid::uniform(sample_steps)`).
/// `velocity(z, model_time)` returns the (guided) velocity with z's shape; with CFG it is
/// `vu + cfg * (vc - vu)` on all channels, computed by the caller.
pub fn sample_euler<F>(z: &Tensor, grid: &FlowTimeGrid, mut velocity: F) -> Result<FlowSample>
where
    F: FnMut(&Tensor, f32) -> Result<Tensor>,
{
    sample_euler_indexed(z, grid, |z, i| velocity(z, grid.model_time(i)))
}

/// [`sample_euler`] with the velocity given the grid point's index `i` instead of its model
/// time (for a caller that needs the exact grid time `grid.times()[i]`, which the f32 model time
/// only rounds).
pub fn sample_euler_indexed<F>(z: &Tensor, grid: &FlowTimeGrid, mut velocity: F) -> Result<FlowSample>
where
    F: FnMut(&Tensor, usize) -> Result<Tensor>,
{
    let times = grid.times();
    let mut states = Vec::with_capacity(times.len());
    let mut x_preds = Vec::with_capacity(grid.steps());
    states.push(z.clone());
    for i in 0..grid.steps() {
        let z = &states[i];
        let v = eval_velocity(&mut velocity, z, i)?;
        x_preds.push(x_prediction(z, &v, times[i])?);
        let next = euler_step(z, &v, times[i], times[i + 1])?;
        states.push(next);
    }
    Ok(FlowSample { states, x_preds })
}

/// Heun's method (2nd order, trapezoidal corrector) along `grid`: an Euler predictor to
/// `times[i+1]`, a second velocity there, and the step taken with their average. The last step
/// is plain Euler (as in EDM's Heun sampler): it ends at the data end of the grid, where the
/// model is never trained (logit-normal t never reaches 0), and it saves one evaluation.
/// `2n - 1` velocity evaluations; `x_preds` use the first velocity of each step.
pub fn sample_heun<F>(z: &Tensor, grid: &FlowTimeGrid, mut velocity: F) -> Result<FlowSample>
where
    F: FnMut(&Tensor, f32) -> Result<Tensor>,
{
    sample_heun_indexed(z, grid, |z, i| velocity(z, grid.model_time(i)))
}

/// [`sample_heun`] with the velocity given the grid point's index (see [`sample_euler_indexed`]).
pub fn sample_heun_indexed<F>(z: &Tensor, grid: &FlowTimeGrid, mut velocity: F) -> Result<FlowSample>
where
    F: FnMut(&Tensor, usize) -> Result<Tensor>,
{
    let times = grid.times();
    let n = grid.steps();
    let mut states = Vec::with_capacity(times.len());
    let mut x_preds = Vec::with_capacity(n);
    states.push(z.clone());
    for i in 0..n {
        let z = &states[i];
        let v = eval_velocity(&mut velocity, z, i)?;
        x_preds.push(x_prediction(z, &v, times[i])?);
        let euler = euler_step(z, &v, times[i], times[i + 1])?;
        let next = if i + 1 == n {
            euler
        } else {
            let v2 = eval_velocity(&mut velocity, &euler, i + 1)?;
            let v_avg = ((v + v2)? * 0.5)?;
            euler_step(z, &v_avg, times[i], times[i + 1])?
        };
        states.push(next);
    }
    Ok(FlowSample { states, x_preds })
}
