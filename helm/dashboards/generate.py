#!/usr/bin/env python3
"""Writes the chart's Grafana dashboards (helm/granary/dashboards/*.json) from the panel
lists below. Every query uses only metrics the components export (README, "Metrics"); the
e2e suite (e2e/tests/data_plane.rs) runs each one against a real Prometheus scraping real
daemons and fails on a query that does not parse or returns no series.

    python3 helm/dashboards/generate.py           # rewrite the JSON
    python3 helm/dashboards/generate.py --check   # fail if the JSON is stale (make test)

Variables: $dataset (a Dataset's workers, label `dataset`), $node (node daemons and
granary-csi, label `node`); the chart's PodMonitor sets both labels from the pods.
"""
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "granary" / "dashboards"
RATE = "$__rate_interval"


def rate(metric, sel="", by=None, fn="rate"):
    inner = f"{fn}({metric}{{{sel}}}[{RATE}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def quantile(q, metric, sel, by):
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{RATE}])))"


def panel(title, unit, targets, description, kind="timeseries"):
    return {"title": title, "unit": unit, "targets": targets, "description": description, "type": kind}


DS = 'dataset=~"$dataset"'
NODE = 'node=~"$node"'

DASHBOARDS = {
    "granary-dataset": {
        "title": "Granary / Dataset",
        "variables": [("dataset", "label_values(granary_cache_hits_total, dataset)")],
        "panels": [
            panel("Hit ratio", "percentunit", [
                (f"{rate('granary_cache_hits_total', DS)} / ({rate('granary_cache_hits_total', DS)} + {rate('granary_cache_misses_total', DS)})", "hits"),
            ], "Blocks answered from a cache tier, of all block reads the workers served."),
            panel("Bytes served per tier", "Bps", [
                (rate("granary_cache_served_bytes_total", DS, "tier"), "{{tier}}"),
            ], "Bytes the workers served, by where they came from: memory, disk or the source store."),
            panel("Source store reads", "Bps", [
                (rate("granary_source_read_bytes_total", DS), "bytes read"),
                (rate("granary_source_reads_total", DS, fn="rate"), "reads/s"),
            ], "What the cache cost the source store: bytes and requests."),
            panel("Prewarm progress", "percentunit", [
                (f'sum(granary_prewarm_bytes{{{DS}, state="done"}}) / sum(granary_prewarm_bytes{{{DS}, state="total"}})', "bytes done"),
                (f'sum(granary_prewarm_files{{{DS}, state="failed"}})', "files failed"),
            ], "The last prewarm (Load) over the Dataset's workers: share of bytes loaded, files that failed."),
            panel("Read latency by worker (p50, p99)", "s", [
                (quantile(0.5, "granary_worker_request_duration_seconds", f'{DS}, method="read_block"', "instance"), "p50 {{instance}}"),
                (quantile(0.99, "granary_worker_request_duration_seconds", f'{DS}, method="read_block"', "instance"), "p99 {{instance}}"),
            ], "Time a worker took to answer one block read."),
            panel("Cache used / capacity", "bytes", [
                (f"sum by (tier) (granary_cache_used_bytes{{{DS}}})", "used {{tier}}"),
                (f"sum by (tier) (granary_cache_capacity_bytes{{{DS}}})", "capacity {{tier}}"),
            ], "Bytes held per tier against its size."),
        ],
    },
    "granary-node": {
        "title": "Granary / Node and FUSE",
        "variables": [("node", "label_values(granary_node_mounts, node)")],
        "panels": [
            panel("FUSE operations by kind", "ops", [
                (rate("granary_fuse_ops_total", NODE, "op"), "{{op}}"),
            ], "Operations the node daemon answered, by kind."),
            panel("FUSE latency by kind (p50, p99)", "s", [
                (quantile(0.5, "granary_fuse_op_duration_seconds", NODE, "op"), "p50 {{op}}"),
                (quantile(0.99, "granary_fuse_op_duration_seconds", NODE, "op"), "p99 {{op}}"),
            ], "Time the daemon took to answer one operation."),
            panel("Passthrough share of opens", "percentunit", [
                (f'{rate("granary_fuse_opens_total", NODE + ", origin=" + chr(34) + "passthrough" + chr(34))} / {rate("granary_fuse_opens_total", NODE)}', "passthrough"),
            ], "Opens the kernel serves from a local file with no trip through the daemon (FUSE passthrough)."),
            panel("Bytes into the daemon by origin", "Bps", [
                (rate("granary_fuse_read_bytes_total", NODE, "origin"), "{{origin}}"),
            ], "Block bytes brought in: node-local cache, short circuit, workers, or the source store."),
            panel("Fallback reads", "ops", [
                (rate("granary_fuse_fallback_reads_total", NODE), "blocks from the source"),
            ], "Blocks read from the source directly because the workers were unreachable."),
            panel("Mounts", "short", [
                (f"sum by (node) (granary_node_mounts{{{NODE}}})", "{{node}}"),
            ], "FUSE mounts the node daemon serves.", "stat"),
            panel("Memory under the budget", "bytes", [
                (f"sum by (node) (granary_fuse_memory_used_bytes{{{NODE}}})", "used {{node}}"),
                (f"sum by (node) (granary_fuse_memory_limit_bytes{{{NODE}}})", "limit {{node}}"),
            ], "Bytes held under --max-memory."),
            panel("CSI calls", "ops", [
                (rate("granary_csi_calls_total", NODE, "method, code"), "{{method}} {{code}}"),
                (quantile(0.99, "granary_csi_call_duration_seconds", NODE, "method"), "p99 {{method}}"),
            ], "The kubelet's calls to granary-csi by outcome; a slow NodePublishVolume is a pod stuck in ContainerCreating."),
        ],
    },
    "granary-checkpoints": {
        "title": "Granary / Checkpoints",
        "variables": [("node", "label_values(granary_node_mounts, node)")],
        "panels": [
            panel("Pending bytes", "bytes", [
                (f"sum by (target) (granary_checkpoint_pending_bytes{{{NODE}}})", "{{target}}"),
            ], "Bytes of closed files not yet in the target store."),
            panel("Oldest pending file's age", "s", [
                (f"max by (target) (granary_checkpoint_oldest_pending_seconds{{{NODE}}})", "{{target}}"),
            ], "How far the store is behind the training job."),
            panel("Upload throughput", "Bps", [
                (rate("granary_checkpoint_uploaded_bytes_total", NODE), "uploaded"),
            ], "Bytes uploaded to the target stores."),
            panel("Commit latency (p50, p99)", "s", [
                (quantile(0.5, "granary_checkpoint_commit_latency_seconds", NODE, "node"), "p50 {{node}}"),
                (quantile(0.99, "granary_checkpoint_commit_latency_seconds", NODE, "node"), "p99 {{node}}"),
            ], "From the commit marker's close to the checkpoint committed in the store."),
            panel("Upload retries", "ops", [
                (rate("granary_checkpoint_upload_retries_total", NODE), "retries"),
            ], "Uploads and deletes that failed and were retried with backoff."),
            panel("Write-back area", "bytes", [
                (f"sum by (target) (granary_checkpoint_writeback_used_bytes{{{NODE}}})", "used {{target}}"),
                (f"sum by (target) (granary_checkpoint_writeback_limit_bytes{{{NODE}}})", "limit {{target}}"),
            ], "Local bytes held for checkpoint volumes against their size; writes wait when it is full."),
            panel("Commits and backpressure", "ops", [
                (rate("granary_checkpoint_commits_total", NODE), "commits"),
                (rate("granary_checkpoint_write_waits_total", NODE), "writes that waited"),
            ], "Checkpoints committed, and writes that waited for room in the write-back area."),
        ],
    },
    "granary-operator": {
        "title": "Granary / Operator",
        "variables": [],
        "panels": [
            panel("Reconciles", "ops", [
                (rate("granary_operator_reconciles_total", "", "kind, result"), "{{kind}} {{result}}"),
            ], "Reconciles by resource kind and result."),
            panel("Reconcile errors", "ops", [
                (rate("granary_operator_reconciles_total", 'result="error"', "kind"), "{{kind}}"),
            ], "Failed reconciles; each is retried with backoff."),
            panel("Retry queue", "short", [
                ("sum(granary_operator_failing_objects)", "objects awaiting a retry"),
            ], "Objects whose last reconcile failed, queued for a retry.", "stat"),
            panel("Reconcile duration (p99)", "s", [
                (quantile(0.99, "granary_operator_reconcile_duration_seconds", "", "kind"), "{{kind}}"),
            ], "Time one reconcile took."),
            panel("Leader", "short", [
                ("max(granary_operator_leader)", "leader"),
            ], "1 while a replica holds the leader Lease.", "stat"),
        ],
    },
}


def build(uid, spec):
    panels = []
    for i, p in enumerate(spec["panels"]):
        panels.append({
            "id": i + 1,
            "type": p["type"],
            "title": p["title"],
            "description": p["description"],
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
            "options": {},
            "targets": [
                {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                 "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                for j, (expr, legend) in enumerate(p["targets"])
            ],
        })
    variables = [{
        "name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
        "current": {}, "hide": 0,
    }]
    for name, query in spec["variables"]:
        variables.append({
            "name": name, "type": "query", "label": name.capitalize(),
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query,
            "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "current": {}, "hide": 0,
        })
    return {
        "uid": uid,
        "title": spec["title"],
        "tags": ["granary"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": variables},
        "panels": panels,
    }


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    OUT.mkdir(parents=True, exist_ok=True)
    for uid, spec in DASHBOARDS.items():
        text = json.dumps(build(uid, spec), indent=2) + "\n"
        path = OUT / f"{uid}.json"
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        sys.exit("stale dashboards: " + ", ".join(stale) + "; run python3 helm/dashboards/generate.py")


if __name__ == "__main__":
    main()
