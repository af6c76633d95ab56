#!/usr/bin/env bash
# Runs every `obd bench` measurement (each against a baseline in the same run)
# and prints one JSON object per line, after a line describing the machine.
# Usage: bash scripts/bench.sh [out.jsonl]     (run on an otherwise idle machine)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/dev/stdout}
cargo build --release -q -p obd
obd=target/release/obd
{
  printf '{"bench":"machine","date":"%s","cpu":"%s","cores":%s,"mem_gib":%s,"kernel":"%s"}\n' \
    "$(date -u +%FT%TZ)" "$(lscpu | sed -n 's/^Model name: *//p' | head -1)" "$(nproc)" \
    "$(free -g | awk '/Mem:/{print $2}')" "$(uname -r)"
  $obd bench index --segments 10000 --json
  $obd bench index --segments 1000000 --json
  $obd bench index --segments 1000000 --layers 10 --json
  $obd bench zfile --json
  $obd bench read --json
  $obd bench read --zfile --json
} > "$out"
