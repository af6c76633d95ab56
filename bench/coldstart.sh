#!/usr/bin/env bash
# Cold-start benchmark: OCI vs eStargz (plain, optimized, zstd:chunked) vs
# obd lazy vs obd + trace prefetch, obd with its defaults. Builds the release
# binaries, the test images, a shaped link to a registry in a network
# namespace, and measures; then writes bench/results/ (coldstart.json,
# coldstart.md, coldstart.png). See docs/BENCHMARKS.md ("Issue 7: cold
# start", "Issue 18") and the settings at the top of bench/coldstart.py.
# Needs root. A reduced run, for example:
#   BENCH_REPS=1 BENCH_LINKS=100mbit BENCH_IMAGES=java bench/coldstart.sh
# BENCH_NO_BUILD=1 skips `cargo build --release`; BENCH_NO_APT=1 skips
# installing the missing Debian packages (the eStargz variants and the plot
# are then skipped if their tools are missing).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
dir=${BENCH_DIR:-/tmp/obd-coldstart}
if [[ $(id -u) != 0 ]]; then
  echo "bench/coldstart.sh: needs root (netns, tc, containerd, mounts)" >&2
  exit 1
fi
# Python with Debian's packages (matplotlib): /usr/bin/python3 when there.
py=python3
[[ -x /usr/bin/python3 ]] && py=/usr/bin/python3

need=()
command -v ctr-remote >/dev/null || need+=(stargz-snapshotter)
[[ -d /usr/share/gocode/src/github.com/containerd/stargz-snapshotter/service ]] ||
  need+=(golang-github-containerd-stargz-snapshotter-dev)
command -v go >/dev/null || need+=(golang-go)
$py -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
if ((${#need[@]})) && [[ -z ${BENCH_NO_APT:-} ]]; then
  echo "bench/coldstart.sh: installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2 ||
    echo "bench/coldstart.sh: apt-get install failed; going on without" >&2
fi
# containerd-stargz-grpc: Debian ships the library, not the daemon.
if [[ ! -x $dir/bin/containerd-stargz-grpc && -z ${STARGZ_GRPC:-} ]]; then
  mkdir -p "$dir/bin"
  "$here/stargz-grpc/build.sh" "$dir/bin/containerd-stargz-grpc" ||
    echo "bench/coldstart.sh: could not build containerd-stargz-grpc; eStargz is skipped" >&2
fi
if [[ -z ${BENCH_NO_BUILD:-} ]]; then
  (cd "$repo" && cargo build --release -p obd -p snapshotter)
fi
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
BENCH_DIR=$dir $py "$here/coldstart.py"
$py "$here/report.py" "${BENCH_OUT:-$here/results}/${BENCH_NAME:-coldstart}.json"
