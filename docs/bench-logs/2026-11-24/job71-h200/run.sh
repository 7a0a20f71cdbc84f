set -u
mkdir -p /tmp/b && tar -C /tmp/b -xJf gpu-train/bins.tar.xz
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader
export DITMOE_KERNEL_CACHE=/tmp/kc1
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm,clocks_throttle_reasons.active --format=csv -lms 50 > $OUT/smi.csv &
SMI=$!
ts() { while IFS= read -r l; do echo "$(date +%T.%N | cut -c1-12) $l"; done; }
timeout 200 python3 gpu-train/bench_official_ditmoe.py --official gpu-train/official --precs bf16-autocast --models DiT-MoE-S/2-8E2A,DiT-MoE-XL/2-8E2A --batches 64 --matmul --max-s 10 --out $OUT/official.json 2>&1 | ts > $OUT/official.txt
grep -iE "S/2|XL/2|peak|matmul" $OUT/official.txt | tail -8
timeout 300 /tmp/b/bm --device cuda --models S/2-8E2A,XL/2-8E2A --batches 64 --dtypes bf16 --budget-ms 1000 --matmul-floor 2>&1 | ts > $OUT/bm.txt
tail -12 $OUT/bm.txt
kill $SMI
