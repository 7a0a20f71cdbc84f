set -u
mkdir -p /tmp/b && tar -C /tmp/b -xJf gpu-train/bins.tar.xz
export DITMOE_KERNEL_CACHE=/tmp/kc1
/tmp/b/bm --device cuda --models S/2-8E2A --batches 1 --dtypes bf16 --budget-ms 20 > /dev/null 2>&1
for m in S/2-8E2A:48 XL/2-8E2A:112; do name=${m%%:*}; n=${m##*:}
/usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum,sm__cycles_active.avg,sm__cycles_elapsed.max --csv --print-units base --cache-control none --clock-control none -k regex:"gg_wgmma_(swiglu|plain)_n" --launch-skip $n --launch-count $n --log-file $OUT/ncu-${name%%/*}.csv /tmp/b/bm --device cuda --models $name --batches 64 --dtypes bf16 --budget-ms 1 > /dev/null 2>&1
python3 - $OUT/ncu-${name%%/*}.csv <<'PY'
import csv,sys,statistics,collections
d=collections.defaultdict(dict)
for r in csv.reader(open(sys.argv[1])):
    if len(r)<10 or r[0]=='ID': continue
    d[(int(r[0]),r[4])][r[-3]]=float(r[-1].replace(',',''))
by=collections.defaultdict(list)
for (i,name),m in sorted(d.items()):
    # launch order per block: shared gate/up, shared down, routed gate/up, routed down
    role=['shared gate/up','shared down','routed gate/up','routed down'][i%4]
    by[(role,name)].append((m['gpu__time_duration.sum']/1e3, m['sm__cycles_active.avg']/m['sm__cycles_elapsed.max']))
for (role,name),v in by.items():
    print(sys.argv[1].split('/')[-1], role, name, 'n=%d'%len(v), 'median us %.1f'%statistics.median(x[0] for x in v), 'active/elapsed median %.3f min %.3f'%(statistics.median(x[1] for x in v), min(x[1] for x in v)))
PY
done
