#!/usr/bin/env bash
# The FUSE benchmark, in one run on this machine (see the README's Benchmarks): an
# S3-protocol store in its own network namespace behind a rate-limited veth link (htb,
# BENCH_LINK, 2gbit by default), two cache workers, a mount, and fio plus a training-like
# epoch, each through the mount and on local disk, in four states:
#   cold       workers and node caches empty: every byte crosses the link
#   prewarmed  workers loaded, the mount's own caches empty (a pod after a BeforeScheduling prewarm)
#   warm       everything read once through this mount already
#   on node    a fresh mount whose node-local cache `granary-cache load --mount` filled
# The kernel's page cache is dropped before every measurement, for the mount and local disk alike.
#
#   make fuse-bench     (root; needs fio, ip, tc)   BENCH_FILE_MIB=2048 BENCH_SMALL_FILES=20000
# The workers run on this node, so the mount reads their block files directly (short
# circuit); BENCH_MOUNT_ARGS="" measures reads over gRPC only.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib.sh

BIN=${GRANARY_BIN:-target/release/granary-cache}
S3_BIN=${GRANARY_S3_BIN:-target/release/examples/s3-test-server}
WORK=${BENCH_DIR:-$(mktemp -d /tmp/granary-fuse-bench.XXXXXX)}
FILE_MIB=${BENCH_FILE_MIB:-2048}
SMALL=${BENCH_SMALL_FILES:-20000}
LINK=${BENCH_LINK:-2gbit}
NS=granary-bench-$$
for tool in fio ip tc python3; do command -v $tool >/dev/null || { echo "fuse-bench needs $tool" >&2; exit 1; }; done
[ "$(id -u)" -eq 0 ] || { echo "fuse-bench needs root (network namespace, mounts, drop_caches)" >&2; exit 1; }

DATA=$WORK/data
if [ ! -f "$DATA/.complete" ]; then
    echo "== generating $DATA: seq.bin and rand.bin of $FILE_MIB MiB, $SMALL files of 64 KiB in 100 directories"
    mkdir -p "$DATA"
    head -c "$((FILE_MIB << 20))" /dev/urandom >"$DATA/seq.bin"
    head -c "$((FILE_MIB << 20))" /dev/urandom >"$DATA/rand.bin"
    python3 - "$DATA" "$SMALL" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "small", f"d{i % 100:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}.bin"), "wb") as f:
        f.write(os.urandom(64 << 10))
PY
    touch "$DATA/.complete"
fi

echo "== the store: a network namespace behind a $LINK veth link"
store_netns "$NS" "$LINK"

rm -rf "$WORK/s3"
start "$WORK/s3.log" ip netns exec "$NS" "$S3_BIN" --root "$WORK/s3" --listen 10.231.0.2:9000 --bucket bench \
    --upload "$DATA=bench/"
echo "   uploading the data through the S3 protocol (inside the namespace)"
for _ in $(seq 1 1200); do grep -q '^uploaded' "$WORK/s3.log" && break; sleep 0.5; done
grep '^uploaded' "$WORK/s3.log" || { cat "$WORK/s3.log" >&2; exit 1; }
rm -f "$WORK/s3/bench/.complete"
OPTS=(--source-option endpoint=http://10.231.0.2:9000 --source-option region=us-east-1
      --source-option access_key_id=granary-test --source-option secret_access_key=granary-test-secret)

P0=$(free_port); P1=$(free_port)
WORKERS=127.0.0.1:$P0,127.0.0.1:$P1
rm -rf "$WORK"/cache-* "$WORK/node-cache"
start "$WORK/worker-0.log" "$BIN" worker --source s3://bench/ "${OPTS[@]}" --listen "127.0.0.1:$P0" \
    --cache-dir "$WORK/cache-0" --cache-size 8GiB --memory-size 1GiB
start "$WORK/worker-1.log" "$BIN" worker --source s3://bench/ "${OPTS[@]}" --listen "127.0.0.1:$P1" \
    --cache-dir "$WORK/cache-1" --cache-size 8GiB --memory-size 1GiB
