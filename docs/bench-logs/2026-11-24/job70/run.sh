set -u
mkdir -p /tmp/b && tar -C /tmp/b -xJf gpu-train/bins.tar.xz
export DITMOE_KERNEL_CACHE=/tmp/kc1
/tmp/b/bm --device cuda --models S/2-8E2A --batches 1 --dtypes bf16 --budget-ms 20 > /dev/null 2>&1
for r in 1 2; do for sp in 0 auto; do for m in S/2-8E2A:48 XL/2-8E2A:112; do name=${m%%:*}; n=${m##*:}
env $( [ $sp = auto ] || echo DITMOE_GEMM_SPLIT_N=$sp ) /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum,sm__cycles_active.avg,sm__cycles_elapsed.max --csv --print-units base --cache-control none --clock-control none -k regex:"gg_wgmma_plain_n192" --launch-skip $((n/2)) --launch-count $((n/2)) --log-file $OUT/ncu-${name%%/*}-$sp-$r.csv /tmp/b/bm --device cuda --models $name --batches 64 --dtypes bf16 --budget-ms 1 > /dev/null 2>&1
python3 - $OUT/ncu-${name%%/*}-$sp-$r.csv <<'PY'
import csv,sys,statistics,collections
d=collections.defaultdict(dict)
for r in csv.reader(open(sys.argv[1])):
    if len(r)<10 or r[0]=='ID': continue
    d[(int(r[0]),r[4])][r[-3]]=float(r[-1].replace(',',''))
v=[(m['gpu__time_duration.sum']/1e3, m['sm__cycles_active.avg']/m['sm__cycles_elapsed.max'], name) for (i,name),m in sorted(d.items()) if i%2==1]
print(sys.argv[1].split('/')[-1], v[0][2], 'routed down n=%d median us %.1f mean %.1f active median %.3f'%(len(v), statistics.median(x[0] for x in v), statistics.mean(x[0] for x in v), statistics.median(x[1] for x in v)))
PY
done; done; done
