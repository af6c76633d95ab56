#!/usr/bin/env python3
"""Cold-start benchmark: OCI vs eStargz (plain and optimized, zstd:chunked)
vs obd lazy vs obd + trace prefetch.

Run through bench/coldstart.sh (which builds the release binaries). Needs
root, containerd, ctr, runc, docker-registry, skopeo, iproute2 (netns, veth,
tc tbf). The eStargz variants need `ctr-remote` (Debian's stargz-snapshotter)
and `containerd-stargz-grpc` (coldstart.sh builds it from Debian's Go
library); without them they are skipped and said so in the results.

The registry runs in a network namespace behind a veth pair; the namespace
side's egress (registry -> node) is shaped with tc tbf to each link rate.
Every measured run starts a fresh node (new containerd root and state, new
snapshotter root) with the page cache dropped; it times pull and `ctr run`
up to the app's `ready` line (cold), then a second `ctr run` on the same
node (warm), then a third after dropping the page cache (warm, caches
dropped), and counts the bytes the node received on the veth.

obd runs with its defaults: `obd convert SRC DST` and a service config that
names only the registry (plain HTTP). No bench-only tuning.

Variants (BENCH_VARIANTS, all interleaved within each repetition):
  oci           `ctr images pull` (gzip layers, overlayfs)
  estargz       `ctr-remote image convert --estargz --oci`
  estargz-opt   `ctr-remote image optimize --oci --period RECORD_TIME`: the
                workload's files first and prefetched (the image's own
                command, as obd's trace records it)
  zstdchunked   the same optimize with `--zstdchunked`
  obd           `obd convert` (defaults), lazy
  obd-trace     + `obd trace record --time RECORD_TIME` (acceleration layer)
  obd-noverify  obd lazy with `[cache] verify = "off"` (piece tables unused)
  also: obd-trace-warm / obd-trace-nowarmcfg (the same image with the
  snapshotter's warm_page_cache = true / false: its page-cache warm list
  read at attach or not); obd-noahead / obd-trace-noahead (the same
  images with the snapshotter's open_layers_at_commit = false: the layers
  opened by the device's worker at attach, not as the pull commits them);
  obd-noidle (obd lazy with device_idle_secs = 0: the device released with
  each container, so the next attaches it again and learns no warm list);
  obd-trace-nowarm (recorded with --no-warm); obd-trace-late (prefetch_at_pull off, the device attached when the
  container starts); obd-alt / obd-trace-alt (obd lazy / + trace with the
  service TOML BENCH_OBD_ALT added, e.g. '[fetch]\nmin_fetch = 65536').

Environment (defaults):
  BENCH_DIR=/tmp/obd-coldstart  BENCH_REPS=3  BENCH_LINKS="100mbit 1gbit"
    (a link is RATE or RATE@DELAY, e.g. 100mbit@20ms adds 20 ms per round trip)
  BENCH_IMAGES="large java"     (large: the Python image + BENCH_PAD_MB of
                                unused data; java: fixtures/scripts/
                                make-java-image.sh; small: busybox)
  BENCH_PAD_MB=448  BENCH_RECORD_TIME=30
  BENCH_VARIANTS="oci estargz estargz-opt zstdchunked obd obd-trace obd-noverify"
  BENCH_OUT=bench/results       OBD_BIN / OBD_SNAPSHOTTER (release builds)
  BENCH_OBD_CONVERT_ARGS=""     extra `obd convert` flags (experiments only;
                                recorded in the JSON as "obd")
  BENCH_OBD_ALT=""              service TOML of the obd-alt variants
  BENCH_REUSE_STARGZ=1          keep the eStargz forms an earlier run pushed
                                to BENCH_DIR's registry (same source image)
  BENCH_TIMELINE=<dir>          keep a timeline of each obd cold run there:
                                one line per registry request from every
                                obd process (OBD_FETCH_LOG, fetch-<pid>.log),
                                the snapshotter log, and each cold run's
                                start, pull end and ready times (<tag>.json)
"""
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DIR = os.environ.get("BENCH_DIR", "/tmp/obd-coldstart")
REPS = int(os.environ.get("BENCH_REPS", "3"))
LINKS = os.environ.get("BENCH_LINKS", "100mbit 1gbit").split()
IMAGES = os.environ.get("BENCH_IMAGES", "large java").split()
VARIANTS = os.environ.get(
    "BENCH_VARIANTS", "oci estargz estargz-opt zstdchunked obd obd-trace obd-noverify").split()
