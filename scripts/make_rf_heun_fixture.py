#!/usr/bin/env python3
"""Records diffusers' flow-matching Heun and Euler schedulers evaluation by evaluation, for
tests/suite/rf_heun.rs.

Conventions. diffusers' `FlowMatchHeunDiscreteScheduler` and `FlowMatchEulerDiscreteScheduler`
use `x_sigma = (1 - sigma) x0 + sigma noise` and a model that predicts the velocity
`noise - x0`, integrated from sigma = 1 (noise) to sigma = 0 (data), and feed the model
`timestep = sigma * num_train_timesteps`. DiT-MoE's official `RectifiedFlow` (and ditmoe's
`rf-euler` / `rf-heun`) uses `z_t = (1 - t) x + t z1` with velocity `z1 - x` from t = 1 to
t = 0: the same ODE with t = sigma, no sign flip. Two things differ, and both are recorded:

* the time fed to the model: DiT-MoE feeds t itself, diffusers `sigma * 1000`;
* the grid: DiT-MoE samples `t = i / n` (i = n..0); diffusers' own `set_timesteps(n)` takes
  `linspace(1, 1/1000, n)` and appends 0 (its sigma_min is the last of its 1000 training
  timesteps / 1000), so the same n gives other times.

So each scheduler runs twice per step count:

* `grid = "diffusers"`: the scheduler's own `set_timesteps(n)`. ditmoe's integrator runs on the
  recorded sigmas (`FlowTimeGrid::new(sigmas, 1000)`), fed `sigma * 1000` as diffusers does.
* `grid = "uniform"`: DiT-MoE's grid `linspace(1, 0, n + 1)`. For Euler it goes through the
  scheduler's public `set_timesteps(sigmas=linspace(1, 0, n + 1)[:n])` (how ProMoE's sample.py
  drives it); Heun's `set_timesteps` takes no sigmas, so after calling it the script replaces
  `scheduler.sigmas` / `scheduler.timesteps` with the uniform ones laid out exactly as its
  `set_timesteps` lays out its own (each interior sigma twice, a final 0; the first timestep
  once, each later one twice). The scheduler's `step` is untouched. ditmoe runs
  `RectifiedFlowSampler::new(n, heun)`, the sampler `generate` uses for DiT-MoE models, which
  feeds t itself: the recorded model times are then `sigma * 1000` and the model function
  below is written in sigma so that both feedings give the same velocity.

The "model" is a fixed deterministic function in torch f32 of the sample and
`s = timestep / 1000` (= sigma):

    v(x, s) = (s - 0.25 (1 - s)) / (0.25 (1 - s)^2 + s^2) * x + 0.1 * sin(3 x + s)

(the exact velocity E[noise - x0 | x_s] for N(0, 0.25) data, plus a nonlinear term). Per model
evaluation it records the sample and timestep given to the model, the model output and what
`scheduler.step` returned (for Heun: the Euler predictor after a first-order call, the finished
step after a second-order call).

    pip install torch safetensors diffusers==0.35.2
    python3 scripts/make_rf_heun_fixture.py --out tests/fixtures/rf_heun

writes {heun,euler}_{diffusers,uniform}_{10,20}.safetensors. Tensors (E = evaluations: 2n - 1
for Heun, n for Euler; the tensor names are the README's):

    sigmas         f32 [n + 1]           the grid, sigma = 1 ... 0 (each once)
    sched_sigmas   f32 [len]             scheduler.sigmas as step() read them
    timesteps      f32 [E]               scheduler.timesteps (= the model's time input)
    x_T            f32 [2, 4, 8, 8]      initial sample (torch.manual_seed(0) randn)
    eval_sample    f32 [E, 2, 4, 8, 8]   sample given to the model and to step() at evaluation e
    model_output   f32 [E, 2, 4, 8, 8]   v(eval_sample[e], timesteps[e] / 1000)
    step_out       f32 [E, 2, 4, 8, 8]   scheduler.step(...).prev_sample of evaluation e
    states         f32 [n + 1, 2, 4, 8, 8] x_T, then the sample at sigmas[1], ..., sigmas[n]
"""
import argparse
import os

