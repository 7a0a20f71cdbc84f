set -u
mkdir -p /tmp/b && tar -C /tmp/b -xJf gpu-train/bins.tar.xz
export DITMOE_KERNEL_CACHE=/tmp/kc1
timeout 250 /tmp/b/gc gemm-wgmma moe-layers layer graph > $OUT/gc.txt 2>&1; echo "gc rc $? PASS $(grep -c PASS $OUT/gc.txt) FAIL $(grep -c FAIL $OUT/gc.txt)"; grep -E "^sections" $OUT/gc.txt
/usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --csv --print-units base -k regex:gg_wgmma_plain_n192 --launch-skip 24 --launch-count 4 /tmp/b/bm --device cuda --models S/2-8E2A --batches 64 --dtypes bf16 --budget-ms 1 2>/dev/null | grep gpu__time | awk -F'","' '{print $5, $NF}' | cut -c1-80
timeout 150 /tmp/b/bm --device cuda --models S/2-8E2A,XL/2-8E2A --batches 64 --dtypes bf16 --budget-ms 600 > $OUT/bm.txt 2>&1; grep -E "graph -|^\| [SX]" $OUT/bm.txt | tail -4
