#!/usr/bin/env bash
# Trains the compared language models of assets/lm/compare on one GPU, one after the other
# (equal training tokens: 800 steps of 32 x 256), evaluates each on the validation split,
# draws the validation curves, and writes the comparison table:
#
#   dense       6 dense layers
#   moe-top2    top-2 MoE (8 experts) on every other layer, DeepSpeed capacity and l_aux
#   pr-moe      PR-MoE: top-1 + residual MLP on every other layer, 4, 4, 8 experts
#   dense-wide  6 dense layers with moe-top2's total parameters
#   student-ce  the 5-layer student of pr-moe's shape (4, 8 experts), no teacher
#   mos-staged  the student distilled from pr-moe's model until step 480, then alone
#   mos-full    the student distilled from pr-moe's model on every step
#
# Usage: scripts/lm-compare.sh CORPUS OUT [DITMOE]
#   CORPUS  a corpus folder (scripts/fetch-sotu.sh)
#   OUT     where the runs, OUT/curves.png and OUT/table.md go
#   DITMOE  the ditmoe binary, built with CUDA (default: target/release/ditmoe)
# Run from the repository root. A run whose model folder exists is not trained again, so an
# interrupted comparison continues where it stopped.
set -euo pipefail
corpus=${1:?usage: scripts/lm-compare.sh CORPUS OUT [DITMOE]}
out=${2:?usage: scripts/lm-compare.sh CORPUS OUT [DITMOE]}
bin=${3:-target/release/ditmoe}
runs=(dense moe-top2 pr-moe dense-wide student-ce mos-staged mos-full)
mkdir -p "$out"

for name in "${runs[@]}"; do
    run="$out/$name"
    if [[ -f "$run/model/config.json" ]]; then
        echo "$name: trained already ($run/model)"
        continue
    fi
    config="assets/lm/compare/$name.train.json"
    command=(train)
    # the students learn from the PR-MoE teacher trained above
    if grep -q '"distill"' "$config"; then command=(distill --teacher "$out/pr-moe/model"); fi
    echo "$name: training"
    start=$(date +%s.%N)
    "$bin" lm "${command[@]}" --config "$config" --data "$corpus" --out "$run" --device cuda --quiet --overwrite 2>&1 | tee "$run.train.txt"
    awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "wall_seconds %.1f\n", b - a }' >> "$run.train.txt"
done

for name in "${runs[@]}"; do
    "$bin" lm eval --model "$out/$name/model" --data "$corpus" --seq-len 256 --batch-size 16 --max-windows 256 --device cuda > "$out/$name/eval.txt"
    "$bin" lm info --model "$out/$name/model" > "$out/$name/info.txt"
done

labels=$(IFS=,; echo "${runs[*]}")
dirs=$(for name in "${runs[@]}"; do printf '%s,' "$out/$name"; done)
"$bin" lm curves --runs "${dirs%,}" --labels "$labels" --out "$out/curves.png" > "$out/curves.txt"

# One row per model. tokens/s: the mean of log.jsonl's steps/s (after its first line, which
# holds the warm-up) times the tokens of a step; expert load: each MoE layer's largest expert
# share over the uniform share, from `lm eval`.
{
    echo "| model | layers | parameters (total) | active per token | training tokens | validation loss | perplexity | tokens/s | expert load max / uniform |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---|"
    for name in "${runs[@]}"; do
        run="$out/$name"
        total=$(awk '$1 == "total_parameters" { print $2 }' "$run/info.txt")
        active=$(awk '$1 == "active_parameters" { print $2 }' "$run/info.txt")
        plan=$(awk '$1 == "layer_plan" { print $2 }' "$run/info.txt")
        tokens=$(tail -1 "$run/eval.jsonl" | grep -o '"train_tokens":[0-9]*' | cut -d: -f2)
        loss=$(sed -n 's/.*loss \([0-9.]*\) nats\/token.*/\1/p' "$run/eval.txt")
        ppl=$(sed -n 's/.*perplexity \([0-9.]*\).*/\1/p' "$run/eval.txt")
        tps=$(grep -o '"steps_per_sec":[0-9.e+-]*' "$run/log.jsonl" | cut -d: -f2 | tail -n +2 | awk '{ s += $1; n++ } END { if (n) printf "%.0f", s / n * 32 * 256 }')
        load=$(awk -F'|' '/^\| [0-9]+ \|/ { gsub(/ /, "", $(NF-1)); printf "%s%s", sep, $(NF-1); sep = " / " }' "$run/eval.txt")
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$plan" "$total" "$active" "$tokens" "$loss" "$ppl" "$tps" "${load:--}"
    done
} > "$out/table.md"
cat "$out/table.md"
echo "curves: $out/curves.png"
