#!/usr/bin/env bash
# Cluster-scale figures on one machine (see the README's Benchmarks), each from the real
# binaries on loopback, over a local-disk (fs://) store:
#   metadata   memory per cached entry, worker and mount: their RSS before and after a
#              mount lists and stats a directory of BENCH_ENTRIES files; projected to 10^8
#   prewarm    `granary-cache load` of BENCH_PREWARM_FILES one-block files: files/s, peak RSS
#   hot file   64 `granary-cache cat --replicas N` of one BENCH_HOT_MIB file over 1, 2 and 4
#              workers: aggregate MB/s (on this 2-core machine every reader and worker shares
#              the same cores, so the ratio shows the spread, not a NIC's limit)
#   listings   store listing requests for 8 mounts reading one directory
#
#   make scale-bench     (root for the mounts)   BENCH_ENTRIES=200000 BENCH_PREWARM_FILES=1000000
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib.sh

BIN=${GRANARY_BIN:-target/release/granary-cache}
WORK=${BENCH_DIR:-$(mktemp -d /tmp/granary-scale-bench.XXXXXX)}
ENTRIES=${BENCH_ENTRIES:-200000}
PREWARM=${BENCH_PREWARM_FILES:-1000000}
HOT_MIB=${BENCH_HOT_MIB:-64}
[ "$(id -u)" -eq 0 ] || { echo "scale-bench needs root (FUSE mounts)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "build first: cargo build --release --bin granary-cache" >&2; exit 1; }
PIDS=()
cleanup() {
    for m in "$WORK"/mnt*; do umount -l "$m" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metric() { curl -s "http://$1/metrics" | awk -v m="$2" '$1 ~ "^"m {s += $2} END {printf "%d\n", s}'; }
wait_http() { for _ in $(seq 200); do curl -sf "http://$1/readyz" >/dev/null && return; sleep 0.05; done; echo "no answer from $1" >&2; exit 1; }

# worker NAME SOURCE [ARGS...]: starts a worker, sets W_ADDR and W_METRICS and W_PID.
worker() {
    local name=$1 source=$2; shift 2
    W_ADDR=127.0.0.1:$(port); W_METRICS=127.0.0.1:$(port)
    "$BIN" worker --source "$source" --listen "$W_ADDR" --metrics-listen "$W_METRICS" \
        --memory-size 2GiB --metadata-ttl 10m "$@" 2>"$WORK/$name.log" &
    W_PID=$!; PIDS+=("$W_PID")
    wait_http "$W_METRICS"
}

echo "== data in $WORK"
python3 - "$WORK" "$ENTRIES" "$PREWARM" "$HOT_MIB" <<'PY'
import os, sys
root, entries, prewarm, hot = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def fill(d, n, data):
    if os.path.exists(os.path.join(d, ".complete")):
        return
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        sub = os.path.join(d, f"d{i // 10000:04d}") if n > 200000 else d
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"sample-{i:07d}.jpg"), "wb") as f:
            f.write(data)
    open(os.path.join(d, ".complete"), "w").close()
fill(os.path.join(root, "store/dir"), entries, b"")
fill(os.path.join(root, "store/prewarm"), prewarm, b"x" * 100)
hotfile = os.path.join(root, "store/hot.bin")
if not os.path.exists(hotfile):
    with open(hotfile, "wb") as f:
        f.write(os.urandom(hot << 20))
PY
STORE="fs://$WORK/store"

echo "== metadata: one mount lists and stats $ENTRIES entries"
worker meta "$STORE" --metadata-max-entries $((ENTRIES * 2 + 10))
META_W=$W_PID; META_ADDR=$W_ADDR; META_METRICS=$W_METRICS
mkdir -p "$WORK/mnt0"
MOUNT_METRICS=127.0.0.1:$(port)
"$BIN" mount "$WORK/mnt0" --workers "$META_ADDR" --max-memory 2GiB --metadata-ttl 10m \
    --metrics-listen "$MOUNT_METRICS" 2>"$WORK/mount0.log" &
MOUNT_PID=$!; PIDS+=("$MOUNT_PID")
wait_http "$MOUNT_METRICS"
ls "$WORK/mnt0" >/dev/null
w0=$(rss_kib $META_W); m0=$(rss_kib $MOUNT_PID)
t0=$(date +%s.%N)
n=$(ls -lf "$WORK/mnt0/dir" | grep -c sample- || true)
t1=$(date +%s.%N)
w1=$(rss_kib $META_W); m1=$(rss_kib $MOUNT_PID)
python3 - "$n" "$w0" "$w1" "$m0" "$m1" "$t0" "$t1" <<'PY'
import sys
n, w0, w1, m0, m1 = (int(x) for x in sys.argv[1:6]); t0, t1 = float(sys.argv[6]), float(sys.argv[7])
wb = (w1 - w0) * 1024 / n; mb = (m1 - m0) * 1024 / n
print(f"  listed and stated {n} entries in {t1 - t0:.2f} s")
print(f"  worker: {wb:.0f} bytes/entry (listing cache + stat cache)  -> 10^8 files: {wb * 1e8 / 2**30:.1f} GiB over the workers")
print(f"  mount:  {mb:.0f} bytes/entry (stat + listing, one LRU)      -> 10^8 files: {mb * 1e8 / 2**30:.1f} GiB if one mount held them all")
PY
umount "$WORK/mnt0"; kill "$META_W" "$MOUNT_PID" 2>/dev/null || true; wait "$META_W" "$MOUNT_PID" 2>/dev/null || true

