#!/usr/bin/env bash
# The checkpoint benchmark, in one run (see the README's Benchmarks): an S3-protocol store in
# its own network namespace behind a rate-limited veth link (BENCH_LINK, 2gbit by default),
# a checkpoint volume whose write-back area is on the same disk as the local-disk runs, and
# a torch.save-like writer (1 MiB writes, then close). Each of BENCH_RUNS rounds measures:
#   local      write the checkpoint to local disk, until close() returns
#   volume     write it through the checkpoint volume, until close() returns
#   committed  ... until the marker is in the store (all bytes uploaded, marker last)
#   direct     PUT it straight to the store (curl, one stream), as a writer without Granary does
#   restore    read back the latest checkpoint: through the volume, from local disk, from the store
# The page cache is flushed and dropped before every measurement.
#
#   make ckpt-bench    (root; needs ip, tc, curl, python3)   BENCH_CKPT_MIB=2048 BENCH_RUNS=3
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib.sh

BIN=${GRANARY_BIN:-target/release/granary-cache}
S3_BIN=${GRANARY_S3_BIN:-target/release/examples/s3-test-server}
WORK=${BENCH_DIR:-$(mktemp -d /tmp/granary-ckpt-bench.XXXXXX)}
MIB=${BENCH_CKPT_MIB:-2048}
RUNS=${BENCH_RUNS:-3}
LINK=${BENCH_LINK:-2gbit}
NS=granary-ckpt-$$
for tool in ip tc curl python3; do command -v $tool >/dev/null || { echo "ckpt-bench needs $tool" >&2; exit 1; }; done
[ "$(id -u)" -eq 0 ] || { echo "ckpt-bench needs root (network namespace, mounts, drop_caches)" >&2; exit 1; }

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
# write_ckpt PATH: a torch.save-like writer; prints the seconds until close() returned.
write_ckpt() {
    python3 - "$1" "$MIB" <<'PY'
import os, sys, time
path, mib = sys.argv[1], int(sys.argv[2])
buf = os.urandom(1 << 20)
t = time.monotonic()
with open(path, "wb") as f:
    for i in range(mib):
        f.write(buf)
print(f"{time.monotonic() - t:.3f}")
PY
}
# read_secs PATH: seconds to read a file with 1 MiB reads.
read_secs() {
    python3 - "$1" <<'PY'
import sys, time
t = time.monotonic()
with open(sys.argv[1], "rb", buffering=0) as f:
    while f.read(1 << 20):
        pass
print(f"{time.monotonic() - t:.3f}")
PY
}
CURL=(curl -sS --fail -o /dev/null -w '%{time_total}' --aws-sigv4 "aws:amz:us-east-1:s3"
      --user granary-test:granary-test-secret -H "x-amz-content-sha256: UNSIGNED-PAYLOAD")

echo "== the store: a network namespace behind a $LINK veth link"
store_netns "$NS" "$LINK"
rm -rf "$WORK/s3" "$WORK/wb" "$WORK/local"
mkdir -p "$WORK/local" "$WORK/mnt"
start "$WORK/s3.log" ip netns exec "$NS" "$S3_BIN" --root "$WORK/s3" --listen 10.231.0.2:9000 --bucket ckpt \
    --print-completions
for _ in $(seq 1 100); do grep -q 's3 test server on' "$WORK/s3.log" && break; sleep 0.1; done
ENDPOINT=http://10.231.0.2:9000

MNT=$WORK/mnt
start "$WORK/mount.log" "$BIN" mount --checkpoint --target s3://ckpt/run \
    --target-option endpoint=$ENDPOINT --target-option region=us-east-1 \
    --target-option access_key_id=granary-test --target-option secret_access_key=granary-test-secret \
    --writeback-dir "$WORK/wb" --writeback-size "$((MIB * 3))MiB" --commit-marker _COMPLETE --keep-last 2 \
    --upload-concurrency 16 --part-size 16MiB "$MNT"
GRANARY_MOUNTS+=("$MNT")
for _ in $(seq 1 100); do mountpoint -q "$MNT" && break; sleep 0.1; done
mountpoint -q "$MNT" || { cat "$WORK/mount.log" >&2; exit 1; }

printf '%-4s %10s %10s %12s %14s %10s\n' run "local s" "volume s" "committed s" "server-side s" "direct s"
for run in $(seq 1 "$RUNS"); do
    drop; local_s=$(write_ckpt "$WORK/local/model.pt")
    drop
    mkdir -p "$MNT/step_$run"
    t0=$(now)
    volume_s=$(write_ckpt "$MNT/step_$run/model.pt")
    : >"$MNT/step_$run/_COMPLETE"
    until [ -e "$WORK/s3/ckpt/run/step_$run/_COMPLETE" ]; do sleep 0.05; done
    committed_s=$(python3 -c "print(f'{$(now) - $t0:.3f}')")
    # s3s-fs assembles a multipart object by copying every part at completion; real S3 does
    # not. That copy's time is shown so the upload itself can be judged.
    assemble_s=$(grep "object complete: /ckpt/run/step_$run/model.pt " "$WORK/s3.log" | tail -1 | sed 's/.*took \([0-9.]*\)s.*/\1/')
    drop; direct_s=$("${CURL[@]}" -T "$WORK/local/model.pt" "$ENDPOINT/ckpt/direct/model.pt")
    printf '%-4s %10s %10s %12s %14s %10s\n' "$run" "$local_s" "$volume_s" "$committed_s" "$assemble_s" "$direct_s"
done

echo "== restore of the latest checkpoint (step_$RUNS), $MIB MiB"
drop; vol_read=$(read_secs "$MNT/step_$RUNS/model.pt")
drop; local_read=$(read_secs "$WORK/local/model.pt")
drop; store_read=$("${CURL[@]}" "$ENDPOINT/ckpt/run/step_$RUNS/model.pt")
python3 - "$MIB" "$vol_read" "$local_read" "$store_read" <<'PY'
import sys
mib, vol, local, store = int(sys.argv[1]), *map(float, sys.argv[2:])
mb = mib * 1048576 / 1e6
print(f"restore through the volume {mb/vol:8.0f} MB/s   local disk {mb/local:8.0f} MB/s   "
      f"from the store {mb/store:8.0f} MB/s   volume/local {local/vol:.2f}")
PY
echo "committed checkpoints in the store (--keep-last 2): $(cd "$WORK/s3/ckpt/run" && find . -name _COMPLETE | sort | tr '\n' ' ')"
