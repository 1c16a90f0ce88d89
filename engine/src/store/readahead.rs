//! Sharing a list of chunks among worker threads in batches, with the
//! store told a few batches ahead what will be read ([`super::FastPaths::prefetch`]).
//!
//! Restore and verify both walk a long list of digests on every core; each
//! worker claims the next batch, and whoever claims a batch asks the store
//! for the one `ahead` batches further, so reading (a cold pack, a store
//! server's answer) overlaps the decoding of the batches in between.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::digest::ChunkDigest;

/// Batches of a digest list, claimed by workers, prefetched ahead.
pub struct ReadAhead<'a> {
    /// The store's prefetch ([`super::FastPaths::prefetch`]).
    prefetch: &'a (dyn Fn(&[ChunkDigest]) + Sync),
    list: &'a [ChunkDigest],
    batch: usize,
    ahead: usize,
    next: AtomicUsize,
}

impl<'a> ReadAhead<'a> {
    /// Batches of `batch` digests of `list`, `ahead` batches handed to
    /// `prefetch` beyond the ones being worked on; the first `ahead + 1`
    /// batches are handed over now.
    pub fn new(
        prefetch: &'a (dyn Fn(&[ChunkDigest]) + Sync),
        list: &'a [ChunkDigest],
        batch: usize,
        ahead: usize,
    ) -> ReadAhead<'a> {
        let r = ReadAhead {
            prefetch,
            list,
            batch: batch.max(1),
            ahead,
            next: AtomicUsize::new(0),
        };
        r.prefetch(0..r.batch * (ahead + 1));
        r
    }

    /// The next unclaimed batch, as a range of the list; `None` when every
    /// batch is taken.
    pub fn claim(&self) -> Option<Range<usize>> {
        let first = self.next.fetch_add(self.batch, Ordering::Relaxed);
        if first >= self.list.len() {
            return None;
        }
        let ahead = first + self.batch * (self.ahead + 1);
        self.prefetch(ahead..ahead + self.batch);
        Some(first..(first + self.batch).min(self.list.len()))
    }

    /// Prefetches the non-zero digests of `range` (clipped).
    fn prefetch(&self, range: Range<usize>) {
        let end = range.end.min(self.list.len());
        if range.start >= end {
            return;
        }
        let part = &self.list[range.start..end];
        if part.iter().any(ChunkDigest::is_zero) {
            let wanted: Vec<ChunkDigest> = part.iter().filter(|d| !d.is_zero()).copied().collect();
            if !wanted.is_empty() {
                (self.prefetch)(&wanted);
            }
        } else {
            (self.prefetch)(part);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn d(i: u8) -> ChunkDigest {
        ChunkDigest([i; 32])
    }

    #[test]
    fn every_batch_is_claimed_once_and_prefetched_ahead_without_zeroes() {
        let asked = Mutex::new(Vec::new());
        let record = |ds: &[ChunkDigest]| asked.lock().unwrap().extend_from_slice(ds);
        let list: Vec<ChunkDigest> = (0..10)
            .map(|i| if i == 4 { ChunkDigest::ZERO } else { d(i + 1) })
            .collect();
        let r = ReadAhead::new(&record, &list, 3, 1);
        // The first two batches at once, minus the zero marker.
        assert_eq!(*asked.lock().unwrap(), [d(1), d(2), d(3), d(4), d(6)]);
        assert_eq!(r.claim(), Some(0..3));
        assert_eq!(asked.lock().unwrap()[5..], [d(7), d(8), d(9)]);
        assert_eq!(r.claim(), Some(3..6));
        assert_eq!(r.claim(), Some(6..9));
        assert_eq!(r.claim(), Some(9..10));
        assert_eq!(r.claim(), None);
        assert_eq!(asked.lock().unwrap().len(), 9, "the last batch once");
    }
}
