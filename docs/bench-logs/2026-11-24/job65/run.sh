set -u
mkdir -p /tmp/b && tar -C /tmp/b -xJf gpu-train/bins.tar.xz
export DITMOE_KERNEL_CACHE=/tmp/kc1
timeout 200 /tmp/b/gc graph block-ops moe-layers layer > $OUT/gc.txt 2>&1; echo "gc rc $? PASS $(grep -c PASS $OUT/gc.txt) FAIL $(grep -c FAIL $OUT/gc.txt)"; grep -E "^sections|FAIL" $OUT/gc.txt | head -5
for p in 1 0; do DITMOE_PDL=$p timeout 100 /tmp/b/ditmoe generate --device cuda --out $OUT/gen-pdl$p.png > $OUT/gen-pdl$p.txt 2>&1; echo "generate pdl=$p rc $?"; tail -2 $OUT/gen-pdl$p.txt; done
cmp $OUT/gen-pdl1.png $OUT/gen-pdl0.png && echo "generate: PNGs identical with and without programmatic edges"
for r in 1 2; do for p in 0 1; do
  DITMOE_PDL=$p timeout 200 /tmp/b/bm --device cuda --models S/2-8E2A,XL/2-8E2A --batches 1,8,64 --dtypes bf16 --budget-ms 400 > $OUT/bm-r$r-pdl$p.txt 2>&1
  echo "run $r pdl=$p"; grep "programmatic" $OUT/bm-r$r-pdl$p.txt | cut -c1-110; grep "^| [SX]" $OUT/bm-r$r-pdl$p.txt | tail -6
done; done
