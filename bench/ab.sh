#!/usr/bin/env bash
# A/B of two obd builds on the `obd bench` figures, interleaved in one run so
# both see the same machine: bench/ab.sh OLD_OBD NEW_OBD [REPS] > results.jsonl
# Each line: {"build": "old"|"new", "rep": N, "bench": NAME, "figures": {...}}.
# Used for refactors that must not move the figures (issue 13). BENCHES="remote"
# limits the run to some of index, zfile, read, remote.
set -euo pipefail
old=$1 new=$2 reps=${3:-3}
run() { # build-name binary rep bench args...
  local name=$1 bin=$2 rep=$3 bench=$4; shift 4
  local out
  out=$("$bin" bench "$bench" "$@" --json)
  printf '{"build":"%s","rep":%d,"bench":"%s","figures":%s}\n' "$name" "$rep" "$bench" "$out"
}
for rep in $(seq 1 "$reps"); do
  # Alternate which build goes first, so neither always runs after the
  # other's page-cache and writeback debris.
  if (( rep % 2 )); then order=("old $old" "new $new"); else order=("new $new" "old $old"); fi
  for pair in "${order[@]}"; do
    set -- $pair
    for b in ${BENCHES:-index zfile read remote}; do
      case $b in
        index) run "$1" "$2" "$rep" index --seconds 1 ;;
        zfile) run "$1" "$2" "$rep" zfile --size-mib 32 --seconds 1 ;;
        read) run "$1" "$2" "$rep" read --size-mib 512 --zfile ;;
        remote) run "$1" "$2" "$rep" remote --size-mib 256 ;;
      esac
    done
  done
done
