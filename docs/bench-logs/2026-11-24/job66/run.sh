set -u
mkdir -p /tmp/b && tar -C /tmp/b -xJf gpu-train/bins.tar.xz
export DITMOE_KERNEL_CACHE=/tmp/kc1
/tmp/b/bm --device cuda --models S/2-8E2A --batches 64 --dtypes bf16 --budget-ms 20 > /dev/null 2>&1
NCU=/usr/local/cuda/bin/ncu
$NCU --set full --cache-control none --clock-control none -k regex:gg_wgmma_plain_n192mc --launch-skip 24 --launch-count 2 -o $OUT/s-down /tmp/b/bm --device cuda --models S/2-8E2A --batches 64 --dtypes bf16 --budget-ms 1 > $OUT/ncu-s.log 2>&1
$NCU --set full --cache-control none --clock-control none -k regex:gg_wgmma_plain_n192mc --launch-skip 57 --launch-count 1 -o $OUT/xl-down /tmp/b/bm --device cuda --models XL/2-8E2A --batches 64 --dtypes bf16 --budget-ms 1 > $OUT/ncu-xl.log 2>&1
for f in s-down xl-down; do $NCU -i $OUT/$f.ncu-rep --page details --csv > $OUT/$f.csv 2>&1; done
python3 - <<'PY'
import csv,os
out=os.environ['OUT']
want=['Duration','SM Frequency','Compute (SM) Throughput','Memory Throughput','DRAM Throughput','L2 Cache Throughput','L1/TEX Cache Throughput','Executed Ipc Active','Issue Slots Busy','No Eligible','Registers Per Thread','Achieved Occupancy','Grid Size','Dynamic Shared Memory Per Block','One or More Eligible','Active Warps Per Scheduler','Eligible Warps Per Scheduler','Warp Cycles Per Issued Instruction']
for f in ['s-down','xl-down']:
    rows=list(csv.reader(open(f'{out}/{f}.csv')))
    hdr=rows[0]
    for r in rows[1:]:
        d=dict(zip(hdr,r))
        if d.get('Metric Name') in want:
            print(f, d.get('ID'), d.get('Kernel Name','')[:24], d['Metric Name'], d.get('Metric Value'), d.get('Metric Unit'))
PY
