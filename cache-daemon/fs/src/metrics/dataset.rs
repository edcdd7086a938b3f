//! Metrics of the FUSE filesystem and the node daemon (`granary_fuse_*`, `granary_node_*`).
//! The README's metrics table and the dashboards use exactly these names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabel {
    pub origin: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrnoLabel {
    pub op: &'static str,
    pub errno: i32,
}

pub struct FuseMetrics {
    pub ops: Family<OpLabel, Counter>,
    pub op_duration: Family<OpLabel, Histogram>,
    pub op_errors: Family<ErrnoLabel, Counter>,
    pub read_bytes: Family<OriginLabel, Counter>,
    pub reply_bytes: Counter,
    pub opens: Family<OriginLabel, Counter>,
    pub fallback_reads: Counter,
    pub block_fetches: Family<OriginLabel, Counter>,
    pub reopened_changed: Counter,
    pub prefetched_blocks: Counter,
    pub warmed_ahead: Counter,
    pub memory_used_bytes: Gauge,
    pub memory_limit_bytes: Gauge,
    pub memory_waits: Counter,
    pub metadata_requests: Family<OriginLabel, Counter>,
    pub local_cache_used_bytes: Gauge,
    pub node_fill_bytes: Counter,
    pub node_fills: Family<ResultLabel, Counter>,
    pub mounts: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

impl FuseMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = FuseMetrics {
            ops: Family::default(),
            op_duration: Family::new_with_constructor(|| {
                // 10 µs .. ~5 s
                Histogram::new(exponential_buckets(0.00001, 2.0, 20))
            }),
            op_errors: Family::default(),
            read_bytes: Family::default(),
            reply_bytes: Counter::default(),
            opens: Family::default(),
            fallback_reads: Counter::default(),
            block_fetches: Family::default(),
            reopened_changed: Counter::default(),
            prefetched_blocks: Counter::default(),
            warmed_ahead: Counter::default(),
            memory_used_bytes: Gauge::default(),
            memory_limit_bytes: Gauge::default(),
            memory_waits: Counter::default(),
            metadata_requests: Family::default(),
            local_cache_used_bytes: Gauge::default(),
            node_fill_bytes: Counter::default(),
            node_fills: Family::default(),
            mounts: Gauge::default(),
        };
        // Every origin's series exists from the start: a dashboard's share shows 0, not nothing.
        for origin in ["passthrough", "fuse"] {
            let _ = m.opens.get_or_create(&OriginLabel { origin });
        }
        for origin in ["local", "short_circuit", "worker", "source"] {
            let _ = m.read_bytes.get_or_create(&OriginLabel { origin });
        }
        for result in ["complete", "no_room", "failed"] {
            let _ = m.node_fills.get_or_create(&ResultLabel { result });
        }
        let r = registry;
        r.register(
            "granary_fuse_node_fill_bytes",
            "Bytes written into the node-local cache by loads onto the node (granary-cache load --mount)",
            m.node_fill_bytes.clone(),
        );
        r.register(
            "granary_fuse_node_fills",
            "Files a load onto the node asked for, by result: complete (on the node now or before), no_room (stays on the workers), failed",
            m.node_fills.clone(),
        );
        r.register("granary_fuse_ops", "FUSE operations, by kind", m.ops.clone());
        r.register(
            "granary_fuse_op_duration_seconds",
            "FUSE operation latency, by kind",
            m.op_duration.clone(),
        );
        r.register(
            "granary_fuse_op_errors",
            "FUSE operations answered with an error, by kind and errno",
            m.op_errors.clone(),
        );
        r.register(
            "granary_fuse_read_bytes",
            "Block bytes brought into the daemon, by where they came from: local, short_circuit, worker, source",
            m.read_bytes.clone(),
        );
        r.register(
            "granary_fuse_reply_bytes",
            "Bytes given to readers through the daemon (passthrough reads do not pass through it)",
            m.reply_bytes.clone(),
        );
        r.register(
            "granary_fuse_opens",
            "File opens, by how they are served: passthrough (the kernel reads a local file) or fuse",
            m.opens.clone(),
        );
        r.register(
            "granary_fuse_fallback_reads",
            "Blocks read from the source store directly because the workers were unreachable",
            m.fallback_reads.clone(),
        );
        r.register(
            "granary_fuse_block_fetches",
            "Blocks the mount fetched into memory, by where they came from (a block read twice by one sequential reader counts twice)",
            m.block_fetches.clone(),
        );
        r.register(
            "granary_fuse_reopened_changed",
            "Open files moved to a file's new version at their first read, because the version their open saw was gone from the store",
            m.reopened_changed.clone(),
        );
        r.register(
            "granary_fuse_prefetched_blocks",
            "Blocks fetched ahead of the reader by adaptive readahead",
            m.prefetched_blocks.clone(),
        );
        r.register(
            "granary_fuse_warmed_ahead",
            "Small files the workers were asked to fetch ahead of an epoch-like scan of their directory",
            m.warmed_ahead.clone(),
        );
        r.register(
            "granary_fuse_memory_used_bytes",
            "Bytes held under the --max-memory budget (blocks in flight and cached, metadata)",
            m.memory_used_bytes.clone(),
        );
        r.register(
            "granary_fuse_memory_limit_bytes",
            "The --max-memory budget",
            m.memory_limit_bytes.clone(),
        );
        r.register(
            "granary_fuse_memory_waits",
            "Reads that waited for memory because the budget was exhausted",
            m.memory_waits.clone(),
        );
        r.register(
            "granary_fuse_metadata_requests",
            "Lookups and listings, by where they were answered: cache or remote",
            m.metadata_requests.clone(),
        );
        r.register(
            "granary_fuse_local_cache_used_bytes",
            "Bytes held by the node-local file cache",
            m.local_cache_used_bytes.clone(),
        );
        r.register(
            "granary_node_mounts",
            "FUSE mounts served by this process",
            m.mounts.clone(),
        );
        m
    }
}
