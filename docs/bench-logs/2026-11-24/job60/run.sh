set -u
mkdir -p /tmp/b && tar -C /tmp/b -xJf gpu-train/bins.tar.xz
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader
export DITMOE_KERNEL_CACHE=/tmp/kc0
/tmp/b/bm --device cuda --models S/2-8E2A --batches 1 --dtypes bf16 --budget-ms 20 > /dev/null 2>&1
F=$(grep -l "flash_attn_bf16_hd64_w8" /tmp/kc0/*.ptx | head -1); echo "block_ops ptx: $F"; ls /tmp/kc0
for v in v0 v1 v2 v3; do rm -rf /tmp/kc_$v; cp -r /tmp/kc0 /tmp/kc_$v; xz -dc gpu-train/attn/$v.ptx.xz > /tmp/kc_$v/$(basename $F); done
cmp -s /tmp/kc0/$(basename $F) /tmp/kc_v0/$(basename $F) && echo "v0 PTX identical to the binary's own" || echo "v0 PTX differs from the binary's own"
for v in v1 v2 v3; do DITMOE_KERNEL_CACHE=/tmp/kc_$v timeout 150 /tmp/b/gc block-ops > $OUT/gc-$v.txt 2>&1; echo "$v gc rc $? PASS $(grep -c PASS $OUT/gc-$v.txt) FAIL $(grep -c FAIL $OUT/gc-$v.txt)"; grep -i "attention" $OUT/gc-$v.txt | sort -t'|' -k5 -g | tail -2; done
NCU="/usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --csv --print-units base --cache-control none --clock-control none -k regex:flash_attn --launch-skip 12 --launch-count 24"
for v in v0 v1 v2 v3; do for m in S/2-8E2A XL/2-8E2A; do
  DITMOE_KERNEL_CACHE=/tmp/kc_$v timeout 120 $NCU --log-file $OUT/ncu-$v-${m%%/*}.csv /tmp/b/bm --device cuda --models $m --batches 64 --dtypes bf16 --budget-ms 1 > /dev/null 2>&1
  python3 -c "
import csv,statistics,sys
rows=[r for r in csv.reader(open('$OUT/ncu-$v-${m%%/*}.csv')) if len(r)>10 and r[-3]=='gpu__time_duration.sum']
v=[float(r[-1].replace(',',''))/1e3 for r in rows]
print('$v ${m%%/*}', rows[0][4][:40] if rows else '-', len(v), 'median us %.1f min %.1f'%(statistics.median(v),min(v)) if v else 'none')"
done; done
