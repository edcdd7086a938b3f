//! The order of committed checkpoints, and which of them retention deletes: the newest N are
//! kept, by the marker's time, then by step number in the name. The deleting itself, which
//! must know what is still pending locally, is the checkpoint filesystem's.

use std::cmp::Ordering;

use crate::target::Committed;

/// Compares names so that "step_9" sorts before "step_10".
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    while !a.is_empty() && !b.is_empty() {
        if a[0].is_ascii_digit() && b[0].is_ascii_digit() {
            let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
            let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
            let (na, nb) = (&a[..da], &b[..db]);
            let (ta, tb) = (trim_zeros(na), trim_zeros(nb));
            let ord = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb));
            if ord != Ordering::Equal {
                return ord;
            }
            a = &a[da..];
            b = &b[db..];
        } else {
            if a[0] != b[0] {
                return a[0].cmp(&b[0]);
            }
            a = &a[1..];
            b = &b[1..];
        }
    }
    a.len().cmp(&b.len())
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|c| **c == b'0').count();
    &digits[zeros.min(digits.len().saturating_sub(1))..]
}

/// Committed checkpoints oldest first: by the marker's time, then by name (stores keep
/// times to the second, and checkpoint names carry their step).
pub fn oldest_first(mut committed: Vec<Committed>) -> Vec<Committed> {
    committed.sort_by(|a, b| a.modified.cmp(&b.modified).then_with(|| natural_cmp(&a.dir, &b.dir)));
    committed
}

/// Which checkpoints to delete so that `keep_last` remain.
pub fn to_delete(committed: Vec<Committed>, keep_last: usize) -> Vec<Committed> {
    let sorted = oldest_first(committed);
    let excess = sorted.len().saturating_sub(keep_last);
    sorted.into_iter().take(excess).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn c(dir: &str, secs: u64) -> Committed {
        Committed {
            dir: dir.into(),
            modified: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
        }
    }

    #[test]
    fn step_numbers_sort_as_numbers() {
        assert_eq!(natural_cmp("step_9", "step_10"), Ordering::Less);
        assert_eq!(natural_cmp("step_010", "step_10"), Ordering::Equal);
        assert_eq!(natural_cmp("a", "b"), Ordering::Less);
        assert_eq!(natural_cmp("ckpt-2/x", "ckpt-2"), Ordering::Greater);
    }

    #[test]
    fn the_newest_n_are_kept_ties_broken_by_step() {
        let all = vec![c("step_10", 5), c("step_9", 5), c("step_8", 4), c("step_11", 6)];
        let gone: Vec<String> = to_delete(all.clone(), 2).into_iter().map(|c| c.dir).collect();
        assert_eq!(gone, vec!["step_8", "step_9"]);
        assert!(to_delete(all.clone(), 4).is_empty());
        assert!(to_delete(all, 10).is_empty());
    }
}