PAD_MB = int(os.environ.get("BENCH_PAD_MB", "448"))
RECORD_TIME = int(os.environ.get("BENCH_RECORD_TIME", "30"))
OUT = os.environ.get("BENCH_OUT", os.path.join(HERE, "results"))
# Results file name (several passes can be merged by report.py).
NAME = os.environ.get("BENCH_NAME", "coldstart")
OBD_CONVERT_ARGS = os.environ.get("BENCH_OBD_CONVERT_ARGS", "").split()
# Keep the eStargz forms an earlier run left in BENCH_DIR's registry (their
# conversion does not depend on obd and takes minutes).
REUSE = os.environ.get("BENCH_REUSE_STARGZ") == "1"
OBD_ALT = os.environ.get("BENCH_OBD_ALT", "").replace("\\n", "\n")
TIMELINE = os.environ.get("BENCH_TIMELINE")
if TIMELINE:
    os.makedirs(TIMELINE, exist_ok=True)
    os.environ["OBD_FETCH_LOG"] = os.path.abspath(TIMELINE)
OBD = os.environ.get("OBD_BIN", os.path.join(REPO, "target/release/obd"))
SNAP = os.environ.get("OBD_SNAPSHOTTER", os.path.join(REPO, "target/release/obd-snapshotter"))
# bench/stargz-grpc (built by coldstart.sh from Debian's Go packages).
STARGZ = os.environ.get("STARGZ_GRPC", os.path.join(DIR, "bin", "containerd-stargz-grpc"))
NS = "obdbench"
HOST_IF, NS_IF = "obdb-h", "obdb-n"
HOST_IP, NS_IP = "10.231.77.1", "10.231.77.2"
REG = f"{NS_IP}:5000"
RUN_TIMEOUT = 600
STARGZ_VARIANTS = ("estargz", "estargz-opt", "zstdchunked")
# The service TOML each obd variant adds to the registry's section.
OBD_SERVICE = {"obd-noverify": '[cache]\nverify = "off"\n', "obd-alt": OBD_ALT,
               "obd-trace-alt": OBD_ALT}
# The image each variant pulls (its tag in the registry).
REF_TAG = {"obd-noverify": "obd", "obd-alt": "obd", "obd-trace-late": "obd-trace",
           "obd-trace-warm": "obd-trace", "obd-trace-nowarmcfg": "obd-trace",
           "obd-trace-alt": "obd-trace", "obd-noahead": "obd", "obd-trace-noahead": "obd-trace",
           "obd-noidle": "obd"}
# The snapshotter TOML each obd variant adds (the same image as another
# variant, one snapshotter setting changed).
SNAP_EXTRA = {"obd-trace-warm": "warm_page_cache = true\n",
              "obd-trace-nowarmcfg": "warm_page_cache = false\n",
              "obd-noahead": "open_layers_at_commit = false\n",
              "obd-trace-noahead": "open_layers_at_commit = false\n",
              "obd-noidle": "device_idle_secs = 0\n"}


def log(*a):
    print("[coldstart]", *a, file=sys.stderr, flush=True)


def sh(*cmd, check=True, quiet=False, **kw):
    if not quiet:
        log("$", " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def have(tool):
    return shutil.which(tool) is not None


# --- network -------------------------------------------------------------

def net_up():
    net_down()
    sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
    sh("ip", "link", "set", NS_IF, "netns", NS)
    sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_IF)
    sh("ip", "link", "set", HOST_IF, "up")
    for c in (["ip", "addr", "add", f"{NS_IP}/30", "dev", NS_IF],
              ["ip", "link", "set", NS_IF, "up"], ["ip", "link", "set", "lo", "up"]):
        sh("ip", "netns", "exec", NS, *c)


