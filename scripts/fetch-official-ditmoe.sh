#!/usr/bin/env bash
# Copies the official DiT-MoE files that scripts/bench_sample_official.py runs out of a local
# git mirror of feizc/DiT-MoE into a folder (default gpu/official, which git ignores; the files
# are not part of this repository):
#
#   models.py                  the model (DiT_XL_2, FlashSelfMHAModified, moe_infer)
#   diffusion/*.py             create_diffusion, p_sample_loop (DDPM) and rectified_flow.py
#                              (RectifiedFlow.sample_with_xps, what sample.py's RF branch calls)
#   sample.py                  for reference only: the sampling path the benchmark follows
#
# Usage: scripts/fetch-official-ditmoe.sh MIRROR [OUT] [COMMIT]
#   MIRROR  a clone or bare mirror of feizc/DiT-MoE (a git directory or a work tree)
#   OUT     default gpu/official (relative to the repository root)
#   COMMIT  default bd34bbb2945280f0ccc2b1221f7dc8e3d6cce65d (the commit docs/benchmarks.md uses)
set -euo pipefail
mirror=${1:?usage: scripts/fetch-official-ditmoe.sh MIRROR [OUT] [COMMIT]}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -ge 2 ]]; then out="$(realpath -m "$2")"; else out="$repo/gpu/official"; fi
commit=${3:-bd34bbb2945280f0ccc2b1221f7dc8e3d6cce65d}
files=(
    models.py
    sample.py
    diffusion/__init__.py
    diffusion/diffusion_utils.py
    diffusion/gaussian_diffusion.py
    diffusion/respace.py
    diffusion/timestep_sampler.py
    diffusion/rectified_flow.py
)
git -C "$mirror" cat-file -e "$commit^{commit}" 2>/dev/null \
    || { echo "$mirror: no commit $commit (fetch feizc/DiT-MoE first)" >&2; exit 1; }
mkdir -p "$out/diffusion"
for f in "${files[@]}"; do
    git -C "$mirror" show "$commit:$f" > "$out/$f.tmp"
    mv "$out/$f.tmp" "$out/$f"
done
echo "$commit" > "$out/COMMIT"
echo "copied ${#files[@]} files of feizc/DiT-MoE@${commit:0:7} into $out"
