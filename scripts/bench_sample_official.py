#!/usr/bin/env python3
"""End-to-end sampling throughput of the official DiT-MoE code (feizc/DiT-MoE sample.py), the
side of `scripts/bench-sampling.sh` that `ditmoe generate` is compared with.

Subcommands:

  official   builds the official model with random weights of the real shapes (DiT-MoE-XL/2-8E2A,
             or with --tiny a 2-block width-64 DiT-MoE for a CPU smoke test), saves them for
             `ditmoe generate` (--weights, the same tensors both sides use), saves a random
             diffusers AutoencoderKL with sd-vae-ft-mse's config (--vae folder), then times
             sample.py's sampling path for each case and writes JSON.
  images     writes class folders of random JPEGs (the input of `ditmoe encode`).
  encode-ref the diffusers VAE encoder over those folders as the official train.py runs it
             (center_crop_arr, vae.encode(x).latent_dist.sample().mul_(0.18215)), images/s.
  table      the markdown table of the official JSON and the ditmoe JSONL bench-sampling.sh writes.

What is timed (official side), as sample.py runs it:
- DDPM: `create_diffusion(str(steps))`, `p_sample_loop(model.forward_with_cfg, ...)` on the
  doubled batch [z, z] with labels [y, 1000] (one forward of 2N per step), clip_denoised=False,
  under `torch.autocast("cuda")`; then, outside autocast, `vae.decode(samples / 0.18215).sample`
  in f32.
- Rectified flow: `RectifiedFlow(model).sample_with_xps(noise, y, null_cond=[1000]*N,
  sample_steps, cfg)` (two forwards of N per step: conditional, then unconditional) and the
  decode, both inside `torch.autocast("cuda")` as in sample.py (so the VAE's convolutions run in
  fp16 there). sample.py hard-codes 50 steps and cfg 7.0 for this branch; here both are the
  case's (the cost does not depend on the scale).
- XL/2 takes sample.py's XL branch: pretraining_tp=1, use_flash_attn=True (FlashSelfMHAModified
  with q/k LayerNorm; flash_attn's FlashSelfAttention is replaced by an SDPA shim, as in
  shared/tools/bench_official_ditmoe.py, because flash_attn is not installed) and model.half().
  TF32 on, as sample.py sets it. No gradients, model.eval() (the MoE runs moe_infer).
- All N images in one batch, as sample.py does. Model and VAE loaded and warmed up first (one run
  of each case at 2 steps); then one timed run per case: torch.cuda.synchronize() before, after
  the sampling loop and after the decode. images/s = N / (sampling + decode).

Random weights: every tensor of 2 or more dims N(0, 1/fan_in) (fan_in = product of the other
dims), biases N(0, 0.02), LayerNorm weights 1 + N(0, 0.02); pos_embed keeps the official fixed
sin-cos table. The official init zeroes adaLN and the final layer, which would make the work
degenerate. The VAE keeps diffusers' default (non-zero) init.

Examples:
  python3 scripts/bench_sample_official.py official --official gpu/official --work /tmp/w \
      --out official.json                                  # GPU, XL/2, the four default cases
  python3 scripts/bench_sample_official.py official --official gpu/official --work /tmp/w \
      --device cpu --tiny --cases ddpm:250:8,rf:50:8 --out tiny.json   # CPU smoke test
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

LATENT_CHANNELS, NUM_CLASSES, NULL_CLASS = 4, 1000, 1000
# sample.py's class labels; image i of N is class CLASSES[i // (N // 8)] (class-major, as
# `ditmoe generate --class <these> --num N/8` orders them)
CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]
SD_LATENT_SCALE = 0.18215
# stabilityai/sd-vae-ft-mse config.json (the VAE sample.py's --vae-path names)
SD_VAE_CONFIG = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=256,
)
# --tiny: a VAE of the same structure (4 blocks, 8x downsampling, 256 px images) but 16 wide
TINY_VAE_CONFIG = dict(SD_VAE_CONFIG, block_out_channels=[16, 16, 16, 16], layers_per_block=1,
                       norm_num_groups=8)
# model shapes: (depth, hidden, heads); XL/2 is models.DiT_XL_2
XL = dict(name="DiT-MoE-XL/2-8E2A", depth=28, hidden=1152, heads=16)
TINY = dict(name="tiny (2 blocks, width 64)", depth=2, hidden=64, heads=4)
DEFAULT_CASES = "ddpm:250:8,ddpm:250:64,rf:50:8,rf:50:64"


def log(*a):
    print(*a, flush=True)


def parse_cases(spec):
    cases = []
    for item in spec.split(","):
        sampler, steps, n = item.split(":")
        if sampler not in ("ddpm", "rf"):
            raise SystemExit(f"--cases: unknown sampler {sampler!r} (ddpm or rf)")
        n = int(n)
        if n % len(CLASSES) and n > len(CLASSES):
            raise SystemExit(f"--cases: {n} images: give a multiple of {len(CLASSES)} (classes x num)")
        cases.append(dict(sampler=sampler, steps=int(steps), images=n))
    return cases


def labels_for(n):
    """Class-major labels: `--class CLASSES[:k] --num n/k` in ditmoe generate."""
    k = min(n, len(CLASSES))
    return [c for c in CLASSES[:k] for _ in range(n // k)]


def ditmoe_class_args(n):
    k = min(n, len(CLASSES))
    return ",".join(str(c) for c in CLASSES[:k]), n // k


#################################################################################
#                         Model, weights, VAE                                   #
#################################################################################

def import_official(folder):
    import torch.nn as nn
    import torch.nn.functional as F

    sys.path.insert(0, os.path.abspath(folder))
    import models  # the official models.py (prints "flash_attn import failed" without flash_attn)

    class SDPAFlashSelfAttention(nn.Module):
        """flash_attn.modules.mha.FlashSelfAttention (not installed): qkv [b, s, 3, h, d] ->
        [b, s, h, d], softmax scale 1/sqrt(d), no mask, no dropout at eval."""

        def __init__(self, attention_dropout=0.0, **kw):
            super().__init__()

        def forward(self, qkv):
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    if not hasattr(models, "FlashSelfAttention"):
        models.FlashSelfAttention = SDPAFlashSelfAttention
    from diffusion import create_diffusion
    from diffusion.rectified_flow import RectifiedFlow
    return models, create_diffusion, RectifiedFlow


def randomize_(model):
    """Non-degenerate random weights (see the module doc)."""
    import torch
    import torch.nn as nn

    norm_weights = {id(m.weight) for m in model.modules()
                    if isinstance(m, nn.LayerNorm) and m.weight is not None}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue  # the official fixed sin-cos table
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif id(p) in norm_weights:
                p.normal_(1.0, 0.02)
            else:
                p.normal_(0.0, 0.02)


def build_model(models, shape, device, tiny):
    """sample.py's XL branch: pretraining_tp=1, use_flash_attn=True (qk-norm attention)."""
    import torch
    kw = dict(input_size=32, num_classes=NUM_CLASSES, num_experts=8, num_experts_per_tok=2,
              pretraining_tp=1, use_flash_attn=True, learn_sigma=True)
    with torch.device(device):
        if tiny:
            m = models.DiT(depth=shape["depth"], hidden_size=shape["hidden"], patch_size=2,
                           num_heads=shape["heads"], **kw)
        else:
            m = models.DiT_XL_2(**kw)
    return m


