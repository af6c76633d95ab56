#!/bin/bash
# Runs the TCMU end-to-end tests against a real kernel: builds the test binaries on the host, boots Debian's 6.12
# kernel under qemu with the host's / shared read-only over virtio-9p (plus a tmpfs overlay, so the guest can write and
# the host is never written), and runs scripts/guest-tcmu.sh there as root. The suites, in this order:
#   tcmu    crates/tcmu-target/tests/tcmu_guest.rs (the frontend alone; ignored tests, run with --ignored)
#   device  crates/obd/tests/device_fuse.rs with OBD_TEST_FRONTEND=tcmu (`obd device serve|attach|detach` end to end)
#   bench   scripts/bench-device.sh with FRONTEND=tcmu (fio, obd device vs plain loop device; only with GUEST_BENCH=1)
# The host's own kernel may lack configfs/TCMU/tcm_loop; Debian's linux-image-6.12-amd64 has them as modules.
#
# Usage: sudo scripts/tcmu-guest-test.sh [test-name-filter]        (filter for the tcmu suite; default: all of it)
# Env:   OBD_ENV_DIR  cache and scratch directory (default ${TMPDIR:-/tmp}/obd-env): the unpacked kernel is cached in
#                     $OBD_ENV_DIR/vm/kernel-<package>, the last guest log is $OBD_ENV_DIR/tcmu-vm/guest.log
#        SUITES       which suites to run (default "tcmu device"); DEVICE_FILTER: test-name filter for the device suite
#        GUEST_BENCH=1  also run the fio benchmark (builds obd with --release); BENCH_IMG_MB (default 256),
#                     BENCH_RUNTIME (s per measurement, default 5), BENCH_FRONTEND (default tcmu; fuse to compare)
#        KPKG         kernel package (default linux-image-6.12-amd64)
#        ACCEL        tcg (default) | kvm;  MEM (MiB, default 2048, 3072 with the bench), SMP (default 2),
#                     VM_TIMEOUT (s, default 900)
#        CARGO_PROFILE_FLAGS  extra flags for `cargo test --no-run` (e.g. --release)
# Exit status: 0 if every suite passed; else the first failing suite's status; 99 if the guest did not report.
# Time: a first run downloads the kernel package (~107 MB); a TCG boot takes 8-12 s of wall time.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FILTER=${1:-tcmu_guest}
SUITES=${SUITES:-tcmu device}
case " $SUITES " in *" bench "*) ;; *) [ "${GUEST_BENCH:-0}" = 1 ] && SUITES="$SUITES bench" ;; esac
OBD_ENV_DIR=${OBD_ENV_DIR:-${TMPDIR:-/tmp}/obd-env}
mkdir -p "$OBD_ENV_DIR"; OBD_ENV_DIR=$(readlink -f "$OBD_ENV_DIR")
KPKG=${KPKG:-linux-image-6.12-amd64}; ACCEL=${ACCEL:-tcg}; SMP=${SMP:-2}
case " $SUITES " in *" bench "*) MEM=${MEM:-3072} ;; *) MEM=${MEM:-2048} ;; esac
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now_ms() { date +%s%3N; }
[ "$(id -u)" = 0 ] || die "run as root (qemu's 9p export of / and apt-get download need it)"

need_pkgs() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive timeout 1200 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
need_pkgs busybox-static cpio kmod xz-utils zstd e2fsprogs
command -v qemu-system-x86_64 >/dev/null ||
  die "qemu-system-x86_64 is missing: install qemu-system-x86 and qemu-utils together from bookworm-backports"
command -v python3 >/dev/null || die "python3 is missing"

