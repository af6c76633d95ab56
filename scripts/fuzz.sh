#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS (default 180) each, seeding the corpora
# from obd-written files and the upstream interop vectors.
# Needs: cargo install cargo-fuzz. Works on stable Rust through RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-180}
export RUSTC_BOOTSTRAP=1
cargo build --release -q -p obd
obd=$PWD/target/release/obd
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
c=fuzz/corpus
mkdir -p $c/{zfile_header,zfile_file,lsmt_file,tar_wrapper,config,www_authenticate,service_config,lz4_block,trace,tar_apply,control_request,verity_table}
head -c 20000 fixtures/interop/zfile/source.bin > "$tmp/small.bin"
$obd zfile compress "$tmp/small.bin" $c/zfile_file/seed-lz4 2>/dev/null
$obd zfile compress --algorithm zstd --block-size 8K "$tmp/small.bin" $c/zfile_file/seed-zstd 2>/dev/null
head -c 512 $c/zfile_file/seed-lz4 > $c/zfile_header/seed
cp fixtures/interop/discard/layer.raw.lsmt $c/lsmt_file/seed-committed
$obd layer create "$tmp/d" "$tmp/i" 2>/dev/null
$obd layer write --offset 4K "$tmp/d" "$tmp/i" "$tmp/small.bin" 2>/dev/null
$obd layer seal "$tmp/d" "$tmp/i" 2>/dev/null
cp "$tmp/d" $c/lsmt_file/seed-sealed
head -c 4096 fixtures/interop/stack-lz4/layer0.overlaybd.tar > $c/tar_wrapper/seed
cp fixtures/interop/stack-lz4/config.v1.json $c/config/seed-stack
cp fixtures/interop/discard/config.v1.json $c/config/seed-discard
printf 'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"' > $c/www_authenticate/seed-challenge
printf '{"token":"abc","expires_in":300}' > $c/www_authenticate/seed-token
printf '[cache]\ndir = "/x"\nbudget = 100\n[fetch]\nmin_fetch = 262144\n[registry]\nuser_agent = "x"\n' > $c/service_config/seed
# The §5.2 check vector and a priority list.
printf '\x20\x18\xef\xc2\0\0\0\0\x30\0\0\0\0\0\0\0\xf1\xae\x06\x68\0\0\0\0R\0\0\0\0\0\0\0\0\x10\0\0\0\0\0\0\0\x10\0\0\0\0\0\0R\0\0\0\x02\0\0\0\0\0\x01\0\0\0\0\0\0\0\x10\0\0\0\0\0' > $c/trace/seed-vector
printf '/usr/bin/\n/etc/hosts\n/opt/app*\n' > $c/trace/seed-list
chmod -R u+w $c
cd fuzz
for t in zfile_header zfile_file lsmt_file tar_wrapper config www_authenticate service_config lz4_block trace tar_apply control_request verity_table; do
  echo "=== $t ($secs s)"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=65536 -print_final_stats=1 2>&1 |
    grep -E "stat::number_of_executed_units|Done|ERROR|panicked|SUMMARY|crash-" || true
done