wait_for_workers "$BIN" "$WORKERS"

MNT=$WORK/mnt; mkdir -p "$MNT"
MOUNT_PID=
MOUNT_METRICS=127.0.0.1:$(free_port)
mount_fresh() {
    if [ -n "$MOUNT_PID" ]; then umount "$MNT"; sleep 0.5; fi
    rm -rf "$WORK/node-cache"
    out=$("$BIN" mount --workers "$WORKERS" --source s3://bench/ "${OPTS[@]}" --max-memory 1GiB \
        --cache-dir "$WORK/node-cache" --cache-size 8GiB --metadata-ttl 10m \
        ${BENCH_MOUNT_ARGS---short-circuit-dir "$WORK/cache-0" --short-circuit-dir "$WORK/cache-1"} \
        --metrics-listen "$MOUNT_METRICS" --log-file "$WORK/mount.log" --daemon "$MNT")
    MOUNT_PID=$(sed -n 's/.*(pid \([0-9]*\)).*/\1/p' <<<"$out")
    GRANARY_MOUNTS=("$MNT")
}

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# fio_mbps NAME ARGS...: MB/s of a read job after dropping the page cache.
fio_mbps() {
    drop
    fio --output-format=json --name="$1" --ioengine=psync --readonly "${@:2}" \
        | python3 -c 'import json,sys; j=json.load(sys.stdin); print("%.0f" % (sum(x["read"]["bw_bytes"] for x in j["jobs"]) / 1e6))'
}
seq_read() { fio_mbps seq --filename="$1/seq.bin" --rw=read --bs=1M; }
rand_read() {
    fio_mbps rand --filename="$1/rand.bin" --rw=randread --bs=1M --numjobs=4 \
        --size=$((FILE_MIB / 4))M --offset_increment=$((FILE_MIB / 4))M --group_reporting
}
stat_walk() {
    drop
    python3 - "$1/small" <<'PY'
import os, sys, time
t = time.time(); n = 0
for d, _, files in os.walk(sys.argv[1]):
    for f in files:
        os.stat(os.path.join(d, f)); n += 1
print(f"{time.time() - t:.2f}")
PY
}
epoch() {
    drop
    python3 - "$1/small" <<'PY'
import concurrent.futures, os, random, sys, time
root = sys.argv[1]
files = [os.path.join(root, d, f) for d in sorted(os.listdir(root)) for f in sorted(os.listdir(os.path.join(root, d)))]
random.Random(3).shuffle(files)
def read(p):
    with open(p, "rb") as f:
        return len(f.read())
t = time.time()
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    total = sum(pool.map(read, files))
assert total == len(files) * (64 << 10), total
print(f"{len(files) / (time.time() - t):.0f}")
PY
}
peak_rss_mib() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$MOUNT_PID/status"; }
# User + system CPU seconds the mount process has used (all its threads).
mount_sys_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$MOUNT_PID/stat"; }
block_fetches() {
    curl -s "http://$MOUNT_METRICS/metrics" | awk '/^granary_fuse_block_fetches_total/ {n += $2} END {printf "%d", n}'
}

RESULTS=$WORK/results.tsv
printf "state\tseq MB/s\trand MB/s\tepoch files/s\tstat walk s\tpeak RSS MiB\tCPU s/GiB\tblock fetches\n" >"$RESULTS"
run_state() {
    local state=$1 dir=$2
    echo "== $state"
    local s r w e
    w=$(stat_walk "$dir"); echo "   stat walk of $SMALL files: ${w}s"
    e=$(epoch "$dir"); echo "   epoch: $e files/s"
    local sys0 fetches0 sys=- fetches=-
    if [ "$dir" = "$MNT" ]; then sys0=$(mount_sys_s); fetches0=$(block_fetches); fi
    s=$(seq_read "$dir"); echo "   sequential read: $s MB/s"
    if [ "$dir" = "$MNT" ]; then
        sys=$(python3 -c "print('%.2f' % (($(mount_sys_s) - $sys0) / ($FILE_MIB / 1024)))")
        fetches="$(($(block_fetches) - fetches0))/$(((FILE_MIB + 3) / 4))"
        echo "   the mount's user+system CPU: $sys s per GiB read; block fetches/blocks: $fetches"
    fi
    r=$(rand_read "$dir"); echo "   random 1 MiB reads, 4 jobs: $r MB/s"
    local rss=-
    if [ "$dir" = "$MNT" ]; then
        rss=$(peak_rss_mib)
        echo "   mount so far: $(curl -s "http://$MOUNT_METRICS/metrics" | grep -E '^granary_fuse_(opens|read_bytes|warmed_ahead)_total' | tr '\n' ' ')"
    fi
    printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$state" "$s" "$r" "$e" "$w" "$rss" "$sys" "$fetches" >>"$RESULTS"
}

