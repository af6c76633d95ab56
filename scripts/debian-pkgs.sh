#!/usr/bin/env bash
# Unpack packages of another Debian release into a private prefix, without installing them.
#
#   scripts/debian-pkgs.sh [--deps REGEX] SUITE PREFIX PKG...   e.g.  scripts/debian-pkgs.sh trixie /opt/obd/trixie containerd
#
# SUITE is a Debian suite (trixie, sid, ...). Each PKG (no dependencies are followed unless --deps: name them all; with
# --deps, the packages of the PKGs' dependency closure whose names match REGEX come too, e.g. '^golang-.*-dev$' for a Go
# source package's Go dependencies) is downloaded
# through a PRIVATE apt list and unpacked with `dpkg-deb -x` into PREFIX, so PREFIX/usr/bin/containerd etc. run from
# there. The system's apt sources, package lists and installed packages are never changed. The private list copies the
# system's Debian mirrors (OBD_DEBIAN_URI replaces them) with SUITE as the suite; the lists live in
# /var/cache/obd-setup/apt-SUITE and are refreshed when older than a day. Idempotent: a package whose version is
# already unpacked in PREFIX is not fetched again (PREFIX/.pkgs lists "name version").
# Prints PREFIX on success.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
. "$(dirname "$0")/lib/apt.sh"

deps=
if [ "${1:-}" = --deps ]; then deps=$2; shift 2; fi
[ $# -ge 3 ] || { echo "usage: $0 [--deps REGEX] SUITE PREFIX PKG..." >&2; exit 2; }
suite=$1 prefix=$2
shift 2

p=/var/cache/obd-setup/apt-$suite
mkdir -p "$p/lists/partial" "$p/archives/partial" "$p/sources.list.d" "$prefix"
# Several scripts (and CI jobs) may fetch into the same lists or prefix at once: one at a time per suite.
exec 9>"$p/.lock"
flock 9
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
{
  if [ -n "${OBD_DEBIAN_URI:-}" ]; then
    printf '%s\t%s\tmain\t\n' "$OBD_DEBIAN_URI" "$codename"
  else
    apt_entries
  fi
} | awk -F'\t' -v c="$codename" -v s="$suite" '
    # Only the release archive itself (not -security: its layout differs), re-pointed at SUITE. The signed-by key of
    # the system entry is dropped: the stock keyring carries the keys of the next release.
    $2 == c && $1 !~ /security/ { line = "deb " $1 " " s " main"; if (!seen[line]++) print line }' > "$p/sources.list"
if ! [ -s "$p/sources.list" ]; then
  echo "debian-pkgs: no Debian '$codename' entry in the system's apt sources; set OBD_DEBIAN_URI" >&2
  exit 1
fi
apt=(-o Dir::Etc::sourcelist="$p/sources.list" -o Dir::Etc::sourceparts="$p/sources.list.d"
     -o Dir::State::lists="$p/lists" -o Dir::Cache::archives="$p/archives"
     -o Dir::Cache::pkgcache="$p/pkgcache.bin" -o Dir::Cache::srcpkgcache="$p/srcpkgcache.bin"
     -o APT::Sandbox::User=root -o Dir::State::status=/dev/null -o APT::Architecture="$(dpkg --print-architecture)")
if [ -z "$(find "$p/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit)" ]; then
  echo "debian-pkgs: updating the private $suite package lists ($p)" >&2
  timeout 900 apt-get "${apt[@]}" update -qq >&2
fi

if [ -n "$deps" ]; then
  mapfile -t closure < <(apt-cache "${apt[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances "$@" 2>/dev/null | awk '/^[^ <]/ { print $1 }' | grep -E -- "$deps" | sort -u)
  set -- "$@" "${closure[@]}"
  set -- $(printf '%s\n' "$@" | awk '!seen[$0]++')
fi
touch "$prefix/.pkgs"
cd "$p/archives"
# The packages whose candidate version is not unpacked yet, as "name version"; fetched in one apt-get call (a Go
# source package's closure is ~200 packages).
todo=()
for pkg in "$@"; do
  # awk reads to the end: an early exit would make apt-cache die of SIGPIPE, and pipefail + set -e end the script
  # silently.
  ver=$(apt-cache "${apt[@]}" show --no-all-versions "$pkg" 2>/dev/null | awk '/^Version:/ && v == "" { v = $2 } END { print v }')
  [ -n "$ver" ] || { echo "debian-pkgs: no package '$pkg' in $suite" >&2; exit 1; }
  grep -qxF "$pkg $ver" "$prefix/.pkgs" || todo+=("$pkg $ver")
done
if [ ${#todo[@]} -gt 0 ]; then
  echo "debian-pkgs: ${#todo[@]} package(s) from $suite -> $prefix: $(printf '%s, ' "${todo[@]}" | sed 's/, $//')" >&2
  for t in "${todo[@]}"; do rm -f "$p/archives/${t%% *}_"*.deb; done
  timeout 1800 apt-get "${apt[@]}" download -qq $(printf '%s\n' "${todo[@]}" | sed 's/ /=/') >&2
  for t in "${todo[@]}"; do
    pkg=${t%% *}
    deb=$(ls "$p/archives/${pkg}_"*.deb | head -1)
    dpkg-deb -x "$deb" "$prefix"
    rm -f "$deb"
    grep -v "^$pkg " "$prefix/.pkgs" > "$prefix/.pkgs.new" || true
    echo "$t" >> "$prefix/.pkgs.new"
    mv "$prefix/.pkgs.new" "$prefix/.pkgs"
  done
fi
echo "$prefix"
