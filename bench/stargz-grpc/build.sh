#!/usr/bin/env bash
# Builds containerd-stargz-grpc (bench/stargz-grpc/main.go) offline from
# Debian's Go library packages, in GOPATH mode. Usage: build.sh OUT_BINARY
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_BINARY}
if [[ ! -d /usr/share/gocode/src/github.com/containerd/stargz-snapshotter/service ]]; then
  echo "build.sh: apt install golang-github-containerd-stargz-snapshotter-dev golang-go" >&2
  exit 2
fi
gp=$(mktemp -d)
trap 'rm -rf "$gp"' EXIT
mkdir -p "$gp/src/obdbench/stargz-grpc"
cp "$here/main.go" "$gp/src/obdbench/stargz-grpc/"
cd "$gp/src/obdbench/stargz-grpc"
GO111MODULE=off GOPATH="$gp:/usr/share/gocode" GOFLAGS= GOCACHE=${GOCACHE:-$HOME/.cache/go-build} \
  go build -o "$out" .
