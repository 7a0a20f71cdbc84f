#!/usr/bin/env bash
# Quality against sampling steps for the bundled model (docs/generate.md, "Quality against
# steps"): `ditmoe eval --sweep steps=...` once per rectified-flow sampler (rf-euler, rf-heun)
# at generate.json's guidance, then one markdown table of accuracy, Fréchet distance and model
# evaluations per image for every sampler and step count.
#
# Usage: scripts/generate-steps.sh DATA OUT [PER_CLASS] [STEPS]
#   DATA       the real test split (class folders; scripts/fetch-fashion-mnist.sh makes it)
#   OUT        a folder for the reports (JSON, the sweeps' tables and charts, the logs)
#   PER_CLASS  generated samples per class (default 25)
#   STEPS      comma-separated step counts (default 10,20,30,50)
# The binary is $DITMOE, else target/release/ditmoe (cargo build --release).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="$(realpath "${1:?usage: scripts/generate-steps.sh DATA OUT [PER_CLASS] [STEPS]}")"
out="$(realpath -m "${2:?usage: scripts/generate-steps.sh DATA OUT [PER_CLASS] [STEPS]}")"
per_class="${3:-25}"
steps="${4:-10,20,30,50}"
bin="${DITMOE:-$repo/target/release/ditmoe}"
mkdir -p "$out"
cd "$repo"

for sampler in rf-euler rf-heun; do
    "$bin" eval --model assets/fashion-mnist --data "$data" --per-class "$per_class" \
        --sampler "$sampler" --sweep "steps=$steps" --seed 0 \
        --json "$out/$sampler.json" --sweep-out "$out/$sampler-sweep.png" > "$out/$sampler.log" 2>&1 \
        || { tail -20 "$out/$sampler.log" >&2; exit 1; }
done

python3 - "$out/rf-euler.json" "$out/rf-heun.json" <<'EOF'
import json, sys

rows = [r for path in sys.argv[1:] for r in json.load(open(path))]
print("| sampler | steps | model evaluations per image | accuracy | FD (whole split) | FD (subset) | FD ratio | precision | recall | sampling s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    s = r["samples"]
    evals = 2 * s["steps"] - 1 if s["sampler"] == "rf-heun" else s["steps"]
    pr = r["precision_recall"]
    print(f"| {s['sampler']} | {s['steps']} | {evals} | {100 * r['generated_accuracy']:.1f} % | {r['frechet_distance']:.2f} "
          f"| {r['frechet_distance_subset']:.2f} | {r['frechet_ratio']:.2f} | {pr['precision']:.3f} | {pr['recall']:.3f} "
          f"| {r['sampling_seconds']:.0f} |")
r = rows[0]
n = sum(r["real_subsets"]["per_class"])
s = r["samples"]
print(f"\n{s['per_class']} samples per class, guidance {s['cfg_scale']:g}, seed {s['seed']}; classifier accuracy on the real "
      f"split {100 * r['real_accuracy']:.1f} %. Real vs real ({n} + {n} disjoint real images, subset seed "
      f"{r['real_subsets']['seed']}): FD {r['frechet_distance_real']:.2f}, precision "
      f"{r['precision_recall_real']['precision']:.3f}, recall {r['precision_recall_real']['recall']:.3f}.")
EOF
