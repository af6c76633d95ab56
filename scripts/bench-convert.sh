#!/usr/bin/env bash
# Conversion throughput (issue 5's benchmark): `obd convert` against
# `tar -x` into a directory plus `mke2fs -d` of the same content, in the same
# run, on the realistic python image of fixtures/scripts/make-python-image.sh.
# Throughput is MB/s (10^6 bytes) of uncompressed layer tar.
#
#   bash scripts/bench-convert.sh          # lz4 and zstd, OCI layout to layout
#   RUNS=5 bash scripts/bench-convert.sh   # best of 5 (default 3)
#
# Also measured: output size against the gzip source, peak RSS (GNU time),
# and registry to registry through docker-registry on 127.0.0.1 when it is
# installed. Prints a markdown table and, last, one JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
W=${BENCH_DIR:-/tmp/obd-bench-convert}
OBD=${OBD:-$PWD/target/release/obd}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p obd
for c in mke2fs tar python3 /usr/bin/time; do
  command -v $c >/dev/null || { echo "bench-convert: $c missing (bash scripts/setup.sh)" >&2; exit 1; }
done
SRC=$(bash fixtures/scripts/make-python-image.sh) || { echo "bench-convert: no image (apt?)" >&2; exit 1; }
rm -rf "$W"; mkdir -p "$W"

# Layer blobs of the source, bottom to top, and their sizes.
read -r MANIFEST < <(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"][7:])' "$SRC/index.json")
mapfile -t LAYERS < <(python3 -c 'import json,sys; [print(l["digest"][7:]) for l in json.load(open(sys.argv[1]))["layers"]]' "$SRC/blobs/sha256/$MANIFEST")
GZ_BYTES=0; TAR_BYTES=0
for l in "${LAYERS[@]}"; do
  GZ_BYTES=$((GZ_BYTES + $(stat -c %s "$SRC/blobs/sha256/$l")))
  TAR_BYTES=$((TAR_BYTES + $(gzip -dc "$SRC/blobs/sha256/$l" | wc -c)))
done

now() { date +%s.%N; }
best() { sort -g | head -1; }

# Baseline: tar -x of every layer into one directory, then mke2fs -d (64G, as the converter).
base_once() {
  rm -rf "$W/root" "$W/base.img"; mkdir -p "$W/root"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  local t0; t0=$(now)
  for l in "${LAYERS[@]}"; do tar -xzf "$SRC/blobs/sha256/$l" -C "$W/root"; done
  local t1; t1=$(now)
  mke2fs -q -t ext4 -d "$W/root" "$W/base.img" 64G >/dev/null 2>&1
  local t2; t2=$(now)
  echo "$(echo "$t2 - $t0" | bc -l) $(echo "$t1 - $t0" | bc -l)"
}

conv_once() { # algorithm -> seconds rss_kb out_bytes
  rm -rf "$W/out"
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f '%M' -o "$W/rss" "$OBD" convert "oci:$SRC:python" "oci:$W/out:obd" --algorithm "$1" --json > "$W/report.json"
  local secs out=0
  secs=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"])' "$W/report.json")
  for d in $(python3 -c 'import json,sys; [print(l["digest"][7:]) for l in json.load(open(sys.argv[1]))["layers"]]' "$W/report.json"); do
    out=$((out + $(stat -c %s "$W/out/blobs/sha256/$d")))
  done
  echo "$secs $(cat "$W/rss") $out"
}

reg_once() { # registry to registry, lz4
  "$OBD" convert "docker://$ADDR/src/python:v1" "docker://$ADDR/obd/python:v1" --plain-http "$ADDR" --json > "$W/reg.json"
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"])' "$W/reg.json"
}

BASE=(); for _ in $(seq "$RUNS"); do BASE+=("$(base_once)"); done
BASE_S=$(printf '%s\n' "${BASE[@]}" | sort -g | head -1)
BASE_T=${BASE_S% *}; BASE_X=${BASE_S#* }
declare -A S RSS OUT
for a in lz4 zstd; do
  R=(); for _ in $(seq "$RUNS"); do R+=("$(conv_once $a)"); done
  B=$(printf '%s\n' "${R[@]}" | sort -g | head -1)
  read -r S[$a] RSS[$a] OUT[$a] <<<"$B"
done

REG_S=""
if command -v docker-registry >/dev/null && command -v skopeo >/dev/null; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  ADDR=127.0.0.1:$PORT
  printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' "$W/registry" "$ADDR" > "$W/registry.yml"
  docker-registry serve "$W/registry.yml" >/dev/null 2>&1 &
  REG_PID=$!
  trap 'kill $REG_PID 2>/dev/null || true' EXIT
  curl -s --retry 50 --retry-connrefused --retry-delay 0 -o /dev/null "http://$ADDR/v2/"
  skopeo copy --quiet --dest-tls-verify=false "oci:$SRC:python" "docker://$ADDR/src/python:v1"
  R=(); for _ in $(seq "$RUNS"); do R+=("$(reg_once)"); done
  REG_S=$(printf '%s\n' "${R[@]}" | best)
fi

mbs() { echo "scale=1; $TAR_BYTES / 1000000 / $1" | bc -l; }
ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
echo
echo "image: $(basename "$SRC") ${#LAYERS[@]} layers, $((TAR_BYTES / 1000)) kB of tar, $((GZ_BYTES / 1000)) kB gzip; best of $RUNS, page cache dropped"
echo
echo "| what | seconds | MB/s of layer tar | vs baseline | output / gzip source | peak RSS |"
echo "|---|---|---|---|---|---|"
printf '| baseline: tar -x (%.2fs) + mke2fs -d 64G | %.2f | %s | 1.00 | — | — |\n' "$BASE_X" "$BASE_T" "$(mbs "$BASE_T")"
for a in lz4 zstd; do
  printf '| obd convert --algorithm %s (oci→oci) | %.2f | %s | %s | %s | %d MiB |\n' "$a" "${S[$a]}" "$(mbs "${S[$a]}")" \
    "$(ratio "$(mbs "${S[$a]}")" "$(mbs "$BASE_T")")" "$(ratio "${OUT[$a]}" "$GZ_BYTES")" "$((RSS[$a] / 1024))"
done
if [ -n "$REG_S" ]; then
  printf '| obd convert lz4, registry→registry (docker-registry) | %.2f | %s | %s | — | — |\n' "$REG_S" "$(mbs "$REG_S")" "$(ratio "$(mbs "$REG_S")" "$(mbs "$BASE_T")")"
fi
printf '{"tar_bytes":%d,"gzip_bytes":%d,"baseline_s":%s,"tar_x_s":%s,"lz4_s":%s,"zstd_s":%s,"lz4_out":%d,"zstd_out":%d,"lz4_rss_kb":%d,"zstd_rss_kb":%d,"registry_s":"%s"}\n' \
  "$TAR_BYTES" "$GZ_BYTES" "$BASE_T" "$BASE_X" "${S[lz4]}" "${S[zstd]}" "${OUT[lz4]}" "${OUT[zstd]}" "${RSS[lz4]}" "${RSS[zstd]}" "$REG_S"
