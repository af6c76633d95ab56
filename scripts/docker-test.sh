#!/usr/bin/env bash
# Docker Engine with the containerd image store on obd (docs/DOCKER.md): unpacks Debian's docker.io, docker-cli and
# docker-buildx into a private prefix (scripts/debian-pkgs.sh; nothing is installed, the system's docker and containerd
# are never touched), then runs crates/obd/tests/docker.rs against them on a private containerd.
#
#   scripts/docker-test.sh [CONTAINERD_VERSION]
#
# CONTAINERD_VERSION: 1.7 (default) or 2.1, unpacked by scripts/containerd-matrix.sh; 1.6 is the system's.
# OBD_DOCKER_SUITE: the Debian suite Docker comes from, trixie (default: Docker 26.1, BuildKit 0.13) or sid (28.x).
# The prefix is ${OBD_PKGS:-/opt/obd-pkgs}/docker-SUITE. CARGO_PROFILE_FLAGS go to cargo (e.g. --locked).
# When Docker or containerd cannot be fetched (no network, no mirror), the test is SKIPPED loudly and the script succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
suite=${OBD_DOCKER_SUITE:-trixie}
ver=${1:-1.7}
prefix=${OBD_PKGS:-/opt/obd-pkgs}/docker-$suite

skip() { printf '\n*** SKIPPED docker test: %s ***\n\n' "$*" >&2; exit 0; }

bash scripts/debian-pkgs.sh "$suite" "$prefix" docker.io docker-cli docker-buildx >/dev/null ||
  skip "Docker Engine could not be fetched from Debian $suite (scripts/debian-pkgs.sh failed)"
env=$(bash scripts/containerd-matrix.sh env "$ver") || skip "containerd $ver could not be fetched"
eval "$env"
export OBD_DOCKER_PREFIX=$prefix
echo "docker-test: $("$prefix/usr/sbin/dockerd" --version) on containerd $ver" >&2
# shellcheck disable=SC2086 # CARGO_PROFILE_FLAGS is a list of flags
cargo test ${CARGO_PROFILE_FLAGS:-} -p obd --test docker -- --nocapture