run_state "local disk" "$DATA"
echo "== the link: one large GET through it"
drop
link=$(python3 - <<PY
import subprocess, time
t = time.time()
n = len(subprocess.run(["$BIN", "cat", "--workers", "$WORKERS", "--parallelism", "16", "seq.bin"], capture_output=True, check=True).stdout)
print(f"{n / 1e6 / (time.time() - t):.0f}")
PY
)
echo "   cold read of seq.bin through the workers (what the link allows): $link MB/s"
# That read warmed seq.bin in the workers; start the cold state from empty caches again.
for pid in "${GRANARY_PIDS[@]:1}"; do kill "$pid"; done; sleep 1
GRANARY_PIDS=("${GRANARY_PIDS[0]}")
rm -rf "$WORK"/cache-*
start "$WORK/worker-0.log" "$BIN" worker --source s3://bench/ "${OPTS[@]}" --listen "127.0.0.1:$P0" \
    --cache-dir "$WORK/cache-0" --cache-size 8GiB --memory-size 1GiB
start "$WORK/worker-1.log" "$BIN" worker --source s3://bench/ "${OPTS[@]}" --listen "127.0.0.1:$P1" \
    --cache-dir "$WORK/cache-1" --cache-size 8GiB --memory-size 1GiB
wait_for_workers "$BIN" "$WORKERS"

mount_fresh
run_state cold "$MNT"
"$BIN" load --workers "$WORKERS" / >/dev/null
mount_fresh
run_state prewarmed "$MNT"
run_state warm "$MNT"
mount_fresh
echo "== loading onto the node: granary-cache load --mount"
t0=$(date +%s.%N)
"$BIN" load --mount "$MNT" 2>&1 | tail -1
echo "   in $(python3 -c "print('%.1f' % ($(date +%s.%N) - $t0))")s"
run_state "on node" "$MNT"

echo
echo "== results (link: $link MB/s through the workers cold; $LINK)"
python3 - "$RESULTS" "$link" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1]), delimiter="\t"))
head, data = rows[0], {r[0]: r for r in rows[1:]}
local = data["local disk"]
print("| state | seq MB/s | rand 1M MB/s | epoch files/s | stat walk s | peak RSS MiB | mount CPU s/GiB (seq) | block fetches/blocks (seq) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name, r in data.items():
    def ratio(i, inverse=False):
        try:
            a, b = float(r[i]), float(local[i])
            return f"{r[i]} ({(b / a if inverse else a / b):.2f}×)" if name != "local disk" else r[i]
        except ValueError:
            return r[i]
    print(f"| {name} | {ratio(1)} | {ratio(2)} | {ratio(3)} | {r[4]} ({float(r[4]) / float(local[4]):.1f}× local) | {r[5]} | {r[6]} | {r[7]} |")
print(f"\nratios are to local disk in the same run; cold sequential is {float(data['cold'][1]) / float(sys.argv[2]):.2f}× the link as the workers see it")
warm = data["warm"]
for name in ("prewarmed", "on node"):
    r = data[name]
    print(f"{name} / warm: sequential {float(r[1]) / float(warm[1]):.2f}×, epoch {float(r[3]) / float(warm[3]):.2f}×")
PY