def ditmoe_config(shape):
    """config.json of a ditmoe model folder for this shape (the XL preset's settings)."""
    return dict(input_size=32, patch_size=2, in_channels=LATENT_CHANNELS,
                hidden_size=shape["hidden"], depth=shape["depth"], num_heads=shape["heads"],
                mlp_ratio=4, class_dropout_prob=0.1, num_classes=NUM_CLASSES, num_experts=8,
                num_experts_per_tok=2, pretraining_tp=1, learn_sigma=True, use_flash_attn=True,
                n_shared_experts=2, aux_loss_alpha=0.01, seq_aux=False, norm_topk_prob=False)


def save_state_dict(model, path):
    from safetensors.torch import save_file
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def load_state_dict(model, path, device):
    from safetensors.torch import load_file
    sd = load_file(path, device=str(device))
    model.load_state_dict(sd)


def make_vae(cfg, device, folder):
    """A random AutoencoderKL with `cfg`, saved (config.json + diffusion_pytorch_model.safetensors)
    unless the folder holds one already, in which case that one is loaded."""
    import torch
    from diffusers.models import AutoencoderKL
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if os.path.isfile(weights):
        return AutoencoderKL.from_pretrained(folder).to(device).eval(), False
    torch.manual_seed(1)
    with torch.device(device):
        vae = AutoencoderKL(**cfg)
    tmp = folder + ".tmp"
    vae.save_pretrained(tmp, safe_serialization=True)
    if os.path.isdir(folder):
        os.rmdir(folder)
    os.replace(tmp, folder)
    return vae.eval(), True