import diffusers
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from safetensors.torch import save_file

SHAPE = (2, 4, 8, 8)
NUM_TRAIN_TIMESTEPS = 1000


def model(x, timestep):
    s = timestep.to(torch.float32) / NUM_TRAIN_TIMESTEPS
    one_minus = 1.0 - s
    gain = (s - 0.25 * one_minus) / (0.25 * one_minus * one_minus + s * s)
    return gain * x + 0.1 * torch.sin(3.0 * x + s)


def uniform_sigmas(steps):
    """DiT-MoE's grid t = i / n, i = n..1, as f32 (without the final 0)."""
    return np.linspace(1.0, 0.0, steps + 1)[:steps].astype(np.float32)


def heun_scheduler(steps, grid):
    sched = FlowMatchHeunDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
    sched.set_timesteps(steps)
    if grid == "uniform":
        # Exactly FlowMatchHeunDiscreteScheduler.set_timesteps' layout, on other sigmas.
        sigmas = torch.from_numpy(uniform_sigmas(steps))
        timesteps = sigmas * NUM_TRAIN_TIMESTEPS
        sched.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        sigmas = torch.cat([sigmas, torch.zeros(1)])
        sched.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    return sched


def euler_scheduler(steps, grid):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
    if grid == "uniform":
        sched.set_timesteps(sigmas=uniform_sigmas(steps).tolist())
    else:
        sched.set_timesteps(steps)
    return sched


def record(kind, steps, grid):
    sched = heun_scheduler(steps, grid) if kind == "heun" else euler_scheduler(steps, grid)
    evals = 2 * steps - 1 if kind == "heun" else steps
    assert len(sched.timesteps) == evals, (kind, grid, steps, sched.timesteps)
    sched_sigmas = sched.sigmas.clone()
    # The grid, each sigma once: Heun lists interior sigmas twice.
    sigmas = torch.unique_consecutive(sched_sigmas)
    assert len(sigmas) == steps + 1 and float(sigmas[-1]) == 0.0, sigmas
    torch.manual_seed(0)
    x = torch.randn(SHAPE, dtype=torch.float32)
    x_T = x.clone()
    ins, outs, vs, states = [], [], [], [x_T]
    for e, t in enumerate(sched.timesteps):
        v = model(x, t)
        ins.append(x.clone())
        vs.append(v.clone())
        x = sched.step(v, t, x).prev_sample
        outs.append(x.clone())
        # A finished step: Euler's every call; Heun's second-order calls and its final
        # first-order call (the last interval, to sigma 0, is plain Euler in diffusers).
        if kind == "euler" or e % 2 == 1 or e == evals - 1:
            states.append(x.clone())
    assert len(states) == steps + 1
    return {
        "sigmas": sigmas.to(torch.float32).contiguous(),
        "sched_sigmas": sched_sigmas.to(torch.float32).contiguous(),
        "timesteps": sched.timesteps.to(torch.float32).contiguous(),
        "x_T": x_T.contiguous(),
        "eval_sample": torch.stack(ins).contiguous(),
        "model_output": torch.stack(vs).contiguous(),
        "step_out": torch.stack(outs).contiguous(),
        "states": torch.stack(states).contiguous(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/rf_heun")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for kind, cls in (("heun", FlowMatchHeunDiscreteScheduler), ("euler", FlowMatchEulerDiscreteScheduler)):
        for grid in ("diffusers", "uniform"):
            for steps in (10, 20):
                tensors = record(kind, steps, grid)
                meta = {
                    "diffusers": diffusers.__version__,
                    "torch": torch.__version__,
                    "scheduler": cls.__name__,
                    "config": repr(dict(cls(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0).config)),
                    "grid": grid,
                    "steps": str(steps),
                }
                path = os.path.join(args.out, f"{kind}_{grid}_{steps}.safetensors")
                save_file(tensors, path, metadata=meta)
                sig = tensors["sigmas"].tolist()
                print(path, "sigmas", [round(s, 4) for s in sig[:3]], "...", [round(s, 4) for s in sig[-3:]],
                      "final |x| max", float(tensors["states"][-1].abs().max()))


if __name__ == "__main__":
    main()
