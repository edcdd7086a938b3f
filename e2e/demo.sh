#!/usr/bin/env bash
# The main job on an embedded default: a local source directory with generated data, two
# cache workers with memory and disk tiers, a prewarm with progress, then a read of every
# file through the workers with a checksum check, and the read throughput.
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
echo "demo OK (files in $WORK)"
