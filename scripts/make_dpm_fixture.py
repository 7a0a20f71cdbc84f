#!/usr/bin/env python3
"""Records diffusers' DPM-Solver++ (2M) step by step, for tests/suite/dpm_solver.rs.

diffusers' own `DPMSolverMultistepScheduler` is configured as `ditmoe`'s `dpm++2m` sampler
(DiT's linear beta schedule, 1e-4..0.02 over 1000 steps; DPM-Solver++, order 2, midpoint,
lower_order_final, final sigma zero, linspace timesteps, epsilon prediction, no thresholding,
no Karras sigmas) and driven by a fixed deterministic "model" computed in torch f32:

    eps(x, t) = sigma_t * x / (0.25 alpha_t^2 + sigma_t^2) + 0.1 * sin(3 x + t / 100)

(the exact noise prediction for N(0, 0.25) data, plus a nonlinear term), with alpha_t, sigma_t
from the scheduler's own alphas_cumprod. Per step it records the timestep, the sample before
`scheduler.step`, the model output passed to it and the sample after it.

    pip install torch safetensors diffusers==0.35.2
    python3 scripts/make_dpm_fixture.py --out tests/fixtures/dpm_solver

writes dpm_10.safetensors and dpm_20.safetensors (10 and 20 steps). Tensors (n = steps):

    timesteps      i64 [n]                 scheduler.timesteps
    sigmas         f32 [n + 1]             scheduler.sigmas (sqrt((1 - ab) / ab), final 0)
    alphas_cumprod f32 [1000]              scheduler.alphas_cumprod
    x_T            f32 [2, 4, 8, 8]        initial sample (torch.manual_seed(0) randn)
    sample_in      f32 [n, 2, 4, 8, 8]     sample fed to step k
    model_output   f32 [n, 2, 4, 8, 8]     eps fed to step k
    sample_out     f32 [n, 2, 4, 8, 8]     scheduler.step(...).prev_sample of step k
"""
import argparse
import os

import diffusers
import torch
from diffusers import DPMSolverMultistepScheduler
from safetensors.torch import save_file

SHAPE = (2, 4, 8, 8)


def scheduler():
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        solver_order=2,
        prediction_type="epsilon",
        thresholding=False,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
        steps_offset=0,
    )


def model(x, t, alphas_cumprod):
    ab = alphas_cumprod[int(t)]
    a2, s2 = ab, 1.0 - ab
    return torch.sqrt(s2) * x / (0.25 * a2 + s2) + 0.1 * torch.sin(3.0 * x + float(t) / 100.0)


def record(steps):
    sched = scheduler()
    sched.set_timesteps(steps)
    torch.manual_seed(0)
    x = torch.randn(SHAPE, dtype=torch.float32) * sched.init_noise_sigma
    x_T = x.clone()
    ins, outs, eps_all = [], [], []
    for t in sched.timesteps:
        eps = model(x, t, sched.alphas_cumprod)
        ins.append(x.clone())
        eps_all.append(eps.clone())
        x = sched.step(eps, t, x).prev_sample
        outs.append(x.clone())
    return {
        "timesteps": sched.timesteps.to(torch.int64).contiguous(),
        "sigmas": sched.sigmas.to(torch.float32).contiguous(),
        "alphas_cumprod": sched.alphas_cumprod.to(torch.float32).contiguous(),
        "x_T": x_T.contiguous(),
        "sample_in": torch.stack(ins).contiguous(),
        "model_output": torch.stack(eps_all).contiguous(),
        "sample_out": torch.stack(outs).contiguous(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/dpm_solver")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "scheduler": "DPMSolverMultistepScheduler",
        "config": repr(dict(scheduler().config)),
    }
    for steps in (10, 20):
        tensors = record(steps)
        path = os.path.join(args.out, f"dpm_{steps}.safetensors")
        save_file(tensors, path, metadata=meta)
        print(path, "timesteps", tensors["timesteps"].tolist(), "final |x| max", float(tensors["sample_out"][-1].abs().max()))


if __name__ == "__main__":
    main()
