#!/bin/bash
# Runs INSIDE the qemu guest started by scripts/tcmu-guest-test.sh, as root: loads the LIO/TCMU/tcm_loop modules and
# runs the ignored tcmu_guest tests of the host-built test binary $TCMU_TEST_BIN (filter $TCMU_TEST_FILTER).
# Exit status: the test binary's.
set -u
echo "guest kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime) s, $(nproc) CPUs"
for m in configfs target_core_mod target_core_user tcm_loop sd_mod ext4; do
  modprobe "$m" || echo "modprobe $m FAILED"
done
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
BIN=${TCMU_TEST_BIN:?TCMU_TEST_BIN is not set}
[ -x "$BIN" ] || { echo "test binary $BIN is not executable in the guest"; exit 2; }
t0=$(date +%s%N)
RUST_BACKTRACE=1 "$BIN" --ignored --test-threads=1 --nocapture "${TCMU_TEST_FILTER:-tcmu_guest}"
rc=$?
t1=$(date +%s%N)
echo "tcmu guest tests: rc=$rc in $(( (t1-t0)/1000000 )) ms"
echo "--- configfs after the tests: core: $(ls /sys/kernel/config/target/core 2>&1 | tr '\n' ' ')" \
  "loopback: $(ls /sys/kernel/config/target/loopback 2>&1 | tr '\n' ' ') uio: $(ls /sys/class/uio 2>&1 | tr '\n' ' ')"
echo "--- kernel messages: $(dmesg | grep -ciE 'I/O error|error,') I/O error lines (the cleanup test may cause some);" \
  "TCMU/tcm_loop warnings:"
dmesg | grep -iE 'tcmu|tcm_loop|ring is broken|Unable' | grep -v 'TCM_Loopback' | tail -${DMESG_LINES:-40}
if [ "$rc" != 0 ]; then echo "--- dmesg tail:"; dmesg | tail -60; fi
exit "$rc"
