set -u
mkdir -p /tmp/b && tar -C /tmp/b -xJf gpu-train/bins.tar.xz
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader
export DITMOE_KERNEL_CACHE=/tmp/kc1
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm,clocks_throttle_reasons.active --format=csv -lms 50 > $OUT/smi.csv &
SMI=$!
ts() { while IFS= read -r l; do echo "$(date +%T.%N | cut -c1-12) $l"; done; }
for r in 1 2; do
timeout 280 /tmp/b/bm --device cuda --models S/2-8E2A,XL/2-8E2A --batches 64 --dtypes bf16 --budget-ms 1000 --matmul-floor 2>&1 | ts > $OUT/bm-$r.txt
grep "matmul floor\|| XL\|| S/" $OUT/bm-$r.txt | tail -4
done
kill $SMI
