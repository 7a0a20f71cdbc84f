set -u
mkdir -p /tmp/b && tar -C /tmp/b -xJf gpu-train/bins.tar.xz
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader
export DITMOE_KERNEL_CACHE=/tmp/kc1
timeout 200 python3 gpu-train/bench_official_ditmoe.py --official gpu-train/official --precs bf16-autocast --models DiT-MoE-S/2-8E2A,DiT-MoE-XL/2-8E2A --batches 1,64 --matmul --max-s 10 --out $OUT/official.json > $OUT/official.txt 2>&1
grep -E "^\| " $OUT/official.txt | tail -6
timeout 200 /tmp/b/bm --device cuda --models S/2-8E2A,XL/2-8E2A --batches 1,64 --dtypes bf16 --budget-ms 800 --matmul-floor > $OUT/bm.txt 2>&1
grep -E "^\| [SX]" $OUT/bm.txt | tail -8
timeout 100 /tmp/b/dp --device cuda > $OUT/dp.txt 2>&1; echo "dp rc $?"; grep -E "^\|" $OUT/dp.txt | tail -9
diff <(grep -E "^\|" $OUT/dp.txt) <(grep -E "^\|" docs/bench-logs/2026-11-24/job45/device_parity.txt) > /dev/null && echo "device_parity identical to job 45" || echo "device_parity differs from job 45"
timeout 330 /tmp/b/gc > $OUT/gc.txt 2>&1; echo "gc rc $? PASS $(grep -c PASS $OUT/gc.txt) FAIL $(grep -c FAIL $OUT/gc.txt)"; grep -E "^sections" $OUT/gc.txt
