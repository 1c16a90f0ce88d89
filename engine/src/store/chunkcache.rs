//! Chunk files fetched ahead of their reader, until it takes them.
//!
//! Both stores read ahead on threads of their own (a local store with
//! direct reads of its packs, a remote store with batched downloads) while
//! restore and verify decode earlier batches. This is where the fetched
//! files wait: each is handed out once, a reader asking for a chunk still
//! being fetched waits for it instead of fetching it twice, and what a
//! reader that stopped leaves behind is dropped once the cache holds more
//! than its budget.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::digest::ChunkDigest;

#[derive(Default)]
struct State {
    files: HashMap<ChunkDigest, Vec<u8>>,
    bytes: usize,
    /// Asked for and not yet arrived.
    in_flight: HashSet<ChunkDigest>,
}

/// Chunk files fetched ahead (module doc).
pub struct ChunkCache {
    state: Mutex<State>,
    arrived: Condvar,
    budget: usize,
}

impl ChunkCache {
    /// An empty cache holding at most about `budget` bytes.
    pub fn new(budget: usize) -> ChunkCache {
        ChunkCache {
            state: Mutex::default(),
            arrived: Condvar::new(),
            budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the digests of `ask` that are neither here nor on their way
    /// as being fetched, and returns them: the caller must fetch them and
    /// call [`ChunkCache::arrive`], whatever happens.
    pub fn claim(&self, ask: &[ChunkDigest]) -> Vec<ChunkDigest> {
        let mut s = self.lock();
        let new: Vec<ChunkDigest> = ask
            .iter()
            .filter(|d| !s.files.contains_key(d) && !s.in_flight.contains(d))
            .copied()
            .collect();
        s.in_flight.extend(new.iter().copied());
        new
    }

    /// Files what fetching `ask` brought (nothing when it failed: the
    /// reader then reads the chunk itself, which reports the error) and
    /// wakes the readers waiting for it.
    pub fn arrive(&self, ask: &[ChunkDigest], got: Vec<(ChunkDigest, Vec<u8>)>) {
        let mut s = self.lock();
        let mut asked = HashSet::with_capacity(ask.len());
        for d in ask {
            s.in_flight.remove(d);
            asked.insert(d);
        }
        for (d, file) in got {
            if !asked.contains(&d) {
                continue;
            }
            if s.bytes + file.len() > self.budget {
                s.files = HashMap::new();
                s.bytes = 0;
            }
            s.bytes += file.len();
            if let Some(old) = s.files.insert(d, file) {
                s.bytes -= old.len();
            }
        }
        drop(s);
        self.arrived.notify_all();
    }

    /// The file of `d` if it was fetched ahead, waiting while it is on its
    /// way; taken, so memory holds each file once.
    pub fn take(&self, d: &ChunkDigest) -> Option<Vec<u8>> {
        let mut s = self.lock();
        loop {
            if let Some(f) = s.files.remove(d) {
                s.bytes -= f.len();
                return Some(f);
            }
            if !s.in_flight.contains(d) {
                return None;
            }
            s = self.arrived.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Files held, their bytes, and chunks on their way (for tests).
    pub fn held(&self) -> (usize, usize, usize) {
        let s = self.lock();
        (s.files.len(), s.bytes, s.in_flight.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_handed_out_once_and_a_reader_waits_for_one_on_its_way() {
        let c = std::sync::Arc::new(ChunkCache::new(1 << 20));
        let (a, b) = (ChunkDigest::of(b"a"), ChunkDigest::of(b"b"));
        assert_eq!(c.claim(&[a, b]), vec![a, b]);
        assert_eq!(c.claim(&[a, b]), vec![], "already on their way");
        let c2 = c.clone();
        let waiter = std::thread::spawn(move || c2.take(&a));
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.arrive(&[a, b], vec![(a, b"A".to_vec())]);
        assert_eq!(waiter.join().unwrap(), Some(b"A".to_vec()));
        assert_eq!(c.take(&a), None, "taken once");
        assert_eq!(c.take(&b), None, "its fetch brought nothing");
        assert_eq!(c.held(), (0, 0, 0));
    }

    #[test]
    fn a_file_nobody_asked_for_is_not_kept() {
        let c = ChunkCache::new(1 << 20);
        let (a, stray) = (ChunkDigest::of(b"a"), ChunkDigest::of(b"stray"));
        c.claim(&[a]);
        // A server answering more than it was asked.
        c.arrive(&[a], vec![(stray, b"S".to_vec()), (a, b"A".to_vec())]);
        assert_eq!(c.held(), (1, 1, 0));
        assert_eq!(c.take(&stray), None);
        assert_eq!(c.take(&a), Some(b"A".to_vec()));
    }

    #[test]
    fn past_its_budget_the_cache_drops_what_it_holds() {
        let c = ChunkCache::new(10);
        let (a, b) = (ChunkDigest::of(b"a"), ChunkDigest::of(b"b"));
        c.claim(&[a, b]);
        c.arrive(&[a], vec![(a, vec![1; 8])]);
        c.arrive(&[b], vec![(b, vec![2; 8])]);
        assert_eq!(c.held(), (1, 8, 0));
        assert_eq!(c.take(&a), None, "dropped");
        assert_eq!(c.take(&b), Some(vec![2; 8]));
    }
}
