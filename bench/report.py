#!/usr/bin/env python3
"""Turns bench/coldstart.py's JSON into a markdown table, the goal checks
and a PNG plot (matplotlib, if installed), next to the JSON.

usage: report.py RESULTS.json [--doc docs/BENCHMARKS.md]
With --doc, the text between `<!-- coldstart:begin -->` and
`<!-- coldstart:end -->` in that file is replaced by the table.

The bound of a variant is max(its warm start, its pull time + the working
set's bytes / the link rate), the working set's bytes being the fewest any
lazy variant fetched for that image on that link (veth, all traffic): no
format can start sooner than its own warm start, nor before the bytes the
start needs have crossed the link after the pull.
"""
import json
import os
import re
import sys

ORDER = ["oci", "estargz", "estargz-opt", "zstdchunked", "obd", "obd-noverify", "obd-noahead", "obd-noidle",
         "obd-alt", "obd-trace", "obd-trace-warm", "obd-trace-nowarmcfg", "obd-trace-noahead", "obd-trace-nowarm", "obd-trace-late", "obd-trace-alt"]
NAMES = {"oci": "OCI (overlayfs, full pull)", "estargz": "eStargz",
         "estargz-opt": "eStargz optimized", "zstdchunked": "zstd:chunked optimized",
         "obd": "obd lazy", "obd-noverify": "obd lazy, verify off",
         "obd-alt": "obd lazy, service alt", "obd-trace": "obd + trace prefetch",
         "obd-trace-nowarm": "obd + trace, no page-cache warm list",
         "obd-trace-warm": "obd + trace, page-cache warm on",
         "obd-trace-nowarmcfg": "obd + trace, page-cache warm off",
         "obd-noahead": "obd lazy, layers opened at attach",
         "obd-noidle": "obd lazy, device released with each container",
         "obd-trace-noahead": "obd + trace, layers opened at attach",
         "obd-trace-late": "obd + trace, device attached at run",
         "obd-trace-alt": "obd + trace, service alt"}
LAZY = [v for v in ORDER if v != "oci"]


def mib(b):
    return f"{b / (1 << 20):.1f}"


def rate_bps(link):
    """Bits per second of `100mbit`, `1gbit`, `100mbit@20ms`, …"""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", link.split("@")[0].lower())
    if not m:
        return None
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def med(s, link, img, v, f="cold_s"):
    x = s.get(f"{link}/{img}/{v}", {}).get(f)
    return x["median"] if x else None


def working_set(s, link, img):
    xs = [med(s, link, img, v, "rx_bytes") for v in LAZY]
    xs = [x for x in xs if x]
    return min(xs) if xs else None


def bound(s, link, img, v):
    ws, rate = working_set(s, link, img), rate_bps(link)
    warm, pull = med(s, link, img, v, "warm_s"), med(s, link, img, v, "pull_s")
    if None in (ws, rate, warm, pull):
        return None
    return max(warm, pull + ws * 8 / rate)