T0=$(now_ms)
# ---- 1. the test binaries, built on the host (the guest runs them from the shared root)
mkdir -p "$OBD_ENV_DIR/tcmu-vm"; BUILD_LOG=$OBD_ENV_DIR/tcmu-vm/build.log; : > "$BUILD_LOG"
# build_test PACKAGE TEST: builds one integration test binary and prints its path
build_test() {
  log "building the $2 test binary (package $1)"
  local bin
  bin=$(cd "$ROOT" && cargo test -p "$1" --test "$2" --no-run ${CARGO_PROFILE_FLAGS:-} \
          --message-format=json 2>>"$BUILD_LOG" | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$2")
  [ -x "$bin" ] || { tail -30 "$BUILD_LOG" >&2; die "could not build or find the $2 test binary (see $BUILD_LOG)"; }
  log "$2: $bin"
  echo "$bin"
}
BIN=""; DEVICE_BIN=""; OBD_RELEASE=""
for s in $SUITES; do
  case $s in
    tcmu) BIN=$(build_test tcmu-target tcmu_guest) ;;
    # cargo builds the obd binary the test runs (CARGO_BIN_EXE_obd, an absolute path under target/) with it
    device) DEVICE_BIN=$(build_test obd device_fuse) ;;
    bench)
      log "building obd --release (for the benchmark)"
      (cd "$ROOT" && cargo build --release -p obd 2>>"$BUILD_LOG") || { tail -30 "$BUILD_LOG" >&2; die "cargo build --release -p obd failed"; }
      OBD_RELEASE=$ROOT/target/release/obd
      command -v fio >/dev/null || die "fio is missing (bash scripts/setup.sh)" ;;
    *) die "unknown suite $s (SUITES: tcmu device bench)" ;;
  esac
done
T1=$(now_ms)

