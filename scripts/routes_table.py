"""The table of docs/routes.md from `ditmoe routes`' routes.json: per MoE layer, the mean
total-variation distance between each row's expert distribution (a timestep, a patch, a class)
and the layer's overall one (0 = routing ignores that factor), and the load entropy at the
first, middle and last model evaluation.

    python3 scripts/routes_table.py ROUTES_DIR/routes.json
"""
import json
import math
import sys


def mean_tv(rows):
    total = [sum(col) for col in zip(*rows)]
    overall = [t / sum(total) for t in total]
    tvs = []
    for row in rows:
        n = sum(row)
        if n > 0:
            tvs.append(0.5 * sum(abs(x / n - o) for x, o in zip(row, overall)))
    return sum(tvs) / len(tvs)


routes = json.load(open(sys.argv[1]))
print(f"| layer | by timestep | by patch | by class | load entropy, first / middle / last step (bits, max {math.log2(routes['num_experts']):g}) |")
print("|---|---|---|---|---|")
for layer in routes["layers"]:
    h = layer["entropy_bits"]
    by_class = layer["load_by_class"]["fractions"]  # each class's shares (classes weigh equally)
    print(f"| {layer['layer']} | {mean_tv(layer['load_by_step']):.3f} | {mean_tv(layer['load_by_patch']):.3f} | "
          f"{mean_tv(by_class):.3f} | {h[0]:.2f} / {h[len(h) // 2]:.2f} / {h[-1]:.2f} |")
