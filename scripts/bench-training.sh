#!/usr/bin/env bash
# Training at ImageNet shape against the official train.py step, and the bundled model's CUDA
# precision, in one job on one GPU (docs/benchmarks.md, "At ImageNet shape"; docs/training.md):
#   1. S/2 and B/2 at batch 64 in bf16, ours (examples/bench_train) and the official step
#      (shared/tools/bench_official_ditmoe.py --train), then S/2 at batch 8 (launch-bound or not);
#   2. XL/2-8E2A at batch 32 and 48, recomputed, the EMA on the host averaged every 8 steps, and
#      the official XL step with --fallback (it runs out of memory at 32);
#   3. with --fashion-mnist, the bundled model's recipe in tf32 and in bf16 for the same time,
#      after one warm-up run each (the logs decide the CUDA default precision).
# Each step has a time limit and writes its output to OUT/training.log as it goes, so a job that
# runs out of time still returns what finished.
#
# Usage: scripts/bench-training.sh BIN_DIR [options]
#   BIN_DIR             holds bench_train and ditmoe (CUDA builds), each plain or as .xz
# Options:
#   --out DIR           the log and the bundled model's step logs (default: $OUT, else gpu/bench-training)
#   --official DIR      the official files (default gpu/official: scripts/fetch-official-ditmoe.sh)
#   --tools DIR         holds bench_official_ditmoe.py (default ../shared/tools beside the repository)
#   --fashion-mnist DIR Fashion-MNIST training class folders (`ditmoe data fashion-mnist`
#                       writes DIR/train); without it step 3 is skipped
#   --minutes M         each precision's run in step 3 (default 1)
# Run from anywhere; needs python3 with torch and timm for the official step.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bins=${1:?usage: scripts/bench-training.sh BIN_DIR [--out DIR] [--official DIR] [--tools DIR] [--fashion-mnist DIR] [--minutes M]}
shift
out=${OUT:-$repo/gpu/bench-training}
official=$repo/gpu/official
tools=$repo/../shared/tools
fmnist=
minutes=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --out) out=$2; shift 2 ;;
        --official) official=$2; shift 2 ;;
        --tools) tools=$2; shift 2 ;;
        --fashion-mnist) fmnist=$2; shift 2 ;;
        --minutes) minutes=$2; shift 2 ;;
        *) echo "bench-training.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
out=$(realpath "$out")
[[ -z $fmnist ]] || fmnist=$(realpath "$fmnist")
official=$(realpath -m "$official")
tools=$(realpath -m "$tools")
bins=$(realpath "$bins")
# the bundled recipe names its model config relative to the repository root
cd "$repo"
log=$out/training.log
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# the binaries, unpacked when they came compressed
binary() {
    if [[ -x $bins/$1 ]]; then echo "$bins/$1"; return; fi
    [[ -f $bins/$1.xz ]] || { echo "bench-training.sh: no $1 or $1.xz in $bins" >&2; exit 1; }
    xz -T0 -dc "$bins/$1.xz" > "$work/$1" && chmod +x "$work/$1" && echo "$work/$1"
}
bench_train=$(binary bench_train)

# one measurement: its time limit, then the command; the outcome is logged, a failure does not
# stop the job
step() {
    local limit=$1; shift
    echo "=== $(date +%T) [limit ${limit} s] $*" >> "$log"
    local rc=0
    timeout "$limit" "$@" >> "$log" 2>&1 || rc=$?
    echo "=== exit $rc $(date +%T)" >> "$log"
}

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log"
official_train=(python3 "$tools/bench_official_ditmoe.py" --official "$official" --train --train-precs bf16-autocast)

step 120 "$bench_train" --device cuda --models S/2,B/2 --batches 64 --precisions bf16 --steps 4 --warmup 2 --ema-on-host none
step 120 "${official_train[@]}" --models DiT-MoE-S/2-8E2A,DiT-MoE-B/2-8E2A --train-batches 64 --warmup 2 --iters 4
step 60 "$bench_train" --device cuda --models S/2 --batches 8 --precisions bf16 --steps 6 --warmup 2 --ema-on-host none
step 200 "$bench_train" --device cuda --models XL/2 --batches 32,48 --precisions bf16 --recompute on --ema-on-host XL/2 --ema-every 8 --steps 8 --warmup 1
step 200 "${official_train[@]}" --models DiT-MoE-XL/2-8E2A --train-batches 32 --fallback --warmup 1 --iters 3

if [[ -n $fmnist ]]; then
    ditmoe=$(binary ditmoe)
    train=("$ditmoe" train --config "$repo/assets/fashion-mnist/train.json" --data "$fmnist" --device cuda --quiet --overwrite)
    limit=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 + 60 }')
    for p in tf32 bf16; do
        step 60 "${train[@]}" --out "$work/warm-$p" --max-minutes 0.2 --precision "$p"
    done
    for p in tf32 bf16; do
        step "$limit" "${train[@]}" --out "$work/$p" --max-minutes "$minutes" --precision "$p"
        cp "$work/$p/log.jsonl" "$out/fashion-mnist-$p.jsonl" 2> /dev/null || true
    done
fi
echo "bench-training.sh: $log"
