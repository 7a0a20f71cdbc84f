"""transformers' own implementation of the `bench_lm` shapes, timed as `bench_lm` times ours.

    cargo run --release --features cuda --example bench_lm -- --write-configs /tmp/bench-lm
    python scripts/bench_lm_transformers.py --configs /tmp/bench-lm --names mixtral,qwen2-moe

Each `<configs>/<name>/config.json` is an HF config (written by `bench_lm`, so both sides build
the same model); the model gets random weights in bf16 on the GPU. Measured, for each experts
backend of transformers (`eager`: a loop over the experts that received tokens, the reference
implementation; `grouped_mm`: `torch._grouped_mm` over expert-sorted tokens):
- prefill: one forward of [1, T] tokens without a cache, tokens/s;
- decode: batch B, a 16-token prompt, then `--decode-steps` greedy steps with the KV cache,
  new tokens/s (B x steps / time).
Times are medians of CUDA-event-timed repeats after warm-up. One JSON object per line.
"""
import argparse
import json
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def build(path, experts):
    cfg = AutoConfig.from_pretrained(path)
    # built on the GPU directly: initialising 1 B parameters on the CPU takes minutes
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, experts_implementation=experts)
        except (TypeError, ValueError):
            cfg._experts_implementation = experts
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval(), cfg


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", required=True)
    p.add_argument("--names", default="mixtral,qwen2-moe")
    p.add_argument("--experts", default="eager,grouped_mm")
    p.add_argument("--prefill", default="512,2048")
    p.add_argument("--decode-batches", default="1,32")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    for name in a.names.split(","):
        for experts in a.experts.split(","):
            try:
                model, cfg = build(os.path.join(a.configs, name), experts)
            except Exception as e:  # a backend this transformers/PyTorch lacks
                print(json.dumps({"impl": "transformers", "model": name, "experts": experts, "error": str(e)[:200]}), flush=True)
                continue
            params = sum(p.numel() for p in model.parameters())
            row = {"impl": "transformers", "model": name, "experts": experts, "params": params, "gpu": torch.cuda.get_device_name()}
            for t in [int(x) for x in a.prefill.split(",") if x]:
                ids = torch.randint(0, cfg.vocab_size, (1, t), device="cuda")
                model(ids, use_cache=False)
                ms = median_ms(lambda: model(ids, use_cache=False), a.repeats)
                print(json.dumps({**row, "bench": "prefill", "tokens": t, "ms": ms, "tokens_per_s": t / ms * 1e3}), flush=True)
            for b in [int(x) for x in a.decode_batches.split(",") if x]:
                prompt = torch.randint(0, cfg.vocab_size, (b, 16), device="cuda")

                def decode():
                    out = model(prompt, use_cache=True)
                    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                    for _ in range(a.decode_steps):
                        out = model(nxt, past_key_values=past, use_cache=True)
                        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

                def prefill_only():
                    model(prompt, use_cache=True)

                decode()
                total = median_ms(decode, a.repeats)
                pre = median_ms(prefill_only, a.repeats)
                ms = (total - pre) / a.decode_steps
                print(json.dumps({**row, "bench": "decode", "batch": b, "ms_per_step": ms, "tokens_per_s": b / ms * 1e3}), flush=True)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
