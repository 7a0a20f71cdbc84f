#!/usr/bin/env bash
# Sampling as users run it: end-to-end images/s (sampling + SD-VAE decode, model loaded) of
# `ditmoe generate` against the official DiT-MoE sample.py path, DiT-MoE-XL/2-8E2A at 256 px,
# DDPM 250 steps and rectified flow 50 steps, cfg 4, 8 and 64 images, random weights of the real
# shapes (the same tensors on both sides), in one job on one GPU. Then `ditmoe encode`
# throughput (the VAE encoder over class folders of JPEGs) and the diffusers encoder beside it.
#
# Usage: scripts/bench-sampling.sh DITMOE [options]
#   DITMOE           the ditmoe binary (a CUDA build), or an .xz of it
# Options:
#   --out DIR        results: official.json, ditmoe.jsonl, table.md, encode.json, logs
#                    (default: $OUT when set, else gpu/bench-sampling)
#   --work DIR       the random weights (8.3 GB for XL), the VAE, the JPEGs
#                    (default /tmp/ditmoe-bench-sampling; kept, so a second run reuses them)
#   --device D       cuda (default) or cpu
#   --dtype T        ditmoe's --dtype (default bf16)
#   --cases LIST     sampler:steps:images,... (default ddpm:250:8,ddpm:250:64,rf:50:8,rf:50:64)
#   --tiny           a 2-block width-64 model and a 16-wide VAE (the CPU smoke test)
#   --official DIR   the official files (default gpu/official: scripts/fetch-official-ditmoe.sh)
#   --skip-official  --skip-ditmoe  --skip-encode
#   --encode-images N   JPEGs per class for the encode benchmark, 2 classes (default 512)
#   --deadline S     official cases that would start after S seconds are skipped (default 330)
# Run from anywhere; needs python3 with torch, timm, numpy, pillow, safetensors, and diffusers
# (installed from gpu/whl/diffusers-*.whl into the work folder when missing).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin=${1:?usage: scripts/bench-sampling.sh DITMOE [--out DIR] [--work DIR] [--device cuda|cpu] [--tiny] ...}
shift
out=${OUT:-$repo/gpu/bench-sampling}
work=/tmp/ditmoe-bench-sampling
device=cuda
dtype=bf16
cases=ddpm:250:8,ddpm:250:64,rf:50:8,rf:50:64
tiny=()
official=$repo/gpu/official
skip_official=0 skip_ditmoe=0 skip_encode=0
encode_images=512
deadline=330
while [[ $# -gt 0 ]]; do
    case $1 in
        --out) out=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --dtype) dtype=$2; shift 2 ;;
        --cases) cases=$2; shift 2 ;;
        --tiny) tiny=(--tiny); shift ;;
        --official) official=$2; shift 2 ;;
        --skip-official) skip_official=1; shift ;;
        --skip-ditmoe) skip_ditmoe=1; shift ;;
        --skip-encode) skip_encode=1; shift ;;
        --encode-images) encode_images=$2; shift 2 ;;
        --deadline) deadline=$2; shift 2 ;;
        *) echo "bench-sampling.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out" "$work"
out=$(realpath "$out"); work=$(realpath "$work"); official=$(realpath "$official")
py=${PYTHON:-python3}
bench_py=$repo/scripts/bench_sample_official.py
t_start=$(date +%s.%N)
elapsed() { awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }'; }
phase() { echo "== [$(elapsed) s] $*"; }

# the binary (carried compressed)
if [[ $bin == *.xz ]]; then
    xz -dc "$bin" > "$work/ditmoe"
    chmod +x "$work/ditmoe"
    bin=$work/ditmoe
fi
bin=$(realpath "$bin")

# diffusers (for the official VAE) from the carried wheel when the machine has none
if ! "$py" -c "import diffusers" 2>/dev/null; then
    whl=$(ls "$repo"/gpu/whl/diffusers-*.whl 2>/dev/null | head -1 || true)
    [[ -n $whl ]] || { echo "no diffusers and no gpu/whl/diffusers-*.whl" >&2; exit 1; }
    # a pure-Python wheel: installed without its dependencies (the machine has them), or, without
    # pip, imported from the zip itself
    if "$py" -m pip install -q --no-deps --no-index --target "$work/pylib" "$whl"; then
        export PYTHONPATH="$work/pylib${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$whl${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
"$py" -c "import torch, timm, diffusers, safetensors; print('torch', torch.__version__, 'timm', timm.__version__, 'diffusers', diffusers.__version__)"
[[ $device == cuda ]] && nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv,noheader || true