#################################################################################
#                         The official sampling path                            #
#################################################################################

class Clock:
    def __init__(self, device):
        import torch
        self.cuda = str(device).startswith("cuda")
        self.torch = torch

    def now(self):
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()


def sample_official(case, steps, model, vae, create_diffusion, RectifiedFlow, device, fp16, clock, seed):
    """One run of sample.py's path for case (steps overrides the case's, for the warm-up).
    Returns (sampling seconds, decode seconds, final latents, decoded images)."""
    import torch
    torch.manual_seed(seed)
    n = case["images"]
    labels = labels_for(n)
    dev_type = "cuda" if str(device).startswith("cuda") else "cpu"
    # sample.py: `with torch.autocast(device_type='cuda')` (fp16) around the model for fp16 models
    amp = (lambda: torch.autocast(device_type=dev_type, dtype=torch.float16)) if fp16 else contextlib.nullcontext
    cfg = case["cfg"]
    if case["sampler"] == "ddpm":
        diffusion = create_diffusion(str(steps))
        t0 = clock.now()
        z = torch.randn(n, LATENT_CHANNELS, 32, 32, device=device)
        y = torch.tensor(labels, device=device)
        z = torch.cat([z, z], 0)
        y = torch.cat([y, torch.tensor([NULL_CLASS] * n, device=device)], 0)
        model_kwargs = dict(y=y, cfg_scale=cfg)
        with amp():
            samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                              model_kwargs=model_kwargs, progress=False, device=device)
        samples, _ = samples.chunk(2, dim=0)
        t1 = clock.now()
        images = vae.decode(samples / SD_LATENT_SCALE).sample
        t2 = clock.now()
    else:
        diffusion = RectifiedFlow(model)
        t0 = clock.now()
        with amp():
            init_noise = torch.randn(n, LATENT_CHANNELS, 32, 32, device=device)
            conds = torch.tensor(labels, device=device)
            xs = diffusion.sample_with_xps(init_noise, conds, null_cond=torch.tensor([NULL_CLASS] * n, device=device),
                                           sample_steps=steps, cfg=cfg)
            samples = xs[-1]
            t1 = clock.now()
            images = vae.decode(samples / SD_LATENT_SCALE).sample
            t2 = clock.now()
    return t1 - t0, t2 - t1, samples, images