def table(r):
    s = r["summary"]
    rows = ["| link | image | variant | cold median (s) | cold p90 (s) | pull (s) | "
            "run→ready (s) | warm (s) | warm, caches dropped (s) | bound (s) | cold ÷ bound | "
            "fetched MiB (veth) | fetched MiB (blobs) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for link in r["links"]:
        for image in r["images"]:
            for v in ORDER:
                k = f"{link}/{image}/{v}"
                if k not in s:
                    continue
                x = s[k]
                b = bound(s, link, image, v)
                wd = x.get("warm_dropped_s", {}).get("median")
                rows.append(
                    f"| {link} | {image} | {NAMES[v]} | {x['cold_s']['median']:.2f} | "
                    f"{x['cold_s']['p90']:.2f} | {x['pull_s']['median']:.2f} | "
                    f"{x['run_to_ready_s']['median']:.2f} | {x['warm_s']['median']:.2f} | "
                    + (f"{wd:.2f} | " if wd is not None else "— | ")
                    + (f"{b:.2f} | {x['cold_s']['median'] / b:.2f} | " if b else "— | — | ")
                    + f"{mib(x['rx_bytes']['median'])} | {mib(x['blob_bytes']['median'])} |")
    return "\n".join(rows)


def settings(r):
    o = r.get("obd") or {}
    out = []
    if o.get("version"):
        out.append(f"- obd: {o['version']}, `obd convert` "
                   + (f"with `{' '.join(o['convert_args'])}`" if o.get("convert_args")
                      else "with its defaults")
                   + ", the service's defaults"
                   + (f"; obd-alt variants add `{o['service_alt']!r}`"
                      if o.get("service_alt") and any(
                          x.get("variant", "").endswith("alt") for x in r.get("runs", []))
                      else ""))
    elif o:  # older runs: bench-tuned settings
        out.append(f"- obd (bench-tuned): {json.dumps(o)}")
    return out


def goals(r):
    s, out = r["summary"], []

    def line(goal, where, ok, detail):
        mark = "n/a" if ok is None else ("met" if ok else "NOT met")
        out.append(f"| {goal} | {where} | {detail} | **{mark}** |")

    out.append("| goal | image, link | measured | |\n|---|---|---|---|")
    for img in r["images"]:
        lb = r["images"][img].get("layer_bytes", {}).get("obd")
        gz = r["images"][img].get("oci_layer_bytes")
        if lb and gz:
            line("default conversion ≤ 1.15× the gzip layers", img, lb <= 1.15 * gz,
                 f"{mib(lb)} vs {mib(gz)} MiB = {lb / gz:.3f}×")
    for link in r["links"]:
        for img in r["images"]:
            w = f"{img}, {link}"
            g = lambda v, f="cold_s": med(s, link, img, v, f)
            tr, opt, est, lazy = g("obd-trace"), g("estargz-opt"), g("estargz"), g("obd")
            if tr and opt:
                line("obd + trace ≤ 0.6× eStargz optimized", w, tr <= 0.6 * opt,
                     f"{tr:.2f} vs {opt:.2f} s = {tr / opt:.2f}×")
            b = bound(s, link, img, "obd-trace")
            if tr and b:
                line("obd + trace ≤ 1.2× the bound", w, tr <= 1.2 * b,
                     f"{tr:.2f} vs {b:.2f} s = {tr / b:.2f}×")
            bt, bo = g("obd-trace", "rx_bytes"), g("estargz-opt", "rx_bytes")
            if bt and bo:
                line("obd + trace fetches ≤ eStargz optimized", w, bt <= bo,
                     f"{mib(bt)} vs {mib(bo)} MiB = {bt / bo:.2f}×")
            if lazy and est:
                line("obd lazy ≤ 0.8× eStargz", w, lazy <= 0.8 * est,
                     f"{lazy:.2f} vs {est:.2f} s = {lazy / est:.2f}×")
            nv = g("obd-noverify")
            if lazy and nv:
                line("verification on ÷ off ≤ 1.03× (cold, obd lazy)", w, lazy <= 1.03 * nv,
                     f"{lazy:.2f} vs {nv:.2f} s = {lazy / nv:.2f}×")
            oo = g("oci", "warm_dropped_s")
            for v, what in (("obd", "obd lazy"), ("obd-trace", "obd + trace")):
                od = g(v, "warm_dropped_s")
                if od and oo:
                    line(f"another container, page cache dropped, ≤ 1.05× overlayfs ({what})",
                         w, od <= 1.05 * oo, f"{od:.2f} vs {oo:.2f} s = {od / oo:.2f}×")
    return "\n".join(out)


def plot(r, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed; no plot", file=sys.stderr)
        return False
    s = r["summary"]
    groups = [(l, i) for l in r["links"] for i in r["images"]]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 4.4), squeeze=False)
    for ax, (link, img) in zip(axes[0], groups):
        vs = [v for v in ORDER if f"{link}/{img}/{v}" in s and v != "oci"]
        cold = [med(s, link, img, v) for v in vs]
        p90 = [s[f"{link}/{img}/{v}"]["cold_s"]["p90"] for v in vs]
        warm = [med(s, link, img, v, "warm_s") for v in vs]
        bounds = [bound(s, link, img, v) for v in vs]
        x = range(len(vs))
        ax.bar([i - 0.2 for i in x], cold, 0.4, label="cold (median)",
               yerr=[[0] * len(vs), [max(0, a - b) for a, b in zip(p90, cold)]], capsize=3)
        ax.bar([i + 0.2 for i in x], warm, 0.4, label="warm (median)")
        ax.plot(list(x), [b or 0 for b in bounds], "k_", markersize=14, label="bound")
        ax.set_xticks(list(x))
        ax.set_xticklabels(vs, rotation=30, ha="right", fontsize=8)
        oci = med(s, link, img, "oci")
        ax.set_title(f"{img}, {link}" + (f" (OCI {oci:.1f} s)" if oci else ""), fontsize=9)
        ax.set_ylabel("seconds to `ready`")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    with open(path) as f:
        r = json.load(f)
    if "summary" not in r:  # an unfinished run: summarise what is there
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from coldstart import summarize
        r["summary"] = summarize(r)
    base = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    imgs = []
    for name, i in r["images"].items():
        rec = i.get("record", {})
        sizes = ", ".join(f"{k} {mib(v)} MiB" for k, v in i.get("layer_bytes", {}).items())
        imgs.append(f"- `{name}`: {mib(i['oci_layer_bytes'])} MiB of gzip layers"
                    + (f" ({sizes})" if sizes else "")
                    + f"; recorded working set {mib(rec.get('trace_bytes', 0))} MiB in "
                    f"{rec.get('trace_records', 0)} trace records"
                    + (f", packed into a {mib(rec['working_set_layer_size'])} MiB layer"
                       if rec.get("working_set_layer_size") else "")
                    + (f"; page-cache warm list {rec['warm_files']} files, "
                       f"{mib(rec['warm_bytes'])} MiB" if rec.get("warm_files") else ""))
    skipped = [f"- skipped {x['variant']}: {x['why']}" for x in r.get("skipped", [])]
    md = "\n".join([
        f"Run {r['started']} → {r.get('finished', '(unfinished)')}, {r['reps']} repetitions, "
        f"{r['cpus']} CPUs, kernel {r['kernel']}, load average at start "
        f"{' '.join(r['load_at_start'])}, at end {' '.join(r.get('load_at_end', ['?']))}.",
        "", *imgs, *settings(r), *skipped, "", table(r), "", goals(r), ""])
    with open(os.path.join(base, stem + ".md"), "w") as f:
        f.write(md)
    plot(r, os.path.join(base, stem + ".png"))
    print(md)
    if "--doc" in sys.argv:
        doc = sys.argv[sys.argv.index("--doc") + 1]
        with open(doc) as f:
            text = f.read()
        b, e = "<!-- coldstart:begin -->", "<!-- coldstart:end -->"
        if b in text and e in text:
            text = text[:text.index(b) + len(b)] + "\n" + md + text[text.index(e):]
            with open(doc, "w") as f:
                f.write(text)


if __name__ == "__main__":
    main()
