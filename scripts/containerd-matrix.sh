#!/usr/bin/env bash
# The containerd versions obd is tested against, each unpacked privately (scripts/debian-pkgs.sh) and never installed.
#
#   scripts/containerd-matrix.sh fetch VERSION     unpack containerd VERSION; print its prefix (PREFIX/usr/bin/containerd)
#   scripts/containerd-matrix.sh src VERSION       also unpack that version's Go source with its Go dependencies
#                                                  (golang-github-containerd-containerd-dev and the golang-*-dev of its
#                                                  closure) and a Go that builds it (trixie's golang-1.24-go, in
#                                                  $OBD_PKGS/go-1.24); print PREFIX/usr/share/gocode
#   scripts/containerd-matrix.sh env VERSION       print `export OBD_CONTAINERD_PREFIX=...` for eval: the test fixture
#                                                  (fixtures::containerd), the testbed and `obd demo` then run that
#                                                  version; after `src`, also OBD_CONTAINERD_GOCODE and OBD_GO for the
#                                                  conformance suite (crates/snapshotter/tests/conformance.rs)
#   scripts/containerd-matrix.sh test VERSION [--conformance]
#                                                  run the tests that start containerd against VERSION (.ci/run calls
#                                                  this for 1.7 and 2.1; 1.6 runs in the workspace tests): the
#                                                  snapshotter's containerd tests, the demo, image rm and pull paths;
#                                                  with --conformance also containerd's conformance suite built from
#                                                  VERSION's source (fetches it, ~200 Go packages, the first time)
#   scripts/containerd-matrix.sh versions          print the versions of the matrix
#
# VERSION is 1.6 (the system's: Debian 12 package, prefix /), 1.7 (Debian 13 "trixie") or 2.1 (Debian unstable "sid").
# Prefixes live under ${OBD_PKGS:-/opt/obd-pkgs}/containerd-VERSION. The unpacked binary must report VERSION: when a
# suite moves on (sid to 2.2, say) the script fails rather than test another version under the old name.
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "$0")" && pwd)
root=${OBD_PKGS:-/opt/obd-pkgs}

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
cmd=$1
[ "$cmd" = versions ] && { echo "1.6 1.7 2.1"; exit 0; }
[ $# -eq 2 ] || { [ "$cmd" = test ] && [ $# -eq 3 ] && [ "$3" = --conformance ]; } || usage
ver=$2

case $ver in
  1.6) suite= ;;
  1.7) suite=trixie ;;
  2.1) suite=sid ;;
  *) echo "containerd-matrix: unknown version '$ver' (known: 1.6 1.7 2.1)" >&2; exit 2 ;;
esac

go_prefix=$root/go-1.24
go_bin=$go_prefix/usr/lib/go-1.24/bin/go

# Unpack PKG... into the version's prefix (DEPS, if set, as debian-pkgs.sh --deps); print the prefix.
fetch() {
  if [ -z "$suite" ]; then
    command -v containerd >/dev/null || { echo "containerd-matrix: no system containerd (run scripts/setup.sh)" >&2; exit 1; }
    echo /
    return
  fi
  local prefix=$root/containerd-$ver
  bash "$here/debian-pkgs.sh" ${DEPS:+--deps "$DEPS"} "$suite" "$prefix" "$@" >/dev/null ||
    { echo "containerd-matrix: fetching $* ($suite) into $prefix failed" >&2; exit 1; }
  echo "$prefix"
}

check_version() {
  local bin=$1/usr/bin/containerd got
  got=$("$bin" --version | awk '{ print $3 }')
  case $got in
    "$ver".*|v"$ver".*) ;;
    *) echo "containerd-matrix: $bin is containerd $got, not $ver (has the Debian suite '$suite' moved on?)" >&2; exit 1 ;;
  esac
}

case $cmd in
  fetch)
    prefix=$(fetch containerd)
    check_version "$prefix"
    echo "$prefix" ;;
  env)
    prefix=$(fetch containerd)
    check_version "$prefix"
    if [ "$prefix" = / ]; then
      echo "unset OBD_CONTAINERD_PREFIX OBD_CONTAINERD_GOCODE OBD_GO"
    else
      echo "export OBD_CONTAINERD_PREFIX=$prefix"
      if grep -q '^golang-github-containerd-containerd-dev ' "$prefix/.pkgs" && [ -x "$go_bin" ]; then
        echo "export OBD_CONTAINERD_GOCODE=$prefix/usr/share/gocode OBD_GO=$go_bin"
      else
        echo "unset OBD_CONTAINERD_GOCODE OBD_GO"
      fi
    fi ;;
  src)
    if [ -z "$suite" ]; then
      dpkg -s golang-github-containerd-containerd-dev >/dev/null 2>&1 ||
        { echo "containerd-matrix: golang-github-containerd-containerd-dev is not installed (scripts/setup.sh)" >&2; exit 1; }
      echo /usr/share/gocode
    else
      prefix=$(DEPS='^golang-.*-dev$' fetch containerd golang-github-containerd-containerd-dev)
      # Debian 12's Go (1.19) is too old for these sources; the Go of trixie builds 1.7 and 2.1.
      bash "$here/debian-pkgs.sh" trixie "$go_prefix" golang-1.24-go golang-1.24-src >/dev/null ||
        { echo "containerd-matrix: fetching Go 1.24 into $go_prefix failed" >&2; exit 1; }
      echo "$prefix/usr/share/gocode"
    fi ;;
  test)
    conformance=${3:-}
    [ -z "$conformance" ] || "$0" src "$ver" >/dev/null
    eval "$("$0" env "$ver")"
    cd "$here/.."
    locked=(--locked)
    [ -f Cargo.lock ] || locked=()
    tests=(--test containerd --test containerd_config --test full_disk --test pull --test cri)
    [ -z "$conformance" ] || tests+=(--test conformance)
    echo "containerd-matrix: containerd $ver (${OBD_CONTAINERD_PREFIX:-system})" >&2
    cargo test "${locked[@]}" -p snapshotter "${tests[@]}"
    cargo test "${locked[@]}" -p obd --test demo --test image_rm --test pull_paths ;;
  *) usage ;;
esac
