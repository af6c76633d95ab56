#!/usr/bin/env python3
"""Test images for bench/coldstart.sh, as OCI layouts with gzip layers.

usage:
  mkimage.py large SRC_LAYOUT SRC_TAG OUT PAD_MB   # SRC + a layer of PAD_MB
                                                   # of data the app never reads
  mkimage.py small OUT                              # busybox + /app/run.sh

Both print `ready` when started. Deterministic: fixed mtimes, uid/gid 0,
seeded data, gzip without names or timestamps. Tag: `bench`.
"""
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile

EPOCH = 1700000000
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def put(blobs, data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)


def info(name, size=0, mode=0o644, kind=tarfile.REGTYPE, link=""):
    t = tarfile.TarInfo(name)
    t.size, t.mode, t.type, t.linkname = size, mode, kind, link
    t.mtime, t.uid, t.gid = EPOCH, 0, 0
    return t


def gz_layer(blobs, build):
    """build(tarfile) fills the tar; returns (descriptor, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        build(t)
    tar = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as z:
        z.write(tar)
    d, n = put(blobs, out.getvalue())
    return {"mediaType": LAYER, "digest": d, "size": n}, diff_id


def write_layout(out, blobs, layers, diff_ids, config_body, history):
    config = {"architecture": "amd64", "os": "linux", "config": config_body,
              "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": history}
    cd, cs = put(blobs, json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cd, "size": cs},
                "layers": layers}
    md, ms = put(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    return md


def fresh(out):
    shutil.rmtree(out, ignore_errors=True)
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs)
    return blobs


def load(layout, tag):
    def blob(d):
        with open(os.path.join(layout, "blobs", "sha256", d.split(":", 1)[1]), "rb") as f:
            return f.read()
    with open(os.path.join(layout, "index.json")) as f:
        idx = json.load(f)
    m = next(x for x in idx["manifests"]
             if x.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    man = json.loads(blob(m["digest"]))
    cfg = json.loads(blob(man["config"]["digest"]))
    return man, cfg, blob


def large(src, tag, out, pad_mb):
    """The source image with a data layer under /opt/data inserted below the
    app layer: text-like files (base64 of seeded random bytes, gzip ~75%),
    which the app never opens, as a big image's unused libraries would be."""
    man, cfg, blob = load(src, tag)
    blobs = fresh(out)
    layers, diff_ids = [], []
    for l, d in zip(man["layers"], cfg["rootfs"]["diff_ids"]):
        put(blobs, blob(l["digest"]))
        layers.append({"mediaType": l["mediaType"], "digest": l["digest"], "size": l["size"]})
        diff_ids.append(d)
    rng = random.Random(7)
    import base64

    def build(t):
        t.addfile(info("opt", mode=0o755, kind=tarfile.DIRTYPE))
        t.addfile(info("opt/data", mode=0o755, kind=tarfile.DIRTYPE))
        chunk = 8 << 20
        for i in range((pad_mb << 20) // chunk):
            body = base64.b64encode(rng.randbytes(chunk * 3 // 4))[:chunk]
            t.addfile(info(f"opt/data/part-{i:03}", len(body)), io.BytesIO(body))
    desc, did = gz_layer(blobs, build)
    layers.insert(len(layers) - 1, desc)
    diff_ids.insert(len(diff_ids) - 1, did)
    hist = [h for h in cfg.get("history", [])]
    hist.insert(max(len(hist) - 1, 0), {"created_by": f"bench: {pad_mb} MiB of unused data"})
    write_layout(out, blobs, layers, diff_ids, cfg["config"], hist)


def small(out):
    blobs = fresh(out)
    with open("/bin/busybox", "rb") as f:
        bb = f.read()

    def base(t):
        for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"]:
            t.addfile(info(d, mode=0o755, kind=tarfile.DIRTYPE))
        t.addfile(info("bin/busybox", len(bb), 0o755), io.BytesIO(bb))
        for a in ["sh", "cat", "echo", "ls", "sleep"]:
            t.addfile(info(f"bin/{a}", mode=0o777, kind=tarfile.SYMTYPE, link="busybox"))
        pw = b"root:x:0:0:root:/root:/bin/sh\n"
        t.addfile(info("etc/passwd", len(pw)), io.BytesIO(pw))

    def app(t):
        t.addfile(info("app", mode=0o755, kind=tarfile.DIRTYPE))
        s = b"#!/bin/sh\nls /bin >/dev/null\necho ready\n"
        t.addfile(info("app/run.sh", len(s), 0o755), io.BytesIO(s))
    l0, d0 = gz_layer(blobs, base)
    l1, d1 = gz_layer(blobs, app)
    write_layout(out, blobs, [l0, l1], [d0, d1],
                 {"Cmd": ["/app/run.sh"], "Env": ["PATH=/bin"]},
                 [{"created_by": "bench: busybox"}, {"created_by": "bench: app"}])


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "large":
        large(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif len(sys.argv) == 3 and sys.argv[1] == "small":
        small(sys.argv[2])
    else:
        sys.exit(__doc__)
