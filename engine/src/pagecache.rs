//! Decoded index pages kept between backups. An incremental backup starts
//! from its base's pages, which the previous backup of the disk wrote
//! moments (or hours) ago; keeping them decoded saves reading, checking and
//! decoding them again, and from a store server, downloading them (2 MiB
//! and a round trip for a 4 GiB disk). Pages are keyed by their digest, so
//! an entry can never be stale: the same digest is the same page.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::digest::ChunkDigest;
use crate::ids::DiskName;

/// A decoded index page.
pub type Page = Arc<Vec<ChunkDigest>>;

/// Most bytes of decoded pages kept in all (a 4 GiB disk's index is
/// 2 MiB); past it, other disks' pages are dropped first, and a disk whose
/// index alone is larger keeps none.
pub const BUDGET: usize = 64 << 20;

/// The pages of each disk's last snapshot (module doc).
#[derive(Debug, Default)]
pub struct PageCache {
    disks: Mutex<HashMap<DiskName, HashMap<ChunkDigest, Page>>>,
}

fn bytes(pages: &HashMap<ChunkDigest, Page>) -> usize {
    pages.values().map(|p| p.len() * 32).sum()
}

impl PageCache {
    /// The decoded page `digest` of `disk`, if kept.
    pub fn get(&self, disk: &DiskName, digest: &ChunkDigest) -> Option<Page> {
        self.lock().get(disk)?.get(digest).cloned()
    }

    /// Records `disk`'s new snapshot, whose index pages are `index`:
    /// `written` are the pages its backup built (by digest); the disk's
    /// earlier pages that `index` still names are kept with them.
    pub fn keep(&self, disk: &DiskName, index: &[ChunkDigest], written: Vec<(ChunkDigest, Page)>) {
        let mut disks = self.lock();
        let mut pages: HashMap<ChunkDigest, Page> = written.into_iter().collect();
        if let Some(old) = disks.remove(disk) {
            let named: std::collections::HashSet<&ChunkDigest> = index.iter().collect();
            for (d, p) in old {
                if named.contains(&d) {
                    pages.entry(d).or_insert(p);
                }
            }
        }
        let size = bytes(&pages);
        if size > BUDGET {
            return;
        }
        let mut total: usize = disks.values().map(bytes).sum();
        while total + size > BUDGET {
            let Some(other) = disks.keys().next().cloned() else {
                break;
            };
            total -= disks.remove(&other).map_or(0, |p| bytes(&p));
        }
        disks.insert(disk.clone(), pages);
    }

    /// Forgets `disk` (its pages are not trusted, e.g. after a failure).
    pub fn forget(&self, disk: &DiskName) {
        self.lock().remove(disk);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DiskName, HashMap<ChunkDigest, Page>>> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(n: u8, len: usize) -> (ChunkDigest, Page) {
        let p: Vec<ChunkDigest> = (0..len).map(|i| ChunkDigest::of(&[n, i as u8])).collect();
        (ChunkDigest::of(&[n, 255, 255]), Arc::new(p))
    }

    #[test]
    fn keeps_what_the_new_index_names_and_drops_the_rest() {
        let c = PageCache::default();
        let disk: DiskName = "vm".parse().unwrap();
        let (a, b, x) = (page(1, 4), page(2, 4), page(3, 4));
        c.keep(&disk, &[a.0, b.0], vec![a.clone(), b.clone()]);
        assert_eq!(c.get(&disk, &a.0).unwrap(), a.1);
        // Page b was rewritten as x; a is unchanged and still named.
        c.keep(&disk, &[a.0, x.0], vec![x.clone()]);
        assert_eq!(c.get(&disk, &a.0).unwrap(), a.1);
        assert_eq!(c.get(&disk, &x.0).unwrap(), x.1);
        assert!(c.get(&disk, &b.0).is_none());
        assert!(c.get(&"other".parse().unwrap(), &a.0).is_none());
        c.forget(&disk);
        assert!(c.get(&disk, &a.0).is_none());
    }

    #[test]
    fn stays_within_its_budget() {
        let c = PageCache::default();
        let per_page = BUDGET / 32 / 3;
        let one: DiskName = "one".parse().unwrap();
        let two: DiskName = "two".parse().unwrap();
        let p1 = page(1, per_page);
        let p2 = page(2, per_page);
        c.keep(&one, &[p1.0], vec![p1.clone()]);
        c.keep(&two, &[p2.0, p1.0], vec![p2.clone(), page(3, per_page)]);
        // Three thirds fit; a fourth page drops the other disk.
        assert!(c.get(&one, &p1.0).is_some());
        c.keep(
            &two,
            &[p2.0],
            vec![p2.clone(), page(4, per_page), page(5, per_page)],
        );
        assert!(c.get(&one, &p1.0).is_none());
        assert!(c.get(&two, &p2.0).is_some());
        // A disk whose index alone is too big keeps nothing.
        let big = page(6, BUDGET / 32 + 1);
        c.keep(&one, &[big.0], vec![big]);
        assert!(c.get(&one, &p1.0).is_none());
    }
}
