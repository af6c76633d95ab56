#!/usr/bin/env bash
# The containerd versions obd is tested against, each unpacked privately (scripts/debian-pkgs.sh) and never installed.
#
#   scripts/containerd-matrix.sh fetch VERSION     unpack containerd VERSION; print its prefix (PREFIX/usr/bin/containerd)
#   scripts/containerd-matrix.sh src VERSION       also unpack that version's Go source and its Go dependencies
#                                                  (golang-github-containerd-containerd-dev); print PREFIX/usr/share/gocode
#   scripts/containerd-matrix.sh env VERSION       print `export OBD_CONTAINERD_PREFIX=...` for eval: the test fixture
#                                                  (fixtures::containerd), the testbed and `obd demo` then run that version
#   scripts/containerd-matrix.sh versions          print the versions of the matrix
#
# VERSION is 1.6 (the system's: Debian 12 package, prefix /), 1.7 (Debian 13 "trixie") or 2.1 (Debian unstable "sid").
# Prefixes live under ${OBD_PKGS:-/opt/obd-pkgs}/containerd-VERSION. The unpacked binary must report VERSION: when a
# suite moves on (sid to 2.2, say) the script fails rather than test another version under the old name.
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "$0")" && pwd)
root=${OBD_PKGS:-/opt/obd-pkgs}

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
cmd=$1
[ "$cmd" = versions ] && { echo "1.6 1.7 2.1"; exit 0; }
[ $# -eq 2 ] || usage
ver=$2

case $ver in
  1.6) suite= ;;
  1.7) suite=trixie ;;
  2.1) suite=sid ;;
  *) echo "containerd-matrix: unknown version '$ver' (known: 1.6 1.7 2.1)" >&2; exit 2 ;;
esac

# Unpack PKG... into the version's prefix; print the prefix.
fetch() {
  if [ -z "$suite" ]; then
    command -v containerd >/dev/null || { echo "containerd-matrix: no system containerd (run scripts/setup.sh)" >&2; exit 1; }
    echo /
    return
  fi
  local prefix=$root/containerd-$ver
  bash "$here/debian-pkgs.sh" "$suite" "$prefix" "$@" >/dev/null ||
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
    if [ "$prefix" = / ]; then echo "unset OBD_CONTAINERD_PREFIX"; else echo "export OBD_CONTAINERD_PREFIX=$prefix"; fi ;;
  src)
    if [ -z "$suite" ]; then
      dpkg -s golang-github-containerd-containerd-dev >/dev/null 2>&1 ||
        { echo "containerd-matrix: golang-github-containerd-containerd-dev is not installed (scripts/setup.sh)" >&2; exit 1; }
      echo /usr/share/gocode
    else
      prefix=$(fetch containerd golang-github-containerd-containerd-dev)
      echo "$prefix/usr/share/gocode"
    fi ;;
  *) usage ;;
esac
