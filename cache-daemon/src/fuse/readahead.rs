//! Adaptive readahead for one open file: the window doubles while reads are sequential and
//! drops to nothing on a random read, so streamed shards are fetched ahead while shuffled
//! sample reads fetch only what is asked.

/// The readahead state of one open file handle.
#[derive(Debug)]
pub struct Readahead {
    /// Where the last read ended.
    next_offset: u64,
    /// Bytes to fetch beyond the current read.
    window: u64,
    min_window: u64,
    max_window: u64,
    /// Bytes read so far; a first read from offset 0 counts as sequential.
    reads: u64,
}

impl Readahead {
    pub fn new(min_window: u64, max_window: u64) -> Self {
        Readahead {
            next_offset: 0,
            window: 0,
            min_window,
            max_window: max_window.max(min_window),
            reads: 0,
        }
    }

    /// Records a read of `len` bytes at `offset` and returns the byte range to fetch ahead of
    /// it (empty when the access looks random).
    pub fn on_read(&mut self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(len);
        let sequential = offset == self.next_offset;
        self.reads += 1;
        self.window = if sequential {
            // The first read of a file gets no readahead: most files are read whole by one
            // read, and a shuffled epoch opens many of them.
            if self.reads == 1 {
                0
            } else {
                (self.window * 2).clamp(self.min_window, self.max_window)
            }
        } else {
            0
        };
        self.next_offset = end;
        end..end.saturating_add(self.window)
    }

    #[cfg(test)]
    pub fn window(&self) -> u64 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_window_grows_on_sequential_reads_and_collapses_on_random_ones() {
        let mut ra = Readahead::new(4 * MIB, 64 * MIB);
        assert!(
            ra.on_read(0, MIB).is_empty(),
            "one read of a file fetches nothing extra"
        );
        let mut last = 0;
        for i in 1..8 {
            let ahead = ra.on_read(i * MIB, MIB);
            assert_eq!(ahead.start, (i + 1) * MIB);
            assert!(ra.window() >= last, "sequential reads never shrink the window");
            last = ra.window();
        }
        assert_eq!(ra.window(), 64 * MIB, "capped at the maximum");
        assert!(ra.on_read(500 * MIB, MIB).is_empty(), "a jump is random: no readahead");
        assert_eq!(
            ra.on_read(501 * MIB, MIB).end - 502 * MIB,
            4 * MIB,
            "and regrows from the minimum"
        );
    }
}
