#!/usr/bin/env bash
# The cache-worker benchmark, in one run on this machine: an S3-protocol server on loopback,
# two workers, and `granary-cache bench` comparing warm reads with the local disk and cold
# reads with direct parallel range reads of the store (see the README's Benchmarks).
#
#   make bench                       BENCH_FILE_SIZE=1GiB BENCH_SMALL_FILES=2000 by default;
#   BENCH_WORKER_ARGS replaces the workers' cache flags (e.g. "--memory-size 2GiB" for no disk tier)
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib.sh

BIN=${GRANARY_BIN:-target/release/granary-cache}
S3_BIN=${GRANARY_S3_BIN:-target/release/examples/s3-test-server}
WORK=${BENCH_DIR:-$(mktemp -d /tmp/granary-bench.XXXXXX)}
mkdir -p "$WORK"

S3=$(free_port); P0=$(free_port); P1=$(free_port)
WORKERS=127.0.0.1:$P0,127.0.0.1:$P1
start "$WORK/s3.log" "$S3_BIN" --root "$WORK/s3" --listen "127.0.0.1:$S3" --bucket bench
OPTS=(--source-option "endpoint=http://127.0.0.1:$S3" --source-option region=us-east-1
      --source-option access_key_id=granary-test --source-option secret_access_key=granary-test-secret)
sleep 0.5
for i in 0 1; do
    port=$([ $i -eq 0 ] && echo "$P0" || echo "$P1")
    start "$WORK/worker-$i.log" "$BIN" worker --source s3://bench/ "${OPTS[@]}" --listen "127.0.0.1:$port" \
        ${BENCH_WORKER_ARGS:---cache-dir "$WORK/cache-$i" --cache-size 4GiB --memory-size 2GiB}
done
wait_for_workers "$BIN" "$WORKERS"
"$BIN" bench --workers "$WORKERS" --source s3://bench/ "${OPTS[@]}" --local-dir "$WORK/local" \
    --file-size "${BENCH_FILE_SIZE:-1GiB}" --small-files "${BENCH_SMALL_FILES:-2000}" "$@"
