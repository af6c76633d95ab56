#!/usr/bin/env bash
# One-time machine set-up for building and testing obd on Debian 12 (as root).
# Idempotent: installs only what is missing (a second run takes well under a second).
set -euo pipefail
. "$(dirname "$0")/lib/apt.sh"
export DEBIAN_FRONTEND=noninteractive

# gcc builds the vendored zstd and ring; e2fsprogs provides the ext4 oracles
# (mke2fs, e2fsck); docker-registry and apache2-utils (htpasswd) run the registry
# tests against a real registry on 127.0.0.1; fuse3 (fusermount3) and
# util-linux serve the FUSE + loop device tests; fio measures the devices.
# The TCMU tests in a qemu guest (scripts/tcmu-guest-test.sh) need busybox-static,
# cpio, kmod, xz-utils and zstd for the guest's initramfs, and qemu (below).
# The converter links libext2fs (libext2fs-dev); its tests compare with umoci and
# push through skopeo; scripts/bench-convert.sh uses bc. The snapshotter's tests
# run containerd (with ctr) and runc, and containerd's own snapshotter conformance
# suite, which needs Go and containerd's source (golang-github-containerd-containerd-dev).
pkgs=(gcc pkg-config e2fsprogs docker-registry apache2-utils curl fuse3 util-linux fio
      busybox-static cpio kmod xz-utils zstd python3
      libext2fs-dev umoci skopeo bc
      containerd runc golang-go golang-github-containerd-containerd-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
qemu_missing=0
for p in qemu-system-x86 qemu-utils; do dpkg -s "$p" >/dev/null 2>&1 || qemu_missing=1; done
if [ ${#missing[@]} -gt 0 ] || [ $qemu_missing = 1 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages ${missing[*]}$([ $qemu_missing = 1 ] && echo ' qemu-system-x86 qemu-utils');" \
      "run as root or install them" >&2
    exit 1
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# qemu-system-x86 and qemu-utils come together from <release>-backports, through a PRIVATE apt source list (the
# system's apt sources and package lists are not changed). Reason: CI images may ship a backports qemu-utils;
# installing qemu-system-x86 from plain bookworm (7.2) would then remove it, installing both from backports keeps
# them consistent. The private list copies the system's entries for this release (deb822 *.sources and one-line
# "deb" entries) and adds <release>-backports on each mirror that carries the release itself. OBD_DEBIAN_URI (a
# Debian archive URI) replaces the system's sources.
install_qemu() {
  local codename p
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  p=/var/cache/obd-setup/apt-backports
  mkdir -p "$p/lists/partial" "$p/archives/partial" "$p/sources.list.d"
  {
    if [ -n "${OBD_DEBIAN_URI:-}" ]; then
      printf '%s\t%s\tmain\t\n' "$OBD_DEBIAN_URI" "$codename" "$OBD_DEBIAN_URI" "$codename-updates"
    else
      apt_entries
    fi
  } | awk -F'\t' -v c="$codename" '
      $2 == c || $2 == c "-updates" || $2 == c "-security" || $2 == c "-backports" {
        o = ($4 != "") ? "[signed-by=" $4 "] " : ""
        line = "deb " o $1 " " $2 " " $3
        if (!seen[line]++) print line
        if ($2 == c) { line = "deb " o $1 " " c "-backports " $3; if (!seen[line]++) print line }
      }' > "$p/sources.list"
  if ! grep -q -- "-backports " "$p/sources.list"; then
    echo "setup: no Debian '$codename' entry in the system's apt sources; set OBD_DEBIAN_URI to a Debian archive URI" >&2
    exit 1
  fi
  local bpo=(-o Dir::Etc::sourcelist="$p/sources.list" -o Dir::Etc::sourceparts="$p/sources.list.d"
             -o Dir::State::lists="$p/lists" -o Dir::Cache::archives="$p/archives"
             -o Dir::Cache::pkgcache="$p/pkgcache.bin" -o Dir::Cache::srcpkgcache="$p/srcpkgcache.bin")
  echo "setup: installing qemu-system-x86 qemu-utils from $codename-backports ($p/sources.list)"
  timeout 600 apt-get "${bpo[@]}" update -qq
  timeout 1200 apt-get "${bpo[@]}" install -y -qq --no-install-recommends -t "$codename-backports" \
    qemu-system-x86 qemu-utils >/dev/null
}

[ $qemu_missing = 1 ] && install_qemu
# The guest runner fetches the kernel package with `apt-get download`, which needs the system's package lists.
if [ "$(id -u)" -eq 0 ] && [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -print -quit 2>/dev/null)" ]; then
  apt-get update -qq
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust with rustup (stable >= 1.85)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "setup: ok ($(cargo --version); $(qemu-system-x86_64 --version | head -1))"
