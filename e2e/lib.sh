# Helpers shared by the demo and bench scripts: free ports, background processes cleaned up
# on exit, waiting for a worker to answer.

GRANARY_PIDS=()
GRANARY_MOUNTS=()

cleanup() {
    for m in "${GRANARY_MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
    for pid in "${GRANARY_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# start LOGFILE CMD...: runs CMD in the background, logging to LOGFILE.
start() {
    local log=$1; shift
    "$@" >"$log" 2>&1 &
    GRANARY_PIDS+=($!)
}

# wait_for_workers BIN WORKERS: until every worker answers stats (10 s at most).
wait_for_workers() {
    local bin=$1 workers=$2
    for _ in $(seq 1 100); do
        if "$bin" stats --workers "$workers" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "workers $workers did not come up; logs:" >&2
    tail -n 20 "$WORK"/*.log >&2
    return 1
}
