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
    /// Bytes of the current run of back-to-back reads.
    run: u64,
    /// How far readahead of this run has been asked for already.
    issued_to: u64,
}

/// What one read asks of readahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ahead {
    /// Bytes to start fetching now: the window beyond this read, less what earlier reads of
    /// the run asked for already.
    pub fetch: std::ops::Range<u64>,
    /// The read is part of a stream (readahead is running for it).
    pub streaming: bool,
}

impl Readahead {
    pub fn new(min_window: u64, max_window: u64) -> Self {
        Readahead {
            next_offset: 0,
            window: 0,
            min_window,
            max_window: max_window.max(min_window),
            run: 0,
            issued_to: 0,
        }
    }

    /// Records a read of `len` bytes at `offset` and returns what to fetch ahead of it
    /// (nothing when the access does not look like streaming).
    ///
    /// The kernel cuts one large application read into back-to-back requests of 128 KiB, so
    /// a 1 MiB random read looks sequential for a moment. Readahead starts only once a run of
    /// back-to-back reads has covered a whole window's minimum (a block); shuffled reads of
    /// samples and random 1 MiB reads never get there and fetch only what they ask.
    pub fn on_read(&mut self, offset: u64, len: u64) -> Ahead {
        let end = offset.saturating_add(len);
        if offset == self.next_offset && self.run > 0 {
            self.run = self.run.saturating_add(len);
        } else {
            self.run = len;
            self.window = 0;
            self.issued_to = 0;
        }
        self.next_offset = end;
        let streaming = self.run >= self.min_window.max(1);
        if streaming {
            self.window = (self.window * 2).clamp(self.min_window, self.max_window);
        }
        let until = end.saturating_add(self.window);
        let from = end.max(self.issued_to).min(until);
        self.issued_to = self.issued_to.max(until);
        Ahead {
            fetch: from..until,
            streaming,
        }
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
    fn the_window_grows_on_streaming_and_stays_shut_on_random_reads() {
        let mut ra = Readahead::new(4 * MIB, 64 * MIB);
        // A 1 MiB random read arrives as 8 back-to-back 128 KiB requests: no readahead.
        for piece in 0..8 {
            assert!(ra.on_read(100 * MIB + piece * (MIB / 8), MIB / 8).fetch.is_empty());
        }
        assert!(ra.on_read(7 * MIB, MIB / 8).fetch.is_empty(), "a jump starts over");
        // Streaming from the start: readahead once a block's worth was read back to back.
        let mut ra = Readahead::new(4 * MIB, 64 * MIB);
        for i in 0..3 {
            assert!(ra.on_read(i * MIB, MIB).fetch.is_empty());
        }
        let ahead = ra.on_read(3 * MIB, MIB);
        assert_eq!(ahead.fetch, 4 * MIB..8 * MIB);
        let mut last = ra.window();
        for i in 4..12 {
            let ahead = ra.on_read(i * MIB, MIB);
            assert!(ra.window() >= last, "streaming never shrinks the window");
            last = ra.window();
            // Each read asks only for what lies beyond what was asked before.
            assert!(
                ahead.fetch.start >= 8 * MIB,
                "{ahead:?} asks again for bytes already asked for"
            );
        }
        assert_eq!(ra.window(), 64 * MIB, "capped at the maximum");
        let jump = ra.on_read(500 * MIB, MIB);
        assert!(
            jump.fetch.is_empty() && !jump.streaming,
            "a jump is random: no readahead"
        );
    }
}