def net_down():
    sh("ip", "link", "del", HOST_IF, check=False, quiet=True)
    sh("ip", "netns", "del", NS, check=False, quiet=True)


def shape(link):
    """Registry -> node at `link`: `RATE` (tbf on the namespace side's
    egress) or `RATE@DELAY` (tbf with a netem delay under it, e.g.
    `100mbit@20ms`: the round trip grows by DELAY); None removes it."""
    sh("ip", "netns", "exec", NS, "tc", "qdisc", "del", "dev", NS_IF, "root",
       check=False, quiet=True)
    if not link:
        return
    rate, _, delay = link.partition("@")
    # burst: at least rate/HZ; 1 MiB covers 1 Gbit/s at HZ=100.
    sh("ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", NS_IF, "root", "handle", "1:",
       "tbf", "rate", rate, "burst", "1mb", "latency", "50ms")
    if delay:
        sh("ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", NS_IF, "parent", "1:1",
           "handle", "10:", "netem", "delay", delay, "limit", "100000")


def rx_bytes():
    with open(f"/sys/class/net/{HOST_IF}/statistics/rx_bytes") as f:
        return int(f.read())


class Registry:
    def __init__(self):
        self.data = os.path.join(DIR, "registry-data")
        self.log = os.path.join(DIR, "registry-access.log")
        cfg = os.path.join(DIR, "registry.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {self.data}\nhttp:\n  addr: {REG}\n")
        self.p = subprocess.Popen(["ip", "netns", "exec", NS, "docker-registry", "serve", cfg],
                                  stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        wait(lambda: subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/{NS_IP}/5000"],
                                    capture_output=True).returncode == 0, 20, "the registry")

    def stop(self):
        stop_proc(self.p)


def wait(cond, timeout, what):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def stop_proc(p, timeout=15):
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# --- a node: containerd + snapshotters -----------------------------------

