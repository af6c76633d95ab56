#!/usr/bin/env python3
"""Prints the timeline of obd cold runs kept by `BENCH_TIMELINE=<dir>
bench/coldstart.sh`: per run, when the pull ended, when registry requests
were asked for, granted and done (by priority), the device's reads (and the
time from the last one to `ready`), and when the app was ready;
times in ms from the run's start.

usage: timeline.py DIR
"""
import glob
import json
import os
import sys


def per_100ms(items, at, values):
    """Sums of the `values(item)` tuples per 100 ms of `at(item)` (ms), sorted."""
    out = {}
    for r in items:
        k = int(at(r) // 100)
        out[k] = tuple(a + b for a, b in zip(out.get(k, (0,) * len(values(r))), values(r)))
    return sorted(out.items())


def main(d):
    reqs, devs = [], []
    for p in glob.glob(os.path.join(d, "fetch-*.log")):
        with open(p) as f:
            for line in f:
                x = line.split()
                if len(x) == 5 and x[0] == "dev":
                    devs.append({"off": int(x[1]), "len": int(x[2]), "start": int(x[3]),
                                 "end": int(x[4])})
                    continue
                if len(x) != 8:
                    continue
                reqs.append({"digest": x[0], "off": int(x[1]), "len": int(x[2]), "prio": x[3],
                             "ask": int(x[4]), "go": int(x[5]), "done": int(x[6]),
                             "ok": x[7] == "true", "pid": p.rsplit("-", 1)[1][:-4]})
    for run in sorted(glob.glob(os.path.join(d, "*.json"))):
        with open(run) as f:
            t = json.load(f)
        t0, end = t["t0_us"], t["ready_us"]
        mine = sorted((r for r in reqs if t0 <= r["ask"] <= end), key=lambda r: r["ask"])
        ms = lambda us: (us - t0) / 1000
        print(f"== {os.path.basename(run)[:-5]}: pull ends {ms(t['pull_end_us']):.0f} ms, "
              f"ready {ms(end):.0f} ms, {len(mine)} requests")
        by = {}
        for r in mine:
            b = by.setdefault(r["prio"], {"n": 0, "bytes": 0, "first": r["ask"], "last": 0,
                                          "wait": 0})
            b["n"] += 1
            b["bytes"] += r["len"]
            b["last"] = max(b["last"], r["done"])
            b["wait"] += r["done"] - r["ask"]
        for p, b in sorted(by.items()):
            print(f"   {p:10} {b['n']:4} requests {b['bytes'] / 2**20:6.2f} MiB, first asked "
                  f"{ms(b['first']):6.0f} ms, last done {ms(b['last']):6.0f} ms, "
                  f"mean ask→done {b['wait'] / b['n'] / 1000:6.1f} ms")
        # Bytes done per 100 ms: how busy the link was.
        done = per_100ms(mine, lambda r: ms(r["done"]), lambda r: (r["len"],))
        print("   MiB done per 100 ms: " + " ".join(
            f"{k * 100}:{v[0] / 2**20:.2f}" for k, v in done))
        dv = sorted((r for r in devs if t0 <= r["start"] <= end), key=lambda r: r["start"])
        if dv:
            waited = sum(r["end"] - r["start"] for r in dv) / 1000
            print(f"   device reads: {len(dv)}, {sum(r['len'] for r in dv) / 2**20:.2f} MiB, first "
                  f"{ms(dv[0]['start']):.0f} ms, last done {ms(max(r['end'] for r in dv)):.0f} ms, "
                  f"{waited:.0f} ms in reads (summed)")
            reads = per_100ms(dv, lambda r: ms(r["start"]),
                              lambda r: (1, (r["end"] - r["start"]) / 1000))
            print("   device reads per 100 ms (count/ms waited): " + " ".join(
                f"{k * 100}:{n}/{w:.0f}" for k, (n, w) in reads))
            # What the start did after its last device read: the app's own
            # run past its last byte (or a wait outside the device).
            last = max(r["end"] for r in dv)
            print(f"   after the last device read: {ms(end) - ms(last):.0f} ms to ready")
            slow = sorted(dv, key=lambda r: r["start"] - r["end"])[:8]
            print("   slowest: " + ", ".join(
                f"{ms(r['start']):.0f}+{(r['end'] - r['start']) / 1000:.0f}ms" for r in slow))
        fg = [r for r in mine if r["prio"] == "Foreground"]
        for r in fg[:40]:
            print(f"   fg {ms(r['ask']):7.1f} → {ms(r['done']):7.1f} ms  {r['len']:8} B "
                  f"@{r['off']} {r['digest'][7:19]}")


if __name__ == "__main__":
    main(sys.argv[1])
