#!/usr/bin/env bash
# One-time machine set-up for building and testing obd on Debian 12 (as root).
# Idempotent: installs only what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# gcc builds the vendored zstd and ring; e2fsprogs provides the ext4 oracles
# (mke2fs, e2fsck); docker-registry and apache2-utils (htpasswd) run the registry
# tests against a real registry on 127.0.0.1; fuse3 (fusermount3) and
# util-linux serve the FUSE + loop device tests; fio measures the devices.
pkgs=(gcc pkg-config e2fsprogs docker-registry apache2-utils curl fuse3 util-linux fio)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust with rustup (stable >= 1.85)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "setup: ok ($(cargo --version))"
