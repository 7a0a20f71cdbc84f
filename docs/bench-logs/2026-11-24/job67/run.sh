set -u
mkdir -p /tmp/b && tar -C /tmp/b -xJf gpu-train/bins.tar.xz
export DITMOE_KERNEL_CACHE=/tmp/kc1
timeout 250 /tmp/b/gc gemm-wgmma moe-layers layer graph > $OUT/gc.txt 2>&1; echo "gc rc $? PASS $(grep -c PASS $OUT/gc.txt) FAIL $(grep -c FAIL $OUT/gc.txt)"; grep -E "^sections" $OUT/gc.txt; grep "FAIL" $OUT/gc.txt | head -5; grep "N split" $OUT/gc.txt | head -8
NCU="/usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum,sm__cycles_active.avg,sm__cycles_elapsed.max --csv --print-units base --cache-control none --clock-control none -k regex:gg_wgmma_plain_n192 --launch-skip 24 --launch-count 24"
for sp in 0 auto; do env $( [ $sp = auto ] || echo DITMOE_GEMM_SPLIT_N=$sp ) timeout 120 $NCU --log-file $OUT/ncu-split$sp.csv /tmp/b/bm --device cuda --models S/2-8E2A --batches 64 --dtypes bf16 --budget-ms 1 > /dev/null 2>&1
python3 - $OUT/ncu-split$sp.csv <<'PY'
import csv,sys,statistics,collections
rows=[r for r in csv.reader(open(sys.argv[1])) if len(r)>10]
hdr=None
d=collections.defaultdict(dict)
for r in rows:
    if r[0]=='ID': hdr=r; continue
    d[(r[0],r[4])][r[-3]]=float(r[-1].replace(',',''))
for (i,name),m in sorted(d.items(), key=lambda x:int(x[0][0]))[:4]:
    print(sys.argv[1].split('/')[-1], i, name[:26], 'us %.1f'%(m['gpu__time_duration.sum']/1e3), 'active/elapsed %.2f'%(m['sm__cycles_active.avg']/m['sm__cycles_elapsed.max']))
routed=[m['gpu__time_duration.sum']/1e3 for (i,n),m in d.items() if int(i)%2==1]
print('routed down median us %.1f over %d'%(statistics.median(routed),len(routed)))
PY
done
for r in 1 2; do for sp in 0 auto; do
  env $( [ $sp = auto ] || echo DITMOE_GEMM_SPLIT_N=$sp ) timeout 150 /tmp/b/bm --device cuda --models S/2-8E2A,XL/2-8E2A --batches 64 --dtypes bf16 --budget-ms 800 > $OUT/bm-r$r-split$sp.txt 2>&1
  echo "run $r split=$sp: $(grep '^| [SX]' $OUT/bm-r$r-split$sp.txt | tail -2 | awk -F'|' '{printf "%s %s / %s ms; ", $2, $5, $6}')"; grep "graph -" $OUT/bm-r$r-split$sp.txt | awk '{print $NF}' | tr '\n' ' '; echo
done; done