if [[ ${#tiny[@]} -gt 0 ]]; then
    model=(--model "$work/tiny-model")
    weights=$work/tiny-model/model.safetensors
    warmup_model=$work/tiny-model
else
    weights=$work/dit-moe-xl-2-8e2a.safetensors
    model=(--model DiT-MoE-XL/2-8E2A --weights "$weights")
    warmup_model=$work/warmup-model  # one block of XL's widths
fi

# 1. the random weights and VAE (written once), then the official timings
if [[ $skip_official == 0 ]]; then
    phase "official sample.py path"
    "$py" "$bench_py" official --official "$official" --work "$work" --out "$out/official.json" \
        --device "$device" --cases "$cases" --deadline-s "$deadline" "${tiny[@]}" 2>&1 | tee "$out/official.log"
elif [[ ! -f $weights || ! -f $warmup_model/model.safetensors ]]; then
    phase "random weights and VAE"
    "$py" "$bench_py" official --official "$official" --work "$work" --device "$device" --no-time "${tiny[@]}" 2>&1 | tee "$out/official.log"
fi

# 2. ditmoe generate, one process per case, the model loaded in each; the seconds it prints
#    cover sampling and decode (not the load, not the PNG write)
if [[ $skip_ditmoe == 0 ]]; then
    # ditmoe compiles its CUDA kernels at run time into an on-disk cache (DITMOE_KERNEL_CACHE),
    # and the driver JIT-compiles PTX into its own cache: a run of a one-block model of XL's
    # widths with the same VAE fills both, so no timed run compiles. Each timed run records how
    # many kernel files the cache held before and after it (equal: none compiled).
    phase "ditmoe generate: warm-up on $(basename "$warmup_model") (fills the kernel caches)"
    export DITMOE_KERNEL_CACHE=$work/kernel-cache
    mkdir -p "$DITMOE_KERNEL_CACHE"
    ptx() { find "$DITMOE_KERNEL_CACHE" -name '*.ptx' | wc -l; }
    for sampler in ddpm rf-euler; do
        "$bin" generate --model "$warmup_model" --vae "$work/vae" --class 207,360 --num 1 --sampler $sampler \
            --steps 3 --device "$device" --dtype "$dtype" --batch-size 2 --out "$work/warmup.png" > "$out/ditmoe-warmup.log" 2>&1 \
            || { cat "$out/ditmoe-warmup.log"; exit 1; }
    done
    echo "kernel cache: $(ptx) files"
    : > "$out/ditmoe.jsonl"
    for c in ${cases//,/ }; do
        IFS=: read -r sampler steps n <<< "$c"
        if [[ $n -ge 8 ]]; then k=8; else k=$n; fi
        classes=$(echo 207,360,387,974,88,979,417,279 | cut -d, -f1-"$k")
        name=$([[ $sampler == ddpm ]] && echo ddpm || echo rf-euler)
        phase "ditmoe generate: $name $steps steps, $n images"
        # all N images in one batch, as sample.py; if that fails (e.g. out of memory), once more
        # with half the batch, recorded as such
        for bs in "$n" $((n / 2)); do
            log=$out/ditmoe-$sampler-$steps-$n-b$bs.log
            ptx_before=$(ptx)
            rc=0
            s=$(date +%s.%N)
            "$bin" generate "${model[@]}" --vae "$work/vae" --class "$classes" --num $((n / k)) --sampler "$name" \
                --steps "$steps" --cfg-scale 4 --seed 0 --device "$device" --dtype "$dtype" --batch-size "$bs" \
                --out "$work/ditmoe-$sampler-$steps-$n.png" > "$log" 2> "$log.err" || rc=$?
            wall=$(awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
            cat "$log"
            [[ $rc == 0 ]] || tail -5 "$log.err"
            seconds=$(sed -n 's/^.*wrote .* in \([0-9.]*\) s.*$/\1/p' "$log" | tail -1)
            printf '{"sampler": "%s", "steps": %d, "images": %d, "dtype": "%s", "batch_size": %d, "seconds": %s, "wall_s": %s, "rc": %d, "kernel_files_before": %d, "kernel_files_after": %d}\n' \
                "$sampler" "$steps" "$n" "$dtype" "$bs" "${seconds:-null}" "$wall" "$rc" "$ptx_before" "$(ptx)" | tee -a "$out/ditmoe.jsonl"
            [[ $rc != 0 && $n -ge 2 ]] || break
        done
    done
fi

if [[ -f $out/official.json ]]; then
    phase "table"
    "$py" "$bench_py" table --official "$out/official.json" --ditmoe "$out/ditmoe.jsonl" --out "$out/table.md"
fi

# 3. ditmoe encode: 2 class folders of JPEGs through the VAE encoder. Two runs, 2 x 16 images and
#    2 x N, each a fresh process (VAE load and start-up included); the difference gives the
#    steady rate without them.
if [[ $skip_encode == 0 ]]; then
    phase "ditmoe encode"
    [[ -d $work/jpeg-small ]] || "$py" "$bench_py" images --out "$work/jpeg-small" --classes 2 --per-class 16
    [[ -d $work/jpeg-$encode_images ]] || "$py" "$bench_py" images --out "$work/jpeg-$encode_images" --classes 2 --per-class "$encode_images"
    declare -A enc_wall
    for set in small "$encode_images"; do
        rm -rf "$work/latents-$set"
        s=$(date +%s.%N)
        "$bin" encode --data "$work/jpeg-$set" --vae "$work/vae" --out "$work/latents-$set" --device "$device" \
            --batch-size 16 > "$out/encode-$set.log" 2>&1 || { cat "$out/encode-$set.log"; exit 1; }
        enc_wall[$set]=$(awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
        tail -1 "$out/encode-$set.log"
    done
    n_small=32 n_full=$((2 * encode_images))
    awk -v ns="$n_small" -v nf="$n_full" -v ws="${enc_wall[small]}" -v wf="${enc_wall[$encode_images]}" 'BEGIN {
        rate = (wf > ws) ? (nf - ns) / (wf - ws) : 0
        printf "{\"kind\": \"ditmoe encode\", \"batch_size\": 16, \"images\": %d, \"wall_s\": %.3f, \"images_per_s\": %.2f, \"small_images\": %d, \"small_wall_s\": %.3f, \"marginal_images_per_s\": %.2f}\n", nf, wf, nf / wf, ns, ws, rate
    }' | tee "$out/encode.json"
    phase "diffusers encoder, the same JPEGs (reference)"
    "$py" "$bench_py" encode-ref --data "$work/jpeg-$encode_images" --vae "$work/vae" --device "$device" \
        --batch-size 16 --out "$out/encode-ref.json" 2>&1 | grep -v "^$" | tail -3 || true
fi
phase "done"
[[ -f $out/table.md ]] && cat "$out/table.md"
[[ -f $out/encode.json ]] && cat "$out/encode.json"
[[ -f $out/encode-ref.json ]] && cat "$out/encode-ref.json"
true