echo "== prewarm: $PREWARM files of 100 bytes over 2 workers"
worker p1 "$STORE"; P1=$W_PID; P1_ADDR=$W_ADDR
worker p2 "$STORE"; P2=$W_PID; P2_ADDR=$W_ADDR
t0=$(date +%s.%N)
"$BIN" load --workers "$P1_ADDR,$P2_ADDR" /prewarm >/dev/null 2>"$WORK/load.log"
t1=$(date +%s.%N)
python3 - "$PREWARM" "$t0" "$t1" "$(hwm_kib $P1)" "$(hwm_kib $P2)" <<'PY'
import sys
n = int(sys.argv[1]); t = float(sys.argv[3]) - float(sys.argv[2]); a, b = int(sys.argv[4]), int(sys.argv[5])
print(f"  {n} files in {t:.1f} s: {n / t:.0f} files/s; peak RSS of the workers {a / 1024:.0f} and {b / 1024:.0f} MiB (the coordinator first)")
PY
kill "$P1" "$P2" 2>/dev/null || true; wait "$P1" "$P2" 2>/dev/null || true

echo "== hot file: 64 readers of one $HOT_MIB MiB file, --replicas = workers"
for n in 1 2 4; do
    addrs=(); pids=(); metrics=()
    ports=(); for i in $(seq "$n"); do ports+=("127.0.0.1:$(port)"); done
    members=$(IFS=,; echo "${ports[*]}")
    for i in $(seq 0 $((n - 1))); do
        m=127.0.0.1:$(port)
        "$BIN" worker --source "$STORE" --listen "${ports[$i]}" --metrics-listen "$m" --memory-size 1GiB \
            --members "$members" --advertise "${ports[$i]}" 2>"$WORK/hot-$n-$i.log" &
        pids+=($!); PIDS+=($!); metrics+=("$m")
    done
    for m in "${metrics[@]}"; do wait_http "$m"; done
    "$BIN" cat --workers "${ports[0]}" --replicas "$n" /hot.bin >/dev/null  # cold fill
    t0=$(date +%s.%N)
    seq 64 | xargs -P 64 -I{} sh -c "'$BIN' cat --workers '${ports[0]}' --replicas $n /hot.bin >/dev/null"
    t1=$(date +%s.%N)
    served=(); for m in "${metrics[@]}"; do served+=("$(metric "$m" granary_cache_served_bytes_total)"); done
    src=0; for m in "${metrics[@]}"; do src=$((src + $(metric "$m" granary_source_read_bytes_total))); done
    python3 - "$n" "$HOT_MIB" "$t0" "$t1" "$src" "${served[@]}" <<'PY'
import sys
n, mib = int(sys.argv[1]), int(sys.argv[2]); t = float(sys.argv[4]) - float(sys.argv[3]); src = int(sys.argv[5])
served = [int(x) for x in sys.argv[6:]]; total = sum(served)
print(f"  {n} worker(s): {64 * mib / t:.0f} MiB/s for 64 readers; served per worker {[round(s / total, 2) for s in served]}; store read {src / (mib << 20):.2f}x the file")
PY
    kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true
done

echo "== listings: 8 mounts list one $ENTRIES-entry directory at once over 2 workers"
worker l1 "$STORE" --metadata-max-entries $((ENTRIES * 2 + 10)); L1=$W_ADDR; L1M=$W_METRICS; L1P=$W_PID
worker l2 "$STORE" --metadata-max-entries $((ENTRIES * 2 + 10)); L2=$W_ADDR; L2M=$W_METRICS; L2P=$W_PID
before=$(( $(metric "$L1M" granary_source_lists_total) + $(metric "$L2M" granary_source_lists_total) ))
mpids=()
for i in $(seq 8); do
    mkdir -p "$WORK/mnt$i"
    "$BIN" mount "$WORK/mnt$i" --workers "$L1,$L2" --max-memory 512MiB --metadata-ttl 10m 2>"$WORK/mount$i.log" &
    mpids+=($!); PIDS+=($!)
done
for i in $(seq 8); do for _ in $(seq 200); do mountpoint -q "$WORK/mnt$i" && break; sleep 0.05; done; done
t0=$(date +%s.%N)
seq 8 | xargs -P 8 -I{} sh -c "ls -f '$WORK/mnt{}/dir' | grep -c sample- > '$WORK/ls{}'"
t1=$(date +%s.%N)
after=$(( $(metric "$L1M" granary_source_lists_total) + $(metric "$L2M" granary_source_lists_total) ))
echo "  8 mounts listed $(cat "$WORK/ls1") names each in $(python3 -c "print(f'{$t1 - $t0:.1f}')") s; store listing requests: $((after - before))"