class Node:
    def __init__(self, name, obd=True, stargz=False, at_pull=True, service="", snap_extra=""):
        self.dir = os.path.join(DIR, "nodes", name)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.sock = os.path.join(self.dir, "containerd.sock")
        self.procs = []
        plugins = ""
        if obd:
            sn = os.path.join(self.dir, "obd")
            os.makedirs(sn)
            # The service's defaults (the block cache under the root), the
            # registry over plain HTTP, and what the variant adds.
            with open(os.path.join(sn, "service.toml"), "w") as f:
                f.write((service.rstrip("\n") + "\n\n" if service else "")
                        + f'[registry.hosts."{REG}"]\nplain_http = true\n')
            toml = self.snap_toml = os.path.join(self.dir, "obd.toml")
            with open(toml, "w") as f:
                f.write(f'root = "{sn}"\naddress = "{self.dir}/obd.sock"\n'
                        f'lazy_pull = true\nrw_mode = "overlayfs"\n'
                        f'prefetch_at_pull = {"true" if at_pull else "false"}\n'
                        + snap_extra)
            self.snroot = sn
            self.procs.append(subprocess.Popen(
                [SNAP, "--config", toml], stderr=open(os.path.join(self.dir, "obd.log"), "a")))
            wait(lambda: os.path.exists(f"{self.dir}/obd.sock"), 20, "obd-snapshotter")
            plugins += (f'  [proxy_plugins.obd]\n    type = "snapshot"\n'
                        f'    address = "{self.dir}/obd.sock"\n')
        if stargz:
            root = os.path.join(self.dir, "stargz")
            self.procs.append(subprocess.Popen(
                [STARGZ, "-root", root, "-address", f"{self.dir}/stargz.sock",
                 "-plain-http", REG],
                stderr=open(os.path.join(self.dir, "stargz.log"), "a")))
            wait(lambda: os.path.exists(f"{self.dir}/stargz.sock"), 30, "containerd-stargz-grpc")
            plugins += (f'  [proxy_plugins.stargz]\n    type = "snapshot"\n'
                        f'    address = "{self.dir}/stargz.sock"\n')
        conf = os.path.join(self.dir, "containerd.toml")
        with open(conf, "w") as f:
            f.write(f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
                    f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    f'[grpc]\n  address = "{self.sock}"\n'
                    f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
                    f'[debug]\n  address = "{self.dir}/debug.sock"\n'
                    f'[metrics]\n  address = ""\n[proxy_plugins]\n{plugins}')
        self.containerd = subprocess.Popen(
            ["containerd", "--config", conf],
            stdout=open(os.path.join(self.dir, "containerd.log"), "a"), stderr=subprocess.STDOUT)
        wait(lambda: subprocess.run(["ctr", "--address", self.sock, "version"],
                                    capture_output=True).returncode == 0, 30, "containerd")

    def ctr(self, *a):
        return ["ctr", "--address", self.sock, *a]

    def stop(self):
        # Containers are run with --rm; removing the images lets the
        # snapshotters release their devices and mounts.
        imgs = subprocess.run(self.ctr("images", "ls", "-q"), capture_output=True,
                              text=True).stdout.split()
        if imgs:
            subprocess.run(self.ctr("images", "rm", "--sync", *imgs), capture_output=True)
        stop_proc(self.containerd)
        for p in self.procs:
            stop_proc(p)
        # Device workers outlive the snapshotter by design: end ours.
        for pid in own_workers(self.dir):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        t0 = time.time()
        while own_workers(self.dir) and time.time() - t0 < 15:
            time.sleep(0.1)
        for pid in own_workers(self.dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        unmount_below(self.dir)
        for l in sh("losetup", "-a", quiet=True, check=False).splitlines():
            if self.dir in l:
                sh("losetup", "-d", l.split(":", 1)[0], check=False, quiet=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def own_workers(d):
    """Pids of processes whose command line names our node directory."""
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit() or int(e) == os.getpid():
            continue
        try:
            with open(f"/proc/{e}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if "device-worker" in cmd and d in cmd:
            out.append(int(e))
    return out


def unmount_below(d):
    with open("/proc/self/mountinfo") as f:
        mps = [l.split(" ")[4] for l in f]
    for m in sorted((m for m in mps if m.startswith(d)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)


def drop_caches():
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# --- images --------------------------------------------------------------

def build_images():
    imgs = {}
    idir = os.path.join(DIR, "images")
    os.makedirs(idir, exist_ok=True)
    if "large" in IMAGES:
        src = sh(os.path.join(REPO, "fixtures/scripts/make-python-image.sh")).strip().splitlines()[-1]
        out = os.path.join(idir, "large")
        stamp = os.path.join(out, ".pad")
        if not (os.path.exists(stamp) and open(stamp).read() == f"{PAD_MB}"):
            sh("python3", os.path.join(HERE, "mkimage.py"), "large", src, "python", out, str(PAD_MB))
            open(stamp, "w").write(f"{PAD_MB}")
        imgs["large"] = out
    if "java" in IMAGES:
        imgs["java"] = java_layout(idir)
    if "small" in IMAGES:
        out = os.path.join(idir, "small")
        sh("python3", os.path.join(HERE, "mkimage.py"), "small", out)
        imgs["small"] = out
    return imgs


def java_layout(idir):
    """fixtures/scripts/make-java-image.sh's image, retagged `bench`."""
    src = sh(os.path.join(REPO, "fixtures/scripts/make-java-image.sh")).strip().splitlines()[-1]
    out = os.path.join(idir, "java")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    with open(os.path.join(out, "index.json")) as f:
        idx = json.load(f)
    for m in idx["manifests"]:
        m.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = "bench"
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(idx, f)
    return out


def layout_bytes(layout):
    with open(os.path.join(layout, "index.json")) as f:
        idx = json.load(f)
    d = idx["manifests"][0]["digest"].split(":")[1]
    with open(os.path.join(layout, "blobs/sha256", d)) as f:
        m = json.load(f)
    return sum(l["size"] for l in m["layers"])


def manifest_layer_bytes(ref):
    """The summed layer sizes of the manifest `ref` (REG/repo:tag) names."""
    import urllib.request
    repo, tag = ref[len(REG) + 1:].rsplit(":", 1)
    accept = ("application/vnd.oci.image.manifest.v1+json, "
              "application/vnd.docker.distribution.manifest.v2+json, "
              "application/vnd.oci.image.index.v1+json, "
              "application/vnd.docker.distribution.manifest.list.v2+json")
    while True:
        req = urllib.request.Request(f"http://{REG}/v2/{repo}/manifests/{tag}",
                                     headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=30) as r:
            m = json.load(r)
        if "layers" in m:
            return sum(l["size"] for l in m["layers"])
        tag = m["manifests"][0]["digest"]  # an index: its first manifest


def have_manifest(ref):
    try:
        manifest_layer_bytes(ref)
        return True
    except OSError:
        return False


def prepare(imgs, variants, stargz):
    """Pushes each image in the forms `variants` need (OCI always; obd and
    obd + trace; the eStargz forms); returns {image: {"refs", "record",
    per-form layer bytes, conversion seconds}}."""
    refs = {}
    node = Node("prep", obd=True, stargz=stargz)
    try:
        for name, layout in imgs.items():
            tags = ("oci", "obd", "obd-trace", "obd-trace-nowarm") + STARGZ_VARIANTS
            r = {k: f"{REG}/bench/{name}:{k}" for k in tags}
            for v, t in REF_TAG.items():
                r[v] = r[t]
            traced = any(v.startswith("obd-trace") for v in variants)
            info = {"refs": r, "oci_layer_bytes": layout_bytes(layout), "layer_bytes": {},
                    "prep_s": {}}
            sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
               f"oci:{layout}:bench", f"docker://{r['oci']}")
            if any(v.startswith("obd") for v in variants):
                t0 = time.time()
                sh(OBD, "convert", "--plain-http", REG, *OBD_CONVERT_ARGS,
                   f"oci:{layout}:bench", f"docker://{r['obd']}")
                info["prep_s"]["obd convert"] = time.time() - t0
                info["layer_bytes"]["obd"] = manifest_layer_bytes(r["obd"])
            if traced:
                info["record"] = json.loads(sh(
                    OBD, "trace", "record", "--plain-http", REG, "--json", "--address", node.sock,
                    "--cache-dir", os.path.join(node.snroot, "cache"),
                    "--time", str(RECORD_TIME), r["obd"], r["obd-trace"]).strip().splitlines()[-1])
            if "obd-trace-nowarm" in variants:
                info["record_nowarm"] = json.loads(sh(
                    OBD, "trace", "record", "--plain-http", REG, "--json", "--address", node.sock,
                    "--cache-dir", os.path.join(node.snroot, "cache"), "--no-warm",
                    "--time", str(RECORD_TIME), r["obd"],
                    r["obd-trace-nowarm"]).strip().splitlines()[-1])
            if stargz:
                sh(*node.ctr("images", "pull", "--plain-http", r["oci"]))
                for v in STARGZ_VARIANTS:
                    if v not in variants:
                        continue
                    if REUSE and have_manifest(r[v]):
                        info["layer_bytes"][v] = manifest_layer_bytes(r[v])
                        continue
                    t0 = time.time()
                    if v == "estargz":
                        sh("ctr-remote", "--address", node.sock, "image", "convert",
                           "--estargz", "--oci", r["oci"], r[v])
                    else:
                        sh("ctr-remote", "--address", node.sock, "image", "optimize", "--oci",
                           "--period", str(RECORD_TIME),
                           *(["--zstdchunked"] if v == "zstdchunked" else []), r["oci"], r[v])
                    info["prep_s"][v] = time.time() - t0
                    sh(*node.ctr("images", "push", "--plain-http", r[v]))
                    info["layer_bytes"][v] = manifest_layer_bytes(r[v])
            refs[name] = info
    finally:
        node.stop()
    return refs


# --- measurement ---------------------------------------------------------

def run_until_ready(cmd):
    """Starts `cmd`; seconds until a stdout line is `ready`, and its exit."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = None
    for line in p.stdout:
        if line.strip() == "ready" and ready is None:
            ready = time.time() - t0
    err = p.stderr.read()
    rc = p.wait(RUN_TIMEOUT)
    if rc != 0 or ready is None:
        raise RuntimeError(f"{' '.join(cmd)}: exit {rc}, ready={ready}: {err[-2000:]}")
    return ready


def access_bytes(log_path, offset):
    n = 0
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    for l in text.splitlines():
        if '"GET ' not in l or "/blobs/sha256:" not in l:
            continue
        tail = l.split('"GET ', 1)[1].split('"', 1)[1].split()
        if len(tail) >= 2 and tail[0].startswith("2") and tail[1].isdigit():
            n += int(tail[1])
    return n


def measure(variant, ref, reg, tag):
    node = Node(tag, obd=variant.startswith("obd"), stargz=variant in STARGZ_VARIANTS,
                at_pull=variant != "obd-trace-late", service=OBD_SERVICE.get(variant, ""),
                snap_extra=SNAP_EXTRA.get(variant, ""))
    try:
        drop_caches()
        rx0, off = rx_bytes(), os.path.getsize(reg.log)
        t0 = time.time()
        if variant == "oci":
            sh(*node.ctr("images", "pull", "--plain-http", ref), quiet=True)
            run = node.ctr("run", "--rm", ref, f"{tag}-c1")
        elif variant in STARGZ_VARIANTS:
            sh("ctr-remote", "--address", node.sock, "image", "rpull", "--plain-http",
               "--snapshotter", "stargz", ref, quiet=True)
            run = node.ctr("run", "--rm", "--snapshotter", "stargz", ref, f"{tag}-c1")
        else:
            # The snapshotter's config, as /etc/obd/snapshotter.toml would give
            # it: the pull's check that devices can read the blobs uses it.
            sh(OBD, "pull", "--plain-http", REG, "--address", node.sock,
               "--snapshotter-config", node.snap_toml, ref, quiet=True)
            run = node.ctr("run", "--rm", "--snapshotter", "obd", ref, f"{tag}-c1")
        pull = time.time() - t0
        ready = run_until_ready(run)
        # Up to the `ready` line, as the warm starts are timed: not the
        # app's exit and `ctr run --rm`'s teardown after it.
        cold = pull + ready
        if TIMELINE and variant.startswith("obd"):
            keep_timeline(node, tag, t0, pull, cold)
        fetched_rx = rx_bytes() - rx0
        fetched_log = access_bytes(reg.log, off)
        warm = run_until_ready([*run[:-1], f"{tag}-c2"])
        # The image's data is on the node now; drop the page cache as before
        # the cold run: what is left of the cold start without the network.
        drop_caches()
        warm_dropped = run_until_ready([*run[:-1], f"{tag}-c3"])
        if TIMELINE and variant.startswith("obd"):
            # The snapshotter's log through the warm starts too.
            shutil.copy(os.path.join(node.dir, "obd.log"),
                        os.path.join(TIMELINE, f"{tag}-obd-all.log"))
        return {"pull_s": pull, "run_to_ready_s": ready, "cold_s": cold, "warm_s": warm,
                "warm_dropped_s": warm_dropped,
                "rx_bytes": fetched_rx, "blob_bytes": fetched_log}
    finally:
        node.stop()


def keep_timeline(node, tag, t0, pull, cold):
    shutil.copy(os.path.join(node.dir, "obd.log"), os.path.join(TIMELINE, f"{tag}-obd.log"))
    # The device workers' logs (bring-up phases) of devices still attached.
    # Not a recursive walk: that would read the mounted images' trees.
    with open(os.path.join(TIMELINE, f"{tag}-workers.log"), "w") as out:
        for log in sorted(glob.glob(os.path.join(node.snroot, "devices", "*", "worker.log"))):
            try:
                with open(log, errors="replace") as f:
                    out.write(f.read())
            except FileNotFoundError:
                pass  # its device was detached meanwhile
    with open(os.path.join(TIMELINE, f"{tag}.json"), "w") as f:
        json.dump({"t0_us": int(t0 * 1e6), "pull_end_us": int((t0 + pull) * 1e6),
                   "ready_us": int((t0 + cold) * 1e6)}, f)


def summary(xs):
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return {"median": statistics.median(xs), "p90": p90, "n": len(xs)}


def main():
    if os.geteuid() != 0:
        sys.exit("bench/coldstart: needs root (netns, tc, containerd, mounts)")
    for t in ["containerd", "ctr", "runc", "docker-registry", "skopeo", "ip", "tc"]:
        if not have(t):
            sys.exit(f"bench/coldstart: {t} is not installed")
    want = [v for v in VARIANTS if v in STARGZ_VARIANTS]
    stargz = bool(want) and os.access(STARGZ, os.X_OK) and have("ctr-remote")
    variants = [v for v in VARIANTS if v not in STARGZ_VARIANTS or stargz]
    skipped = [] if stargz else [
        {"variant": v, "why": f"no containerd-stargz-grpc at {STARGZ} (Debian's "
         "stargz-snapshotter package ships only ctr-remote; coldstart.sh builds it from "
         "golang-github-containerd-stargz-snapshotter-dev) or no ctr-remote"} for v in want]
    for s in skipped:
        log("SKIPPED", s["variant"] + ":", s["why"])
    os.makedirs(DIR, exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    with open("/proc/loadavg") as f:
        load_start = f.read().split()[:3]
    imgs = build_images()
    net_up()
    reg = Registry()
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "load_at_start": load_start, "reps": REPS, "links": LINKS,
               "cpus": os.cpu_count(), "kernel": os.uname().release,
               "skipped": skipped, "images": {}, "runs": [],
               "obd": {"convert_args": OBD_CONVERT_ARGS, "service_alt": OBD_ALT,
                       "version": sh(OBD, "--version", quiet=True).strip()}}
    try:
        shape(None)
        prep = prepare(imgs, variants, stargz)
        results["images"] = prep
        for link in LINKS:
            shape(link)
            for name in imgs:
                # Variants interleaved within each repetition: drift of the
                # machine over the run weighs on all of them alike.
                for rep in range(REPS):
                    for variant in variants:
                        ref = prep[name]["refs"][variant]
                        log(f"{link} {name} {variant} rep {rep + 1}/{REPS}")
                        m = measure(variant, ref, reg, f"obdbench-{link}-{name}-{variant}-{rep}")
                        m.update(link=link, image=name, variant=variant, rep=rep)
                        log(json.dumps(m))
                        results["runs"].append(m)
                        with open(os.path.join(OUT, NAME + ".json"), "w") as f:
                            json.dump(results, f, indent=1)
    finally:
        shape(None)
        reg.stop()
        net_down()
    with open("/proc/loadavg") as f:
        results["load_at_end"] = f.read().split()[:3]
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["summary"] = summarize(results)
    with open(os.path.join(OUT, NAME + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    log("wrote", os.path.join(OUT, NAME + ".json"))


def summarize(results):
    out = {}
    for r in results["runs"]:
        k = f"{r['link']}/{r['image']}/{r['variant']}"
        out.setdefault(k, []).append(r)
    s = {}
    for k, rs in out.items():
        s[k] = {f: summary([r[f] for r in rs])
                for f in ("pull_s", "run_to_ready_s", "cold_s", "warm_s", "warm_dropped_s",
                          "rx_bytes", "blob_bytes")
                if all(f in r for r in rs)}
    return s


if __name__ == "__main__":
    main()
