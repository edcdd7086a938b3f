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

# store_netns NS LINK: a network namespace NS reached over a veth pair rate-limited to LINK
# (htb, both directions), 10.231.0.1 here and 10.231.0.2 inside; removed on exit.
store_netns() {
    STORE_NS=$1
    local ns=$1 link=$2
    ip netns add "$ns"
    cleanup_net() { ip netns del "$STORE_NS" 2>/dev/null || true; ip link del "veth-$$" 2>/dev/null || true; }
    trap 'cleanup; cleanup_net' EXIT
    ip link add "veth-$$" type veth peer name "vethns-$$"
    ip link set "vethns-$$" netns "$ns"
    ip addr add 10.231.0.1/24 dev "veth-$$"; ip link set "veth-$$" up
    ip netns exec "$ns" ip addr add 10.231.0.2/24 dev "vethns-$$"
    ip netns exec "$ns" ip link set "vethns-$$" up
    ip netns exec "$ns" ip link set lo up
    tc qdisc add dev "veth-$$" root handle 1: htb default 10
    tc class add dev "veth-$$" parent 1: classid 1:10 htb rate "$link"
    ip netns exec "$ns" tc qdisc add dev "vethns-$$" root handle 1: htb default 10
    ip netns exec "$ns" tc class add dev "vethns-$$" parent 1: classid 1:10 htb rate "$link"
}
