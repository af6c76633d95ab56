#!/bin/bash
# FUSE + loop vs a plain loop device on the same ext4 image, with fio (root only).
# Usage: fuse_bench.sh [DIR] — DIR (default /tmp/fusebench) holds the 512 MiB image.
# Env: MODES (default "dio pc"), THREADS (default 8), RUNTIME (seconds per fio job, default 8),
#      DROP=1 to drop the page cache before every job (default: warm cache, pure overhead).
set -euo pipefail
D=${1:-/tmp/fusebench}; mkdir -p "$D"
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
IMG=$D/ext4.img; MB=512
if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" != $((MB<<20)) ]; then
  rm -rf "$D/src"; mkdir -p "$D/src"
  for i in $(seq 1 $((MB/2))); do head -c 1048576 /dev/urandom > "$D/src/f$i"; done
  (cd "$D/src" && sha256sum f* > "$D/sums")
  mkfs.ext4 -q -F -d "$D/src" "$IMG" "${MB}M"; rm -rf "$D/src"
fi
(cd "$ROOT" && cargo build -q --release -p tcmu-target --example fuse_serve)
SERVE=$ROOT/target/release/examples/fuse_serve
RT=${RUNTIME:-8}
drop() { if [ "${DROP:-0}" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi; }
job() { # label dev name fio-args...
  local label=$1 dev=$2 name=$3; shift 3; drop
  timeout 120 fio --name=r --filename="$dev" --readonly --direct=1 --runtime="$RT" --time_based \
    --output-format=terse "$@" 2>/dev/null |
    awk -F';' -v l="$label" -v n="$name" '{printf "%-28s %-14s %8d IOPS %8.1f MiB/s %8.0f us\n", l, n, $8, $7/1024, $40}'
}
bench() { # label dev
  job "$1" "$2" seq1M-QD1 --rw=read --bs=1M --ioengine=psync
  job "$1" "$2" seq1M-QD8 --rw=read --bs=1M --ioengine=libaio --iodepth=8
  job "$1" "$2" rand4k-QD1 --rw=randread --bs=4k --ioengine=psync
  job "$1" "$2" rand4k-QD32 --rw=randread --bs=4k --ioengine=libaio --iodepth=32
}
cat "$IMG" > /dev/null  # warm the image's page cache
for ldio in off on; do
  LOOP=$(losetup -f --show -r --direct-io=$ldio "$IMG")
  bench "plain-loop(dio=$ldio)" "$LOOP"; losetup -d "$LOOP"
done
for mode in ${MODES:-dio pc}; do
  for t in ${THREADS:-8}; do
    extra=(); [ "$mode" = pc ] && extra=(--page-cache)
    coproc SRV { "$SERVE" "$IMG" "$D/work" --threads "$t" "${extra[@]}"; }
    read -r line <&"${SRV[0]}"; DEV=$(awk '{print $2}' <<<"$line")
    label="fuse($mode,t=$t,$(awk '{print $3}' <<<"$line"))"
    mkdir -p "$D/m"; mount -t ext4 -o ro "$DEV" "$D/m"
    (cd "$D/m" && sha256sum -c --quiet "$D/sums") && echo "$label: checksums OK"; umount "$D/m"
    bench "$label" "$DEV"
    echo >&"${SRV[1]}"; wait "$SRV_PID"
  done
done
