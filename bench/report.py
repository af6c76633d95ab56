#!/usr/bin/env python3
"""Turns bench/coldstart.py's JSON into a markdown table, the goal checks
and a PNG plot (matplotlib, if installed), next to the JSON.

usage: report.py RESULTS.json [--doc docs/BENCHMARKS.md]
With --doc, the text between `<!-- coldstart:begin -->` and
`<!-- coldstart:end -->` in that file is replaced by the table.
"""
import json
import os
import sys

ORDER = ["oci", "estargz", "obd", "obd-trace", "obd-trace-late", "obd-trace-alt"]
NAMES = {"oci": "OCI (overlayfs, full pull)", "estargz": "eStargz (stargz snapshotter)",
         "obd": "obd lazy", "obd-trace": "obd + trace prefetch",
         "obd-trace-late": "obd + trace, device attached at run (prefetch_at_pull off)",
         "obd-trace-alt": "obd + trace, [prefetch] as in the JSON's obd.prefetch_alt"}


def mib(b):
    return f"{b / (1 << 20):.1f}"


def table(r):
    s = r["summary"]
    dropped = all("warm_dropped_s" in x for x in s.values())
    rows = ["| link | image | variant | cold median (s) | cold p90 (s) | pull (s) | "
            "run→ready (s) | warm median (s) | "
            + ("warm, caches dropped (s) | " if dropped else "")
            + "fetched MiB (veth) | fetched MiB (blobs) |",
            "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if dropped else "")
            + "---:|---:|"]
    for link in r["links"]:
        for image in r["images"]:
            for v in ORDER:
                k = f"{link}/{image}/{v}"
                if k not in s:
                    continue
                x = s[k]
                rows.append(
                    f"| {link} | {image} | {NAMES[v]} | {x['cold_s']['median']:.2f} | "
                    f"{x['cold_s']['p90']:.2f} | {x['pull_s']['median']:.2f} | "
                    f"{x['run_to_ready_s']['median']:.2f} | {x['warm_s']['median']:.2f} | "
                    + (f"{x['warm_dropped_s']['median']:.2f} | " if dropped else "")
                    + f"{mib(x['rx_bytes']['median'])} | {mib(x['blob_bytes']['median'])} |")
    return "\n".join(rows)


def obd_settings(r):
    """The obd conversion and fetch settings of the run (older runs: none)."""
    o = r.get("obd")
    if not o:
        return []
    block = f" --block-size {o['block_size']}" if "block_size" in o else ""
    level = f" --level {o['level']}" if "level" in o else ""
    alt = ""
    if any(x.get("variant") == "obd-trace-alt" for x in r.get("runs", [])):
        alt = f"; obd-trace-alt: `[prefetch]` {o.get('prefetch_alt', '')!r}"
    return [f"- obd: `obd convert --algorithm {o['algorithm']}{block}{level}`, service `min_fetch` "
            f"{o['min_fetch']}, cache `block_size` {o['cache_block_size']}{alt}"]


def goals(r):
    s, out = r["summary"], []
    link = "100mbit" if "100mbit" in r["links"] else r["links"][0]
    img = "large" if "large" in r["images"] else next(iter(r["images"]))

    def med(v, f="cold_s"):
        k = f"{link}/{img}/{v}"
        return s[k][f]["median"] if k in s else None

    def line(goal, ok, detail):
        mark = "n/a" if ok is None else ("met" if ok else "NOT met")
        out.append(f"| {goal} | {detail} | **{mark}** |")

    oci, est, lazy, tr = med("oci"), med("estargz"), med("obd"), med("obd-trace")
    out.append(f"Goals ({img} image, {link}):\n")
    out.append("| goal | measured | |\n|---|---|---|")
    if oci and tr:
        line("obd + prefetch ≤ 1/5 of OCI", tr <= oci / 5,
             f"{tr:.2f} s vs {oci:.2f} s = {tr / oci:.2f}×")
    if est and tr:
        line("obd + prefetch ≤ 0.7× eStargz", tr <= 0.7 * est,
             f"{tr:.2f} s vs {est:.2f} s = {tr / est:.2f}×")
    else:
        line("obd + prefetch ≤ 0.7× eStargz", None,
             "; ".join(x["why"] for x in r.get("skipped", [])) or "no eStargz runs")
    warm = med("obd", "warm_s")
    if lazy and tr and warm is not None and lazy > warm:
        closed = (lazy - tr) / (lazy - warm)
        line("prefetch closes ≥ 90% of the cold→warm gap", closed >= 0.9,
             f"lazy cold {lazy:.2f} s, prefetch cold {tr:.2f} s, warm {warm:.2f} s: "
             f"{100 * closed:.0f}% closed")
    dropped = med("obd", "warm_dropped_s") if "warm_dropped_s" in s.get(
        f"{link}/{img}/obd", {}) else None
    if lazy and tr and dropped is not None and lazy > dropped:
        closed = (lazy - tr) / (lazy - dropped)
        line("(the same, against a warm start with the page cache dropped)", closed >= 0.9,
             f"lazy cold {lazy:.2f} s, prefetch cold {tr:.2f} s, warm with caches dropped "
             f"{dropped:.2f} s: {100 * closed:.0f}% closed")
    rec = r["images"].get(img, {}).get("record", {})
    fetched = med("obd-trace", "rx_bytes")
    if rec.get("trace_bytes") and fetched:
        ws = rec["trace_bytes"]
        line("bytes fetched ≤ 1.2× recorded working set", fetched <= 1.2 * ws,
             f"{mib(fetched)} MiB fetched (veth, all traffic) vs {mib(ws)} MiB recorded "
             f"(uncompressed layer bytes) = {fetched / ws:.2f}×")
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
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), squeeze=False)
    for ax, (link, img) in zip(axes[0], groups):
        vs = [v for v in ORDER if f"{link}/{img}/{v}" in s]
        cold = [s[f"{link}/{img}/{v}"]["cold_s"]["median"] for v in vs]
        p90 = [s[f"{link}/{img}/{v}"]["cold_s"]["p90"] for v in vs]
        warm = [s[f"{link}/{img}/{v}"]["warm_s"]["median"] for v in vs]
        x = range(len(vs))
        ax.bar([i - 0.2 for i in x], cold, 0.4, label="cold (median)",
               yerr=[[0] * len(vs), [max(0, a - b) for a, b in zip(p90, cold)]], capsize=3)
        ax.bar([i + 0.2 for i in x], warm, 0.4, label="warm (median)")
        ax.set_xticks(list(x))
        ax.set_xticklabels(vs, rotation=20)
        ax.set_title(f"{img} image, {link}")
        ax.set_ylabel("seconds to `ready`")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
        imgs.append(f"- `{name}`: {mib(i['oci_layer_bytes'])} MiB of gzip layers; recorded "
                    f"working set {mib(rec.get('trace_bytes', 0))} MiB in "
                    f"{rec.get('trace_records', 0)} trace records")
    md = "\n".join([
        f"Run {r['started']} → {r.get('finished', '(unfinished)')}, {r['reps']} repetitions, "
        f"{r['cpus']} CPUs, kernel {r['kernel']}, load average at start "
        f"{' '.join(r['load_at_start'])}, at end {' '.join(r.get('load_at_end', ['?']))}.",
        "", *imgs, *obd_settings(r), "", table(r), "", goals(r), ""])
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
