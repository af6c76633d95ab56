#!/usr/bin/env python3
"""Summarises bench/ab.sh output: median of each numeric figure per build, and new/old."""
import json
import statistics
import sys
from collections import defaultdict

vals = defaultdict(list)  # (bench, key, build) -> [values]
for line in open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin:
    line = line.strip()
    if not line:
        continue
    r = json.loads(line)
    todo = list(r["figures"].items())
    while todo:
        k, v = todo.pop()
        if isinstance(v, dict) and k != "goals":
            todo.extend((f"{k}.{k2}", v2) for k2, v2 in v.items())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            vals[(r["bench"], k, r["build"])].append(float(v))

print("| bench | figure | old (median) | new (median) | new/old |")
print("|---|---|---:|---:|---:|")
for (bench, key, build) in sorted(vals):
    if build != "old" or (bench, key, "new") not in vals:
        continue
    o = statistics.median(vals[(bench, key, "old")])
    n = statistics.median(vals[(bench, key, "new")])
    ratio = f"{n / o:.3f}" if o else "—"
    print(f"| {bench} | {key} | {o:.4g} | {n:.4g} | {ratio} |")
