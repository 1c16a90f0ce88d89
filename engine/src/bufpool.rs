//! Buffers kept from one backup for the next. On this machine type (a
//! Firecracker microVM with free page reporting) memory the process gives
//! back goes to the host, and touching it again costs a page fault and a
//! cleared page each 4 KiB. A backup that allocated its read buffers and
//! chunk files afresh would pay that for every one (benches/RESULTS.md,
//! "Plan and pipeline").
//! The two pools here keep at most [`POOL_BYTES`] each, so an idle agent
//! holds that much more memory and no more.

use std::sync::Mutex;

/// Most bytes a pool keeps (capacity, summed over its buffers): a full
/// backup's read buffers in flight at 64 KiB chunks, or the chunk files
/// of the upload batches queued for a store server.
pub const POOL_BYTES: usize = 16 << 20;

/// A pool of byte buffers, last in, first out.
#[derive(Debug)]
pub struct BufPool {
    bufs: Mutex<(Vec<Vec<u8>>, usize)>,
}

/// Read buffers: handed to the reader, given back once a chunk is stored.
pub static READS: BufPool = BufPool::new();
/// Chunk files: made by the encoder, given back once the store holds them.
pub static FILES: BufPool = BufPool::new();

impl BufPool {
    /// An empty pool.
    pub const fn new() -> BufPool {
        BufPool {
            bufs: Mutex::new((Vec::new(), 0)),
        }
    }

    fn pop(&self) -> Option<Vec<u8>> {
        let mut g = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        let b = g.0.pop()?;
        g.1 -= b.capacity();
        Some(b)
    }

    /// A buffer of exactly `len` bytes, for a read to overwrite: a kept
    /// one keeps its stale contents where it is long enough.
    pub fn take_len(&self, len: usize) -> Vec<u8> {
        match self.pop() {
            Some(mut b) if b.capacity() >= len => {
                if b.len() >= len {
                    b.truncate(len);
                } else {
                    b.resize(len, 0);
                }
                b
            }
            _ => vec![0u8; len],
        }
    }

    /// An empty buffer with room for at least `cap` bytes.
    pub fn take_empty(&self, cap: usize) -> Vec<u8> {
        match self.pop() {
            Some(mut b) if b.capacity() >= cap => {
                b.clear();
                b
            }
            _ => Vec::with_capacity(cap),
        }
    }

    /// Keeps `b` for a later take, unless the pool is full (then it is
    /// freed).
    pub fn give(&self, b: Vec<u8>) {
        let cap = b.capacity();
        if cap == 0 {
            return;
        }
        let mut g = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 + cap <= POOL_BYTES {
            g.1 += cap;
            g.0.push(b);
        }
    }

    /// Bytes kept now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.bufs.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

impl Default for BufPool {
    fn default() -> BufPool {
        BufPool::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_buffer_is_handed_out_again_at_the_asked_size() {
        let p = BufPool::new();
        let mut b = p.take_len(100);
        assert_eq!(b.len(), 100);
        b[0] = 7;
        let at = b.as_ptr();
        p.give(b);
        assert_eq!(p.kept(), 100);
        let again = p.take_len(60);
        assert_eq!((again.len(), again.as_ptr(), again[0]), (60, at, 7));
        p.give(again);
        // Longer than its length, within its capacity: the tail is zeros.
        let longer = p.take_len(100);
        assert_eq!(longer.len(), 100);
        assert!(longer[60..].iter().all(|&x| x == 0));
        p.give(longer);
        // Too small for what is asked: a new one, the small one dropped.
        assert_eq!(p.take_len(200).len(), 200);
        assert_eq!(p.kept(), 0);
    }

    #[test]
    fn an_empty_take_has_room_and_no_stale_bytes() {
        let p = BufPool::new();
        p.give(vec![1u8; 50]);
        let b = p.take_empty(40);
        assert!(b.is_empty() && b.capacity() >= 50);
        assert!(p.take_empty(40).capacity() >= 40);
    }

    #[test]
    fn a_full_pool_frees_what_it_is_given() {
        let p = BufPool::new();
        for _ in 0..(POOL_BYTES >> 20) + 3 {
            p.give(Vec::with_capacity(1 << 20));
        }
        assert!(p.kept() <= POOL_BYTES);
        assert!(p.kept() > POOL_BYTES - (1 << 20));
    }
}
