#!/usr/bin/env bash
# docs/quality-footwear.png: per footwear class (sandal, sneaker, ankle boot) one row of 8 real
# test images (left) beside 8 samples of the bundled model at its defaults (right).
#
#   scripts/quality-footwear.sh [TEST_SPLIT]   (default data/fashion-mnist/test; needs ImageMagick)
set -euo pipefail
cd "$(dirname "$0")/.."
test_split=${1:-data/fashion-mnist/test}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo run -q --release -- generate --class 5,7,9 --num 8 --out "$work/generated.png"
# the real images padded to the model's 32x32 (as training pads them), tiled as the grid is
for class in 5_Sandal 7_Sneaker 9_Ankle_boot; do
    files=("$test_split/$class"/*.png)
    printf '%s\n' "${files[@]:0:8}"
done > "$work/real.txt"
montage @"$work/real.txt" -background black -gravity center -extent 32x32 -tile 8x3 -geometry +1+1 -bordercolor black -border 1 "$work/real.png"
height=$(identify -format %h "$work/generated.png")
convert "$work/real.png" -size "12x$height" xc:white "$work/generated.png" -gravity center +append docs/quality-footwear.png
echo "wrote docs/quality-footwear.png"
