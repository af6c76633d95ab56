#!/bin/sh
# Builds an OCI image layout from host directories, one gzip layer per
# argument, with GNU tar (for benchmarks and manual checks of `obd convert`).
#   make-oci-image.sh <layout-dir> <tag> <abs-dir>...
# Example: make-oci-image.sh /tmp/py v1 /usr/lib/python3.11 /usr/share/doc /usr/bin
set -eu
out=$1; tag=$2; shift 2
mkdir -p "$out/blobs/sha256"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
: > "$tmp/layers"
for d in "$@"; do
    rel=${d#/}
    tar -C / --numeric-owner --sort=name --xattrs --xattrs-include='*' -cf "$tmp/l.tar" "$rel"
    diff=$(sha256sum < "$tmp/l.tar" | cut -d' ' -f1)
    gzip -1 -n -c "$tmp/l.tar" > "$tmp/l.tgz"
    dg=$(sha256sum < "$tmp/l.tgz" | cut -d' ' -f1)
    mv "$tmp/l.tgz" "$out/blobs/sha256/$dg"
    echo "$diff $dg $(stat -c %s "$out/blobs/sha256/$dg")" >> "$tmp/layers"
done
python3 - "$out" "$tag" "$tmp/layers" <<'PY'
import hashlib, json, os, sys
out, tag, lf = sys.argv[1:4]
layers = [l.split() for l in open(lf)]
def put(b):
    d = hashlib.sha256(b).hexdigest()
    open(os.path.join(out, "blobs/sha256", d), "wb").write(b)
    return "sha256:" + d
cfg = json.dumps({"architecture": "amd64", "os": "linux",
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + l[0] for l in layers]},
    "history": [{"created_by": "make-oci-image.sh"} for _ in layers]}).encode()
cd = put(cfg)
man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(cfg)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + l[1],
                "size": int(l[2])} for l in layers]}).encode()
md = put(man)
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": md, "size": len(man), "annotations": {"org.opencontainers.image.ref.name": tag}}]},
    open(os.path.join(out, "index.json"), "w"))
PY
