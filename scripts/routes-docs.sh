#!/usr/bin/env bash
# Regenerates docs/routes-heatmap.png and docs/explorer.png from the bundled model: `ditmoe
# routes` on assets/fashion-mnist, then the explorer in a real X window under Xvfb, moved to
# a mid-trajectory step with xdotool and captured with ImageMagick's `import`.
#
# Needs (Debian): apt-get install -y xvfb xauth xdotool imagemagick libgl1-mesa-dri libglx-mesa0
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ditmoe-routes-docs}
cargo build -p ditmoe -p explorer
target/debug/ditmoe routes --model assets/fashion-mnist --num 4 --out "$OUT"
cp "$OUT/by_patch.png" docs/routes-heatmap.png

# The clicks are window coordinates of the 1280x860 layout: the timestep slider (about the
# middle step), the layer slider (layer 1), then a hover over the patch map for its tooltip.
# Slow press/release pairs: an instant xdotool click can fall between two egui frames.
cat > "$OUT/shot.sh" <<SHOT
#!/usr/bin/env bash
target/debug/explorer "$OUT" &
app=\$!
sleep 8
press() { xdotool mousemove "\$1" "\$2"; sleep 0.3; xdotool mousedown 1; sleep 0.3; xdotool mouseup 1; sleep 0.5; }
press 354 84
press 554 84
xdotool mousemove 565 235; sleep 0.3; xdotool mousemove 566 236; sleep 1.5
import -window root docs/explorer.png
kill \$app
SHOT
xvfb-run -a -s "-screen 0 1280x860x24" bash "$OUT/shot.sh"
echo "wrote docs/routes-heatmap.png and docs/explorer.png"
