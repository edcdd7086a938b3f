#!/usr/bin/env bash
# The main job on an embedded default: a local source directory with generated data, two
# cache workers with memory and disk tiers, a prewarm with progress, a read of every file
# through the workers with a checksum check, then the dataset mounted as a directory (FUSE)
# and a training-like epoch over it: every sample once, shuffled, 8 reader threads.
#
#   make demo            (builds release binaries first)
#   DEMO_DIR=/tmp/x e2e/demo.sh    keeps its files in /tmp/x
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib.sh

BIN=${GRANARY_BIN:-target/release/granary-cache}
WORK=${DEMO_DIR:-$(mktemp -d /tmp/granary-demo.XXXXXX)}
SMALL=${DEMO_SMALL_FILES:-300}
SHARDS=${DEMO_SHARDS:-4}
SHARD_MIB=${DEMO_SHARD_MIB:-128}
mkdir -p "$WORK/source/train" "$WORK/source/shards"

echo "== generating the dataset in $WORK/source: $SMALL small samples, $SHARDS shards of ${SHARD_MIB} MiB"
python3 - "$WORK/source" "$SMALL" "$SHARDS" "$SHARD_MIB" <<'PY'
import os, random, sys
root, small, shards, shard_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(7)
for i in range(small):
    d = os.path.join(root, "train", f"{i % 10:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
        f.write(os.urandom(rng.randint(4 << 10, 256 << 10)))
for i in range(shards):
    with open(os.path.join(root, "shards", f"shard-{i:03d}.tar"), "wb") as f:
        for _ in range(shard_mib):
            f.write(os.urandom(1 << 20))
PY

P0=$(free_port); P1=$(free_port); M0=$(free_port)
WORKERS=127.0.0.1:$P0,127.0.0.1:$P1
echo "== starting two workers ($WORKERS), metrics on 127.0.0.1:$M0/metrics"
start "$WORK/worker-0.log" "$BIN" worker --source "fs://$WORK/source" --listen "127.0.0.1:$P0" \
    --cache-dir "$WORK/cache-0" --cache-size 2GiB --memory-size 512MiB --metrics-listen "127.0.0.1:$M0"
start "$WORK/worker-1.log" "$BIN" worker --source "fs://$WORK/source" --listen "127.0.0.1:$P1" \
    --cache-dir "$WORK/cache-1" --cache-size 2GiB --memory-size 512MiB
wait_for_workers "$BIN" "$WORKERS"

echo "== prewarm"
"$BIN" load --workers "$WORKERS" /

echo "== reading every file through the workers and comparing checksums"
bad=0; files=0
while IFS= read -r -d '' f; do
    rel=${f#"$WORK/source"}
    want=$(sha256sum <"$f" | cut -d' ' -f1)
    got=$("$BIN" cat --workers "$WORKERS" "$rel" | sha256sum | cut -d' ' -f1)
    if [ "$want" != "$got" ]; then echo "MISMATCH $rel" >&2; bad=$((bad + 1)); fi
    files=$((files + 1))
done < <(find "$WORK/source" -type f -print0)
echo "checked $files files: $bad mismatches"

echo "== streaming the shards through the workers"
total=0
start_ns=$(date +%s%N)
for f in "$WORK"/source/shards/*; do
    n=$("$BIN" cat --workers "$WORKERS" --parallelism 16 "${f#"$WORK/source"}" | wc -c)
    total=$((total + n))
done
end_ns=$(date +%s%N)
python3 -c "import sys; b,ns=int(sys.argv[1]),int(sys.argv[2]); print(f'read {b/2**20:.0f} MiB of shards in {ns/1e9:.2f}s: {b/1e6/(ns/1e9):.0f} MB/s (warm, through the workers)')" "$total" "$((end_ns - start_ns))"

echo "== worker stats"
"$BIN" stats --workers "$WORKERS"
[ "$bad" -eq 0 ] || { echo "demo FAILED: $bad files differ" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ] || [ ! -e /dev/fuse ]; then
    echo "== SKIP the mount: it needs root and /dev/fuse"
    echo "demo OK (files in $WORK)"
    exit 0
fi
MNT=$WORK/mnt; mkdir -p "$MNT"
echo "== mounting the dataset at $MNT (workers, with the source as fallback)"
"$BIN" mount --workers "$WORKERS" --source "fs://$WORK/source" --max-memory 512MiB \
    --cache-dir "$WORK/node-cache" --cache-size 2GiB --log-file "$WORK/mount.log" --daemon "$MNT"
GRANARY_MOUNTS+=("$MNT")
ls "$MNT"
echo "== training-like epoch over the mount: every sample once, shuffled, 8 threads, checked"
python3 - "$WORK/source" "$MNT" <<'PY'
import concurrent.futures, hashlib, os, random, sys, time
src, mnt = sys.argv[1], sys.argv[2]
files = [os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(os.path.join(src, "train")) for f in fs]
random.Random(1).shuffle(files)
def read(rel):
    with open(os.path.join(mnt, rel), "rb") as f:
        got = f.read()
    with open(os.path.join(src, rel), "rb") as f:
        want = f.read()
    return len(got), got == want
t = time.time()
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(read, files))
dt = time.time() - t
bad = sum(1 for _, ok in results if not ok)
print(f"epoch: {len(files)} samples, {sum(n for n, _ in results) / 2**20:.0f} MiB in {dt:.2f}s: {len(files) / dt:.0f} samples/s, {bad} mismatches")
sys.exit(1 if bad else 0)
PY
echo "== streaming the shards through the mount"
start_ns=$(date +%s%N)
total=$(cat "$MNT"/shards/* | wc -c)
end_ns=$(date +%s%N)
python3 -c "import sys; b,ns=int(sys.argv[1]),int(sys.argv[2]); print(f'read {b/2**20:.0f} MiB of shards through the mount in {ns/1e9:.2f}s: {b/1e6/(ns/1e9):.0f} MB/s')" "$total" "$((end_ns - start_ns))"
for f in "$WORK"/source/shards/*; do
    cmp "$f" "$MNT/shards/$(basename "$f")" || { echo "demo FAILED: $f differs through the mount" >&2; exit 1; }
done

CKPT=$WORK/ckpt; mkdir -p "$CKPT"
rm -rf "$WORK/checkpoints" "$WORK/writeback"; mkdir -p "$WORK/checkpoints"
echo "== checkpoint volume at $CKPT: writes land in $WORK/writeback, uploaded to fs://$WORK/checkpoints"
"$BIN" mount --checkpoint --target "fs://$WORK/checkpoints" --writeback-dir "$WORK/writeback" \
    --writeback-size 4GiB --commit-marker .metadata --keep-last 2 \
    --daemon --log-file "$WORK/checkpoint.log" "$CKPT"
GRANARY_MOUNTS+=("$CKPT")
python3 - "$CKPT" "$WORK/checkpoints" <<'PY'
import hashlib, os, sys, time
mnt, store = sys.argv[1], sys.argv[2]
step = os.path.join(mnt, "step_100")
os.makedirs(step)
written = {}
t = time.monotonic()
for rank in range(4):  # a DCP-like checkpoint: one shard per rank, then .metadata
    data = os.urandom(64 << 20)
    with open(os.path.join(step, f"__{rank}_0.distcp"), "wb") as f:
        f.write(data)
    written[f"__{rank}_0.distcp"] = hashlib.sha256(data).hexdigest()
with open(os.path.join(step, ".metadata.tmp"), "wb") as f:
    f.write(b"checkpoint metadata")
os.rename(os.path.join(step, ".metadata.tmp"), os.path.join(step, ".metadata"))
closed = time.monotonic() - t
print(f"wrote 256 MiB of checkpoint; every close() returned after {closed:.2f}s in total")
while not os.path.exists(os.path.join(store, "step_100", ".metadata")):
    time.sleep(0.05)
print(f"committed in the store after {time.monotonic() - t:.2f}s (marker last)")
for name, digest in written.items():
    with open(os.path.join(store, "step_100", name), "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != digest:
            sys.exit(f"demo FAILED: {name} differs in the store")
if os.path.exists(os.path.join(store, "step_100", ".metadata.tmp")):
    sys.exit("demo FAILED: the temporary name is still in the store")
t = time.monotonic()
for name, digest in written.items():
    with open(os.path.join(step, name), "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != digest:
            sys.exit(f"demo FAILED: {name} differs on restore")
print(f"restored 256 MiB through the volume (local copy) at {256 * 1.048576 / (time.monotonic() - t):.0f} MB/s; checksums equal")
PY
echo "demo OK (files in $WORK)"
