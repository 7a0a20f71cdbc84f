import csv, sys
rows=[r for r in csv.DictReader(l for l in open(sys.argv[1]) if not l.startswith('=='))]
att=[i for i,r in enumerate(rows) if 'flash' in r['Kernel Name']]
depth=int(sys.argv[2]); g=len(att)//depth-2
i0=att[g*depth+1]; i1=att[g*depth+2]
for r in rows[i0:i1]: print('%8.1f us  grid %-14s blk %-12s %s'%(float(r['Metric Value'].replace(',',''))/1e3, r['Grid Size'], r['Block Size'], r['Kernel Name'][:60]))
