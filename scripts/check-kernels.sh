#!/usr/bin/env bash
# Compiles every source in kernels/ for every GPU target the runtime chooses, with NVRTC, on a
# machine without a GPU (the build machine): tests/gpu.rs's
# every_kernel_source_compiles_for_every_target. The kernels are compiled at run time, so cargo
# never sees a kernel that does not compile; this does, before a GPU machine is spent on it.
#
# Usage (from anywhere): scripts/check-kernels.sh [path to shared/scripts/build-cuda.sh]
# Extra cargo arguments go through CARGO_TARGET_DIR / CARGO_FEATURES as for build-cuda.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-../shared/scripts/build-cuda.sh}
eval "$("$BUILD" --print-env)"
exe=$("$BUILD" test --release --no-run --test gpu --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line) if line.startswith("{") else {}
    if m.get("target", {}).get("name") == "gpu" and m.get("executable"):
        print(m["executable"])')
# The test binary links libcuda.so.1, which only a GPU machine's driver provides; the toolkit's
# stub satisfies the loader (no device is opened), and NVRTC comes from the toolkit itself.
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
ln -s "$CUDA_HOME/lib/stubs/libcuda.so" "$stub/libcuda.so.1"
LD_LIBRARY_PATH="$stub:$CUDA_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "$exe" every_kernel_source_compiles_for_every_target --nocapture