# ---- 2. the kernel: apt-get download + dpkg -x, never installed; cached (shared with the env scripts' cache)
VM=$OBD_ENV_DIR/vm; KD=$VM/kernel-$KPKG
mkdir -p "$VM"
exec 9>"$VM/.kernel-$KPKG.lock"; flock 9
if [ ! -f "$KD/ok" ]; then
  log "fetching $KPKG"
  rm -rf "$KD"; mkdir -p "$KD/deb"
  real=$(apt-cache depends "$KPKG" | awk '/Depends: linux-image-/{print $2; exit}'); real=${real:-$KPKG}
  (cd "$KD/deb" && timeout 600 apt-get download -q "$real" 2>&1 | grep -v '^W:' >&2) || true
  if ! ls "$KD"/deb/*.deb >/dev/null 2>&1; then
    # stale package lists (the mirror dropped the version they name) or none yet: refresh once and retry
    log "apt-get update, then fetching $KPKG again"
    timeout 600 apt-get update -qq || true
    real=$(apt-cache depends "$KPKG" | awk '/Depends: linux-image-/{print $2; exit}'); real=${real:-$KPKG}
    (cd "$KD/deb" && timeout 600 apt-get download -q "$real" 2>&1 | grep -v '^W:' >&2) || true
  fi
  ls "$KD"/deb/*.deb >/dev/null 2>&1 || die "could not download $real (is the apt index current? try: apt-get update)"
  dpkg -x "$KD"/deb/*.deb "$KD/root"; rm -rf "$KD/deb"
  KV=$(ls "$KD/root/lib/modules"); MD=$KD/root/lib/modules/$KV/kernel
  # the tests never load these: drop them to save disk and depmod time
  rm -rf "$MD"/{sound,drivers/gpu,drivers/net/wireless,drivers/media,drivers/infiniband,drivers/staging,drivers/iio,drivers/hid,drivers/input,drivers/usb,drivers/bluetooth,net/bluetooth,net/wireless,net/mac80211}
  depmod -b "$KD/root" "$KV"
  touch "$KD/ok"
fi
flock -u 9
KV=$(ls "$KD/root/lib/modules"); VMLINUZ=$(ls "$KD"/root/boot/vmlinuz-*)

# ---- 3. initramfs: static busybox, the 9p and overlay modules, and an /init that switch_roots into the host's /
INITRD=$VM/initrd-$KV-obd-tcmu1.cpio.gz
if [ ! -f "$INITRD" ]; then
  IR=$(mktemp -d "$VM/initramfs.XXXXXX"); mkdir -p "$IR"/{bin,mods,proc,sys,dev,lower,rw,host}
  cp /bin/busybox "$IR/bin/"
  for a in sh mount mkdir ln insmod poweroff switch_root cat sleep echo; do ln -s busybox "$IR/bin/$a"; done
  for m in fs/netfs/netfs net/9p/9pnet net/9p/9pnet_virtio fs/9p/9p fs/overlayfs/overlay; do
    f=$(ls "$KD/root/lib/modules/$KV/kernel/$m".ko* 2>/dev/null) || continue   # some kernels build them in
    case $f in *.xz) xz -dc "$f" ;; *.zst) zstd -dc "$f" ;; *) cat "$f" ;; esac > "$IR/mods/$(basename "$m").ko"
  done
  cat > "$IR/init" <<'INIT'
#!/bin/sh
# / = overlay(lower: the host's / over 9p, read-only; upper: guest tmpfs)
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in netfs 9pnet 9pnet_virtio 9p overlay; do [ -f /mods/$m.ko ] && { insmod /mods/$m.ko || echo "insmod $m failed"; }; done
O=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o $O,ro,cache=loose hostroot /lower || { echo "GUEST-FAIL 9p mount"; poweroff -f; }
mount -t tmpfs -o size=75% tmpfs /rw; mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /host || { echo "GUEST-FAIL overlay"; poweroff -f; }
mkdir -p /host/kroot /host/share /host/run/lock /host/usr/lib/modules
mount -t 9p -o $O share /host/share; mount -t 9p -o $O,ro,cache=loose kroot /host/kroot
for k in /host/kroot/lib/modules/*; do ln -sfn /kroot/lib/modules/${k##*/} /host/usr/lib/modules/${k##*/}; done
mount --bind /proc /host/proc; mount --bind /sys /host/sys; mount --bind /dev /host/dev
mkdir -p /host/hosttmp; mount --bind /lower/tmp /host/hosttmp
mount -t tmpfs tmpfs /host/tmp
echo "GUEST-INIT-UP uptime=$(cat /proc/uptime)"
# switch_root, so that the kernel's module auto-loading finds /sbin/modprobe in the new root
exec switch_root /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb \
  /bin/bash -c 'cd /tmp; bash /share/guest.sh > /share/guest.log 2>&1; rc=$?; echo $rc > /share/rc; sync
    echo "GUEST-DONE uptime=$(cat /proc/uptime) rc=$rc"; /bin/busybox poweroff -f'
INIT
  chmod +x "$IR/init"
  (cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD.tmp"; mv "$INITRD.tmp" "$INITRD"; rm -rf "$IR"
fi
T2=$(now_ms)

# ---- 4. the guest's /share: the test script and its environment
RUN=$OBD_ENV_DIR/tcmu-vm; mkdir -p "$RUN"
SHARE=$(mktemp -d "$RUN/share.XXXXXX")
trap 'rm -rf "$SHARE"' EXIT
guest_path() { case $1 in /tmp) echo /hosttmp ;; /tmp/*) echo "/hosttmp/${1#/tmp/}" ;; *) echo "$1" ;; esac; }
cp "$ROOT/scripts/guest-tcmu.sh" "$SHARE/guest-main.sh"
# The guest runs copies of the binaries: a build on the host (another cargo command) may replace target/ files while
# the guest runs them, and the guest's 9p page cache would then mix old and new pages (seen: obd segfaulting in
# ld.so). The guest reaches the copies through the shared root; the obd binary the device tests run
# (CARGO_BIN_EXE_obd, compiled in as target/<profile>/obd) is bind-mounted over with its copy in the guest.
mkdir "$SHARE/bin"
snap() { [ -n "$1" ] || return 0; cp "$1" "$SHARE/bin/$2"; guest_path "$SHARE/bin/$2"; }
OBD_DEBUG=""; [ -n "$DEVICE_BIN" ] && OBD_DEBUG=$(dirname "$(dirname "$DEVICE_BIN")")/obd
{
  echo '#!/bin/bash'
  printf 'export SUITES=%q HOST_REPO=%q\n' "$SUITES" "$ROOT"
  printf 'export TCMU_TEST_BIN=%q TCMU_TEST_FILTER=%q\n' "$(snap "$BIN" tcmu_guest)" "$FILTER"
  printf 'export DEVICE_TEST_BIN=%q DEVICE_FILTER=%q\n' "$(snap "$DEVICE_BIN" device_fuse)" "${DEVICE_FILTER:-}"
  printf 'export OBD_DEBUG=%q OBD_DEBUG_COPY=%q\n' "$OBD_DEBUG" "$(snap "$OBD_DEBUG" obd-debug)"
  printf 'export BENCH_SCRIPT=%q OBD_RELEASE=%q BENCH_IMG_MB=%q BENCH_RUNTIME=%q BENCH_FRONTEND=%q\n' \
    "$(guest_path "$ROOT/scripts/bench-device.sh")" "$(snap "$OBD_RELEASE" obd-release)" "${BENCH_IMG_MB:-256}" \
    "${BENCH_RUNTIME:-5}" "${BENCH_FRONTEND:-tcmu}"
  echo 'exec bash /share/guest-main.sh'
} > "$SHARE/guest.sh"

case $ACCEL in
  kvm) A="-accel kvm -cpu ${CPU:-host}" ;;
  tcg) A="-accel tcg,thread=multi -cpu ${CPU:-max}" ;;
  *) die "ACCEL must be tcg or kvm" ;;
esac
fsdev() { echo "-fsdev local,id=$1,path=$2,security_model=none${3:+,$3} -device virtio-9p-pci,fsdev=$1,mount_tag=$1"; }
T3=$(now_ms)
# qemu (TCG, multi-threaded) occasionally dies on an internal assertion before the guest kernel starts: boot again then.
for try in $(seq "${BOOT_TRIES:-2}"); do
  log "booting $KV under qemu ($ACCEL), running: $SUITES (boot $try)"
  rm -f "$SHARE/rc" "$SHARE/guest.log"
  # qemu pauses (rather than exits) on a KVM emulation failure: the timeout ends such a run
  timeout "${VM_TIMEOUT:-900}" qemu-system-x86_64 $A -m "$MEM" -smp "$SMP" -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$VMLINUZ" -initrd "$INITRD" -append "console=ttyS0 panic=-1 rdinit=/init ${KAPPEND:-quiet loglevel=3}" \
    $(fsdev hostroot / readonly=on) $(fsdev share "$SHARE") $(fsdev kroot "$KD/root" readonly=on) \
    2>&1 | tee "$RUN/console.log" | sed -E 's/\x1b(\[[0-9;?]*[a-zA-Z]|c)//g; s/\r$//; s/^.*(GUEST-)/\1/' \
    | grep -E 'GUEST-|Kernel panic|qemu-system' || true
  grep -q GUEST-INIT-UP "$RUN/console.log" && break
  log "the guest never came up (see $RUN/console.log)"
done
T4=$(now_ms)
rc=$(cat "$SHARE/rc" 2>/dev/null || echo 99)
cp "$SHARE/guest.log" "$RUN/guest.log" 2>/dev/null || true
echo "--- guest output ($RUN/guest.log; serial console: $RUN/console.log)"
cat "$SHARE/guest.log" 2>/dev/null || tail -30 "$RUN/console.log"
echo "build: $((T1-T0)) ms; kernel+initramfs: $((T2-T1)) ms; qemu ($ACCEL, boot + tests + power-off): $((T4-T3)) ms; guest rc=$rc"
exit "$rc"
