//! Rendezvous (highest-random-weight) placement of blocks over workers: every client computes
//! the same owners from the same worker list, with no coordination, and removing a worker
//! moves only the blocks it owned.

use crate::block::BlockName;

/// Worker indices ordered from the best owner of `name` to the worst.
pub fn rank<S: AsRef<str>>(workers: &[S], name: &BlockName) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> = workers
        .iter()
        .enumerate()
        .map(|(i, w)| (name.score(w.as_ref()), i))
        .collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The `replicas` owners of a block (all workers when there are fewer).
pub fn owners<S: AsRef<str>>(workers: &[S], name: &BlockName, replicas: usize) -> Vec<usize> {
    let mut ranked = rank(workers, name);
    ranked.truncate(replicas.max(1));
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ds-worker-{i}.ds-workers:7070")).collect()
    }

    #[test]
    fn placement_is_stable_and_spreads_blocks() {
        let ws = workers(4);
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let name = BlockName::of("train/shard.tar", "etag:1", i);
            let first = owners(&ws, &name, 1);
            assert_eq!(first, owners(&ws, &name, 1), "same input, same owner");
            counts[first[0]] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn removing_a_worker_moves_only_its_blocks() {
        let ws = workers(4);
        let fewer: Vec<String> = ws[..3].to_vec();
        for i in 0..1000 {
            let name = BlockName::of("f", "v", i);
            let before = owners(&ws, &name, 1)[0];
            let after = owners(&fewer, &name, 1)[0];
            if before != 3 {
                assert_eq!(before, after);
            }
        }
    }

    #[test]
    fn replicas_are_distinct_top_owners() {
        let ws = workers(5);
        let name = BlockName::of("model.safetensors", "etag:9", 0);
        let three = owners(&ws, &name, 3);
        assert_eq!(three.len(), 3);
        assert_eq!(three[..], rank(&ws, &name)[..3]);
        assert_eq!(owners(&ws, &name, 9).len(), 5);
    }
}