def cmd_official(a):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True  # as sample.py
    torch.backends.cudnn.allow_tf32 = True
    torch.set_grad_enabled(False)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    fp16 = cuda and not a.fp32  # sample.py: XL -> model.half() under fp16 autocast
    shape = TINY if a.tiny else XL
    cases = parse_cases(a.cases)
    a.warmup_steps = max(a.warmup_steps, 2)
    os.makedirs(a.work, exist_ok=True)
    t_start = time.time()

    info = dict(model=shape["name"], device=str(device), torch=torch.__version__,
                precision="fp16 model (model.half()) under torch.autocast, as sample.py's XL branch" if fp16
                else "fp32", vae="diffusers AutoencoderKL, f32 weights (sd-vae-ft-mse config)" + (" (tiny)" if a.tiny else ""))
    if cuda:
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, cuda=torch.version.cuda)
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError as e:
        raise SystemExit(f"diffusers is needed for the VAE ({e}); bench-sampling.sh installs it from gpu/whl")
    log("env:", json.dumps(info))
    models, create_diffusion, RectifiedFlow = import_official(a.official)
    commit_file = os.path.join(a.official, "COMMIT")  # written by scripts/fetch-official-ditmoe.sh
    if os.path.isfile(commit_file):
        with open(commit_file) as f:
            info["official_commit"] = f.read().strip()

    # the model: its random weights are saved once (for ditmoe) and reused by later runs
    t0 = time.time()
    torch.manual_seed(0)
    model = build_model(models, shape, device, a.tiny)
    weights = os.path.join(a.work, "dit-moe-xl-2-8e2a.safetensors" if not a.tiny else "tiny-model/model.safetensors")
    os.makedirs(os.path.dirname(weights), exist_ok=True)
    if os.path.isfile(weights):
        if fp16:
            model = model.half()
        load_state_dict(model, weights, device)
        made = False
    else:
        randomize_(model)
        if fp16:
            model = model.half()
        save_state_dict(model, weights)
        made = True
    model.eval()
    # ditmoe model folders (config.json beside model.safetensors): with --tiny the model itself;
    # else warmup-model, one block of XL's widths (the same kernels, 1/28 of the weights), what
    # bench-sampling.sh fills ditmoe's kernel cache with before the timed runs
    if a.tiny:
        with open(os.path.join(a.work, "tiny-model", "config.json"), "w") as f:
            json.dump(ditmoe_config(TINY), f, indent=2)
    else:
        warm = dict(XL, name="XL widths, 1 block", depth=1)
        warm_dir = os.path.join(a.work, "warmup-model")
        if not os.path.isfile(os.path.join(warm_dir, "model.safetensors")):
            os.makedirs(warm_dir, exist_ok=True)
            torch.manual_seed(0)
            m1 = build_model(models, warm, device, True)
            randomize_(m1)
            save_state_dict(m1.half() if fp16 else m1, os.path.join(warm_dir, "model.safetensors"))
            del m1
        with open(os.path.join(warm_dir, "config.json"), "w") as f:
            json.dump(ditmoe_config(warm), f, indent=2)
    npar = sum(p.numel() for p in model.parameters())
    info.update(params_M=round(npar / 1e6, 1), weights=weights,
                weights_dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
    log(f"model {shape['name']}: {npar / 1e6:.1f} M parameters, weights {'written to' if made else 'read from'} "
        f"{weights} ({os.path.getsize(weights) / 2**30:.2f} GiB), {time.time() - t0:.1f} s")

    t0 = time.time()
    vae_dir = os.path.join(a.work, "vae")
    vae, made = make_vae(TINY_VAE_CONFIG if a.tiny else SD_VAE_CONFIG, device, vae_dir)
    info["vae_dir"] = vae_dir
    log(f"VAE {'written to' if made else 'read from'} {vae_dir}, {time.time() - t0:.1f} s")
    if a.no_time:
        return

    results = []

    def emit():
        if a.out:
            tmp = a.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(dict(info=info, results=results), f, indent=1)
            os.replace(tmp, a.out)

    clock = Clock(device)
    for case in cases:
        case = dict(case, cfg=a.cfg_scale)
        if a.deadline_s and time.time() - t_start > a.deadline_s:
            results.append(dict(case, error="skipped (deadline)"))
            log("RESULT", json.dumps(results[-1]))
            emit()
            continue
        row = dict(case)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            w0 = time.perf_counter()
            sample_official(case, a.warmup_steps, model, vae, create_diffusion, RectifiedFlow, device, fp16, clock, a.seed)
            row["warmup_s"] = round(time.perf_counter() - w0, 2)
            runs = []
            for r in range(a.repeats):
                s, d, samples, images = sample_official(case, case["steps"], model, vae, create_diffusion, RectifiedFlow,
                                                        device, fp16, clock, a.seed + r)
                runs.append((s, d))
            s = statistics.median(x[0] for x in runs)
            d = statistics.median(x[1] for x in runs)
            total = statistics.median(x[0] + x[1] for x in runs)
            row.update(sample_s=round(s, 3), decode_s=round(d, 3), total_s=round(total, 3),
                       images_per_s=round(case["images"] / total, 3),
                       ms_per_step=round(s / case["steps"] * 1e3, 2), runs=len(runs),
                       latent_absmax=round(float(samples.float().abs().max()), 2),
                       images_finite=bool(torch.isfinite(images.float()).all()))
            if cuda:
                row["peak_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        except Exception as e:  # recorded, and the other cases still run
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)
            row.update(error="OOM" if oom else type(e).__name__, msg=str(e).split("\n")[0][:200])
            if cuda:
                torch.cuda.empty_cache()
        results.append(row)
        log("RESULT", json.dumps(row))
        emit()
    emit()
    log(f"official sampling benchmark: {time.time() - t_start:.1f} s")


#################################################################################
#                         ditmoe encode input and reference                     #
#################################################################################

def cmd_images(a):
    """Random but image-like JPEGs: smooth colour fields (a few random low-resolution pixels
    upsampled) plus a little noise, a size and decode cost near a photo's."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    total = 0
    for c in range(a.classes):
        d = os.path.join(a.out, f"class{c:02d}")
        os.makedirs(d, exist_ok=True)
        for i in range(a.per_class):
            low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize((a.size, a.size), Image.BICUBIC)
            arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(a.size, a.size, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)
            total += 1
    log(f"wrote {total} JPEGs of {a.size}x{a.size} into {a.out} ({a.classes} classes)")


def center_crop_arr(pil_image, image_size):
    """The official train.py center crop (ADM's)."""
    import numpy as np
    from PIL import Image
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def cmd_encode_ref(a):
    """diffusers' VAE encoder over the class folders, one process, batch --batch-size, f32 with
    TF32 (train.py sets it), images loaded with PIL on the main thread: images/s over the whole
    pass after a warm-up batch, and the encoder alone."""
    import numpy as np
    import torch
    from diffusers.models import AutoencoderKL
    from PIL import Image
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_grad_enabled(False)
    device = torch.device(a.device)
    vae = AutoencoderKL.from_pretrained(a.vae).to(device).eval()
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(a.data) for f in fs if f.lower().endswith((".jpg", ".jpeg", ".png")))
    clock = Clock(device)

    def load(paths):
        xs = []
        for p in paths:
            img = center_crop_arr(Image.open(p).convert("RGB"), a.image_size)
            xs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(127.5).sub_(1.0))
        return torch.stack(xs).to(device)

    vae.encode(load(files[: a.batch_size])).latent_dist.sample().mul_(SD_LATENT_SCALE)
    t0 = clock.now()
    enc = 0.0
    for i in range(0, len(files), a.batch_size):
        x = load(files[i: i + a.batch_size])
        e0 = clock.now()
        z = vae.encode(x).latent_dist.sample().mul_(SD_LATENT_SCALE).cpu()
        enc += clock.now() - e0
    total = clock.now() - t0
    row = dict(kind="encode-ref", images=len(files), batch_size=a.batch_size, total_s=round(total, 3),
               images_per_s=round(len(files) / total, 2), encoder_s=round(enc, 3),
               encoder_images_per_s=round(len(files) / enc, 2), latent_shape=list(z.shape[1:]))
    log("RESULT", json.dumps(row))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(row, f, indent=1)


