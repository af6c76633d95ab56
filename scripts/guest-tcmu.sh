#!/bin/bash
# Runs INSIDE the qemu guest started by scripts/tcmu-guest-test.sh, as root: loads the LIO/TCMU/tcm_loop modules and
# runs the suites in $SUITES (default "tcmu device"):
#   tcmu    the ignored tcmu_guest tests of the host-built test binary $TCMU_TEST_BIN (filter $TCMU_TEST_FILTER)
#   device  the device service's end-to-end tests ($DEVICE_TEST_BIN, obd's device_fuse) with OBD_TEST_FRONTEND=tcmu
#   bench   scripts/bench-device.sh ($BENCH_SCRIPT) with FRONTEND=tcmu and the release obd $OBD_RELEASE
# Exit status: 0 if every suite passed, else the first failing suite's.
set -u
echo "guest kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime) s, $(nproc) CPUs, $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) MiB"
for m in configfs target_core_mod target_core_user tcm_loop sd_mod ext4 loop fuse; do
  modprobe "$m" || echo "modprobe $m FAILED"
done
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
# devtmpfs lacks the links udev would make; bash's process substitution needs /dev/fd
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
for i in 0:stdin 1:stdout 2:stderr; do [ -e "/dev/${i#*:}" ] || ln -s "/proc/self/fd/${i%%:*}" "/dev/${i#*:}"; done
# A checkout under the host's /tmp is at /hosttmp here; the test binaries hold absolute paths (CARGO_BIN_EXE_obd, the
# fixtures), so show it at its host path too.
if [ -n "${HOST_REPO:-}" ] && [ ! -d "$HOST_REPO" ] && [ -d "/hosttmp/${HOST_REPO#/tmp/}" ]; then
  mkdir -p "$HOST_REPO" && mount --bind "/hosttmp/${HOST_REPO#/tmp/}" "$HOST_REPO"
fi
# The device tests run target/<profile>/obd: show the host's copy of it made for this run there.
if [ -n "${OBD_DEBUG_COPY:-}" ]; then
  mount --bind "$OBD_DEBUG_COPY" "$OBD_DEBUG" || echo "bind-mounting $OBD_DEBUG_COPY over $OBD_DEBUG FAILED"
fi

ms() { echo $(( $(date +%s%N) / 1000000 )); }
configfs_state() {
  echo "core: $(ls /sys/kernel/config/target/core 2>&1 | tr '\n' ' ')" \
    "loopback: $(ls /sys/kernel/config/target/loopback 2>&1 | tr '\n' ' ') uio: $(ls /sys/class/uio 2>&1 | tr '\n' ' ')"
}
final=0; summary=()
# suite NAME CMD...: runs one suite, records its status and time
suite() {
  local name=$1 t0 rc; shift
  echo; echo "=== suite $name: $*"
  t0=$(ms)
  "$@"; rc=$?
  summary+=("$name: rc=$rc in $(( $(ms) - t0 )) ms")
  echo "=== suite $name: rc=$rc in $(( $(ms) - t0 )) ms; configfs: $(configfs_state)"
  if [ "$rc" != 0 ] && [ "$final" = 0 ]; then final=$rc; fi
  return 0
}
run_bin() { # BIN [VAR=VALUE...]: runs the test binary BIN with the arguments in ARGS and RUST_BACKTRACE=1
  local bin=$1; shift
  [ -x "$bin" ] || { echo "test binary $bin is not executable in the guest"; return 2; }
  env RUST_BACKTRACE=1 "$@" "$bin" "${ARGS[@]}"
}
for s in ${SUITES:-tcmu device}; do
  case $s in
    tcmu)
      ARGS=(--ignored --test-threads=1 --nocapture "${TCMU_TEST_FILTER:-tcmu_guest}")
      suite tcmu run_bin "${TCMU_TEST_BIN:?TCMU_TEST_BIN is not set}" ;;
    device)
      ARGS=(--test-threads=1 --nocapture ${DEVICE_FILTER:+"$DEVICE_FILTER"})
      suite device run_bin "${DEVICE_TEST_BIN:?DEVICE_TEST_BIN is not set}" OBD_TEST_FRONTEND=tcmu ;;
    bench)
      suite bench env FRONTEND="${BENCH_FRONTEND:-tcmu}" IMG_MB="${BENCH_IMG_MB:-256}" RUNTIME="${BENCH_RUNTIME:-5}" \
        OBD="${OBD_RELEASE:?}" BENCH_DIR=/tmp/obd-bench-device bash "${BENCH_SCRIPT:?}" ;;
    *) echo "unknown suite $s"; final=2 ;;
  esac
done

echo
echo "--- kernel messages: $(dmesg | grep -ciE 'I/O error|error,') I/O error lines (the cleanup tests may cause some);" \
  "TCMU/tcm_loop warnings:"
dmesg | grep -iE 'tcmu|tcm_loop|ring is broken|Unable' | grep -vE 'TCM_Loopback|drop_caches|tsc: ' | tail -"${DMESG_LINES:-40}"
if [ "$final" != 0 ]; then echo "--- dmesg tail:"; dmesg | tail -60; fi
echo "--- summary:"; printf '    %s\n' "${summary[@]}"
echo "guest tests: rc=$final"
exit "$final"
