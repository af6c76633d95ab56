#!/usr/bin/env bash
# fio on an obd device against the same flat ext4 image on a plain loop device,
# in one run (issue 4's benchmark). As root; needs fio, fuse3, e2fsprogs.
#
#   bash scripts/bench-device.sh            # FUSE + loop frontend, 512 MiB image
#   IMG_MB=1024 RUNTIME=10 bash scripts/bench-device.sh
#   LAYER=raw bash scripts/bench-device.sh  # an uncompressed LSMT layer instead of ZFile lz4
#
# The image: an ext4 filesystem half full of 1 MiB files (half random, half
# base64 text), stored as one ZFile lz4 (4 KiB blocks) layer, as a converted
# image would be. Each measurement starts with the page cache dropped.
# Prints a table and, last, one JSON line with every figure and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
MB=${IMG_MB:-512}
RUNTIME=${RUNTIME:-8}
FRONTEND=${FRONTEND:-fuse}
W=${BENCH_DIR:-/tmp/obd-bench-device}
OBD=${OBD:-$PWD/target/release/obd}
[ "$(id -u)" = 0 ] || { echo "bench-device: needs root" >&2; exit 1; }
for c in fio mkfs.ext4 losetup fusermount3; do
  command -v $c >/dev/null || { echo "bench-device: $c missing (bash scripts/setup.sh)" >&2; exit 1; }
done
[ -x "$OBD" ] || cargo build --release -q -p obd

mkdir -p "$W"
IMG=$W/flat-$MB.img
if [ ! -f "$IMG" ]; then
  rm -rf "$W/src"; mkdir -p "$W/src"
  for i in $(seq 1 $((MB / 4))); do
    head -c 1048576 /dev/urandom > "$W/src/r$i"
    head -c 786432 /dev/urandom | base64 -w 100 > "$W/src/t$i"
  done
  mkfs.ext4 -q -F -d "$W/src" "$IMG" "${MB}M"
  rm -rf "$W/src"
fi
KIND=${LAYER:-zfile}
case $KIND in zfile) ZF=--zfile ;; raw) ZF= ;; *) echo "LAYER must be zfile or raw" >&2; exit 1 ;; esac
LAYER=$W/layer-$MB.$KIND
if [ ! -f "$LAYER" ]; then
  rm -f "$W/rw.data" "$W/rw.index"
  "$OBD" layer create --vsize "${MB}M" "$W/rw.data" "$W/rw.index"
  "$OBD" layer write --offset 0 "$W/rw.data" "$W/rw.index" "$IMG"
  "$OBD" layer commit $ZF "$W/rw.data" "$W/rw.index" "$LAYER"
  rm -f "$W/rw.data" "$W/rw.index"
fi
printf '{"lowers":[{"file":"%s"}]}\n' "$LAYER" > "$W/config.v1.json"

ROOT=$W/root; SVC=""; PLAIN=""; OBDDEV=""
cleanup() {
  [ -n "$OBDDEV" ] && "$OBD" device detach --root "$ROOT" bench >/dev/null 2>&1 || true
  [ -n "$PLAIN" ] && losetup -d "$PLAIN" 2>/dev/null || true
  [ -n "$SVC" ] && kill "$SVC" 2>/dev/null && wait "$SVC" 2>/dev/null || true
}
trap cleanup EXIT
rm -rf "$ROOT"; mkdir -p "$ROOT"
"$OBD" device serve --root "$ROOT" 2> "$W/service.log" & SVC=$!
for _ in $(seq 200); do [ -S "$ROOT/obd.sock" ] && break; sleep 0.05; done
OBDDEV=$("$OBD" device attach --root "$ROOT" --id bench --frontend "$FRONTEND" --config "$W/config.v1.json" | tail -1)
PLAIN=$(losetup -f --show -r --direct-io=on "$IMG")

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# fio terse v3: field 7 = read bandwidth KiB/s, field 8 = read IOPS
fio_run() { # dev rw bs engine depth
  drop
  timeout $((RUNTIME + 60)) fio --name=b --readonly --filename="$1" --rw="$2" --bs="$3" --ioengine="$4" \
    --iodepth="$5" --direct=1 --runtime="$RUNTIME" --time_based --output-format=terse 2>/dev/null \
    | awk -F';' '{print $7, $8}'
}
declare -A R
for dev in plain obd; do
  d=$PLAIN; [ $dev = obd ] && d=$OBDDEV
  read -r bw _ < <(fio_run "$d" read 1M libaio 4)
  R[$dev.seq]=$((bw / 1024))
  read -r _ iops < <(fio_run "$d" randread 4k psync 1)
  R[$dev.qd1]=$iops
  read -r _ iops < <(fio_run "$d" randread 4k libaio 32)
  R[$dev.qd32]=$iops
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", (b>0)?a/b:0}'; }
echo
echo "| measurement ($MB MiB ext4, $FRONTEND frontend, $KIND layer) | obd | plain loop | ratio |"
echo "|---|---|---|---|"
echo "| sequential 1 MiB O_DIRECT read (MiB/s) | ${R[obd.seq]} | ${R[plain.seq]} | $(ratio ${R[obd.seq]} ${R[plain.seq]}) |"
echo "| random 4 KiB read QD1 (IOPS) | ${R[obd.qd1]} | ${R[plain.qd1]} | $(ratio ${R[obd.qd1]} ${R[plain.qd1]}) |"
echo "| random 4 KiB read QD32 (IOPS) | ${R[obd.qd32]} | ${R[plain.qd32]} | $(ratio ${R[obd.qd32]} ${R[plain.qd32]}) |"
printf '{"frontend":"%s","layer":"'"$KIND"'","image_mib":%s,"seq_mib_s":{"obd":%s,"plain":%s,"ratio":%s},"randread_qd1_iops":{"obd":%s,"plain":%s,"ratio":%s},"randread_qd32_iops":{"obd":%s,"plain":%s,"ratio":%s},"goals":{"seq":0.7,"qd32":0.5}}\n' \
  "$FRONTEND" "$MB" "${R[obd.seq]}" "${R[plain.seq]}" "$(ratio ${R[obd.seq]} ${R[plain.seq]})" \
  "${R[obd.qd1]}" "${R[plain.qd1]}" "$(ratio ${R[obd.qd1]} ${R[plain.qd1]})" \
  "${R[obd.qd32]}" "${R[plain.qd32]}" "$(ratio ${R[obd.qd32]} ${R[plain.qd32]})"