#################################################################################
#                         The comparison table                                  #
#################################################################################

def cmd_table(a):
    with open(a.official) as f:
        off = json.load(f)
    ours = []
    if os.path.isfile(a.ditmoe):
        with open(a.ditmoe) as f:
            ours = [json.loads(line) for line in f if line.strip()]
    key = lambda r: (r["sampler"], r["steps"], r["images"])
    mine = {key(r): r for r in ours}
    info = off["info"]
    lines = [f"{info['model']}, 256 px (latent 32x32x4), cfg {off['results'][0]['cfg'] if off['results'] else '?'}, "
             f"random weights; device: {info.get('gpu', info['device'])}",
             "",
             "official: feizc/DiT-MoE sample.py path (" + info["precision"] + "; " + info["vae"] + "); "
             "ditmoe: `ditmoe generate` (" + (ours[0].get("dtype", "?") if ours else "?") + "), the seconds it prints "
             "(sampling + decode, model loaded). images/s counts sampling and the VAE decode.",
             "",
             "| sampler | steps | images | official s (sampling + decode) | official images/s | ditmoe s | ditmoe images/s | speed-up | ditmoe process wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in off["results"]:
        m = mine.get(key(r), {})
        name = "DDPM" if r["sampler"] == "ddpm" else "rectified flow (Euler)"
        if "total_s" in r:
            o_s = f"{r['total_s']:.2f} ({r['sample_s']:.2f} + {r['decode_s']:.2f})"
            o_ips = f"{r['images_per_s']:.2f}"
        else:
            o_s, o_ips = r.get("error", "?"), ""
        if m.get("seconds"):
            d_s = f"{m['seconds']:.3g}"
            if m.get("batch_size") and m["batch_size"] != r["images"]:
                d_s += f" (batches of {m['batch_size']})"
            d_ips = f"{r['images'] / m['seconds']:.2f}"
            ratio = f"{(r['images'] / m['seconds']) / r['images_per_s']:.2f}x" if "images_per_s" in r else ""
            wall = f"{m['wall_s']:.1f}"
        else:
            d_s, d_ips, ratio, wall = (m.get("error", "not run") if m else "not run"), "", "", (f"{m['wall_s']:.1f}" if m.get("wall_s") else "")
        lines.append(f"| {name} | {r['steps']} | {r['images']} | {o_s} | {o_ips} | {d_s} | {d_ips} | {ratio} | {wall} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("official", help="random weights + VAE for both sides, then the official timings")
    o.add_argument("--official", default="gpu/official", help="folder with the official models.py and diffusion/")
    o.add_argument("--work", required=True, help="where the weights and the VAE go (several GB for XL)")
    o.add_argument("--out", help="JSON results")
    o.add_argument("--device", default="cuda")
    o.add_argument("--tiny", action="store_true", help="a 2-block width-64 model and a 16-wide VAE (CPU smoke test)")
    o.add_argument("--fp32", action="store_true", help="keep the model in f32 (sample.py's non-XL branch)")
    o.add_argument("--cases", default=DEFAULT_CASES, help="sampler:steps:images,... (sampler ddpm or rf)")
    o.add_argument("--cfg-scale", type=float, default=4.0)
    o.add_argument("--warmup-steps", type=int, default=2,
                   help="steps of the warm-up run of each case (at least 2: a 1-step DDPM schedule is degenerate)")
    o.add_argument("--repeats", type=int, default=1, help="timed runs per case (median)")
    o.add_argument("--seed", type=int, default=2024)
    o.add_argument("--deadline-s", type=float, default=None, help="skip cases that would start after this")
    o.add_argument("--no-time", action="store_true", help="only write the weights and the VAE")
    o.set_defaults(fn=cmd_official)
    i = sub.add_parser("images", help="class folders of random JPEGs")
    i.add_argument("--out", required=True)
    i.add_argument("--classes", type=int, default=2)
    i.add_argument("--per-class", type=int, default=256)
    i.add_argument("--size", type=int, default=256)
    i.set_defaults(fn=cmd_images)
    e = sub.add_parser("encode-ref", help="the diffusers VAE encoder over class folders")
    e.add_argument("--data", required=True)
    e.add_argument("--vae", required=True)
    e.add_argument("--device", default="cuda")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--image-size", type=int, default=256)
    e.add_argument("--out")
    e.set_defaults(fn=cmd_encode_ref)
    t = sub.add_parser("table", help="markdown table of the official JSON and ditmoe's JSONL")
    t.add_argument("--official", required=True)
    t.add_argument("--ditmoe", required=True)
    t.add_argument("--out")
    t.set_defaults(fn=cmd_table)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
