#!/usr/bin/env python3
"""A tighter lower bound for a cold start, from the app's own read timeline.

usage: timeline_bound.py RESULTS.json [--runs N] [--variant obd-trace]
Needs root, the obd binary (OBD_BIN, default target/release/obd) and the
registry storage a bench/coldstart.sh run left in BENCH_DIR (default
/tmp/obd-coldstart).

The issue's bound, max(warm, pull + working set / link rate), assumes the
app can use each byte the moment it arrives. An app that reads most of its
bytes in its first moments (a JVM maps its class archive and modules at
once) cannot: it waits for them, then still runs as long as it does warm.
This script measures when each image's app reads its bytes: the image's
disk is flattened from the registry's blobs (the obd form), attached
read-only on a loop device with the readahead an obd + trace device uses
(32 KiB, trace_replay::pack::TRACED_READ_AHEAD_KB), caches are dropped, and
the image's command runs in a chroot while the loop device's read counter is
sampled every 10 ms. For a variant with pull time P, warm start W_s, and
the fewest bytes any lazy variant fetched B at link rate c, a cold start
cannot end before

    max(P + W_s,  max_i( f_i * B / c + W_s - t_i * W_s / A ))

where f_i is the share of the app's bytes read by t_i into a local run of
length A: bytes that arrive no sooner than the link carries them from the
pull's start, and an app that still has W_s - t_i of its warm run to go once
it has them (the local run stretched to the warm start's length, which only
moves reads later and so lowers the bound). Prints a table and writes
RESULTS-timeline-bound.json.
"""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DIR = os.environ.get("BENCH_DIR", "/tmp/obd-coldstart")
OBD = os.environ.get("OBD_BIN", os.path.join(REPO, "target/release/obd"))
READ_AHEAD_KB = 32
BLOBS = os.path.join(DIR, "registry-data/docker/registry/v2/blobs/sha256")
REPOS = os.path.join(DIR, "registry-data/docker/registry/v2/repositories")


def blob(digest):
    h = digest.split(":", 1)[1]
    return os.path.join(BLOBS, h[:2], h, "data")


def flatten(image, tag, out):
    """Flattens REG/bench/<image>:<tag> from the registry's files; returns
    the image config's process (argv, cwd, env)."""
    with open(os.path.join(REPOS, "bench", image, "_manifests/tags", tag, "current/link")) as f:
        manifest = json.load(open(blob(f.read().strip())))
    cfg = json.load(open(blob(manifest["config"]["digest"])))["config"]
    lowers = [{"file": blob(l["digest"])} for l in manifest["layers"]]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as c:
        json.dump({"lowers": lowers}, c)
    try:
        if not os.path.exists(out):
            subprocess.run([OBD, "image", "flatten", "--config", c.name, "-o", out + ".tmp"],
                           check=True, stdout=subprocess.DEVNULL)
            os.rename(out + ".tmp", out)
    finally:
        os.unlink(c.name)
    argv = (cfg.get("Entrypoint") or []) + (cfg.get("Cmd") or [])
    return argv, cfg.get("WorkingDir") or "/", cfg.get("Env") or []


def timeline(disk, argv, cwd, env):
    """One local run: (seconds, [(t, share of the bytes read by t)])."""
    mnt = tempfile.mkdtemp(prefix="obd-tl-")
    lo = subprocess.run(["losetup", "-f", "--show", "-r", disk], check=True,
                        capture_output=True, text=True).stdout.strip()
    name = os.path.basename(lo)
    mounted = []
    try:
        with open(f"/sys/block/{name}/queue/read_ahead_kb", "w") as f:
            f.write(str(READ_AHEAD_KB))
        for m in (["-o", "ro", lo, mnt], ["-t", "proc", "proc", f"{mnt}/proc"],
                  ["--bind", "/dev", f"{mnt}/dev"], ["-t", "tmpfs", "tmpfs", f"{mnt}/tmp"]):
            subprocess.run(["mount", *m], check=True)
            mounted.append(m[-1])
        subprocess.run(["sync"])
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")

        def sectors():
            with open(f"/sys/block/{name}/stat") as f:
                return int(f.read().split()[2])

        s0, t0 = sectors(), time.time()
        p = subprocess.Popen([shutil.which("chroot") or "/usr/sbin/chroot", mnt, "/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv],
                             env=dict(e.split("=", 1) for e in env if "=" in e),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pts = []
        while p.poll() is None:
            time.sleep(0.01)
            pts.append((time.time() - t0, sectors() - s0))
        a = time.time() - t0
        pts.append((a, sectors() - s0))
        if p.returncode != 0:
            raise RuntimeError(f"{argv} exited with {p.returncode}")
        total = pts[-1][1] or 1
        return a, [(t, n / total) for t, n in pts]
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", m], capture_output=True)
        subprocess.run(["losetup", "-d", lo], capture_output=True)
        os.rmdir(mnt)


def rate_bps(link):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", link.split("@")[0].lower())
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def main():
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        sys.exit(__doc__)
    path, runs, variant = args[0], 3, "obd-trace"
    if "--runs" in args:
        runs = int(args[args.index("--runs") + 1])
    if "--variant" in args:
        variant = args[args.index("--variant") + 1]
    res = json.load(open(path))
    s = res["summary"]
    out = {"read_ahead_kb": READ_AHEAD_KB, "variant": variant, "images": {}, "bounds": []}
    for image in res["images"]:
        disk = os.path.join(DIR, f"timeline-{image}.raw")
        argv, cwd, env = flatten(image, "obd", disk)
        tls = [timeline(disk, argv, cwd, env) for _ in range(runs)]
        out["images"][image] = [{"seconds": a, "points": pts} for a, pts in tls]
        for n in (0.5, 0.8):
            at = [next(t / a for t, f in pts if f >= n) for a, pts in tls]
            print(f"{image}: {int(n * 100)} % of its bytes read by {statistics.median(at):.0%} "
                  f"of its run (local runs {statistics.median(a for a, _ in tls):.2f} s)")
    rows = ["| link | image | cold (s) | issue's bound (s) | cold ÷ it | timeline bound (s) "
            "| cold ÷ it |", "|---|---|---:|---:|---:|---:|---:|"]
    for link in res["links"]:
        for image in res["images"]:
            x = s.get(f"{link}/{image}/{variant}")
            if not x:
                continue
            pull, warm, cold = (x[k]["median"] for k in ("pull_s", "warm_s", "cold_s"))
            lazy = [s[k]["rx_bytes"]["median"] for k in s
                    if k.startswith(f"{link}/{image}/") and not k.endswith("/oci")]
            bits = min(lazy) * 8 / rate_bps(link)
            issue = max(warm, pull + bits)
            per_run = [max(pull + warm, max(f * bits + warm - t * warm / a for t, f in pts))
                       for a, pts in ((r["seconds"], r["points"]) for r in out["images"][image])]
            b = statistics.median(per_run)
            out["bounds"].append({"link": link, "image": image, "cold_s": cold,
                                  "issue_bound_s": issue, "timeline_bound_s": b})
            rows.append(f"| {link} | {image} | {cold:.2f} | {issue:.2f} | {cold / issue:.2f} | "
                        f"{b:.2f} | {cold / b:.2f} |")
    print("\n".join(rows))
    with open(re.sub(r"\.json$", "", path) + "-timeline-bound.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
