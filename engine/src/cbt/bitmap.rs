//! The dirty bitmap: one bit per block of `granularity` bytes. Bits are kept
//! in `u64` words so that the persistence layer can write back exactly the
//! words a write changed.

use std::ops::Range;

use bitvec::prelude::*;

use super::CbtError;

/// A CBT granularity: a power of two from 4 KiB to 4 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Granularity(u64);

impl Granularity {
    /// The default granularity, 64 KiB.
    pub const DEFAULT: Granularity = Granularity(64 * 1024);
    /// The smallest granularity allowed.
    pub const MIN: u64 = 4 * 1024;
    /// The largest granularity allowed.
    pub const MAX: u64 = 4 * 1024 * 1024;

    /// Validates a granularity in bytes.
    pub fn new(bytes: u64) -> Result<Self, CbtError> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Ok(Granularity(bytes))
        } else {
            Err(CbtError::BadGranularity(bytes))
        }
    }

    /// The granularity in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }
}

impl Default for Granularity {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u64> for Granularity {
    type Error = CbtError;
    fn try_from(v: u64) -> Result<Self, CbtError> {
        Granularity::new(v)
    }
}

impl From<Granularity> for u64 {
    fn from(g: Granularity) -> u64 {
        g.0
    }
}

/// A run of blocks that are all dirty or all clean, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte of the run.
    pub offset: u64,
    /// Length in bytes (the last run is clipped to the image size).
    pub len: u64,
    /// Whether the run is dirty.
    pub dirty: bool,
}

/// One bit per block of an image of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    size: u64,
    granularity: Granularity,
    bits: BitVec<u64, Lsb0>,
}

impl DirtyBitmap {
    /// An all-clean bitmap for an image of `size` bytes.
    pub fn new(size: u64, granularity: Granularity) -> Self {
        let blocks = blocks_for(size, granularity);
        DirtyBitmap {
            size,
            granularity,
            bits: bitvec![u64, Lsb0; 0; blocks],
        }
    }

    /// Rebuilds a bitmap from its words (as returned by [`Self::words`]).
    /// Returns `None` if the word count does not fit the image.
    pub fn from_words(size: u64, granularity: Granularity, words: Vec<u64>) -> Option<Self> {
        let blocks = blocks_for(size, granularity);
        if words.len() != blocks.div_ceil(64) {
            return None;
        }
        let mut bits = BitVec::from_vec(words);
        bits.truncate(blocks);
        Some(DirtyBitmap {
            size,
            granularity,
            bits,
        })
    }

    /// The image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The block size.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.bits.len()
    }

    /// The blocks that the byte range touches, clipped to the image.
    pub fn block_range(&self, offset: u64, len: u64) -> Range<usize> {
        if len == 0 || offset >= self.size {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.size);
        let shift = self.granularity.shift();
        (offset >> shift) as usize..((end - 1) >> shift) as usize + 1
    }

    /// Marks every block the byte range touches. Returns the range of
    /// words that changed (empty if every block was already dirty), which
    /// is what a persistence layer must write back.
    pub fn mark(&mut self, offset: u64, len: u64) -> Range<usize> {
        let blocks = self.block_range(offset, len);
        self.mark_blocks(blocks)
    }

    /// Marks a range of blocks; see [`Self::mark`].
    pub fn mark_blocks(&mut self, blocks: Range<usize>) -> Range<usize> {
        let blocks = blocks.start.min(self.blocks())..blocks.end.min(self.blocks());
        if blocks.is_empty() || self.bits[blocks.clone()].all() {
            return 0..0;
        }
        self.bits[blocks.clone()].fill(true);
        blocks.start / 64..(blocks.end - 1) / 64 + 1
    }

    /// Whether block `block` is dirty.
    pub fn is_dirty(&self, block: usize) -> bool {
        self.bits.get(block).map(|b| *b).unwrap_or(false)
    }

    /// Number of dirty blocks.
    pub fn count_dirty(&self) -> usize {
        self.bits.count_ones()
    }

    /// Bytes covered by dirty blocks (the last block clipped to the image).
    pub fn dirty_bytes(&self) -> u64 {
        self.extents(0, self.size)
            .filter(|e| e.dirty)
            .map(|e| e.len)
            .sum()
    }

    /// Makes every block clean.
    pub fn clear(&mut self) {
        self.bits.fill(false);
    }

    /// Makes every block dirty.
    pub fn fill(&mut self) {
        self.bits.fill(true);
    }

    /// Ors `other` into `self`. Both must describe the same image layout.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        debug_assert_eq!(self.bits.len(), other.bits.len());
        for (a, b) in self
            .bits
            .as_raw_mut_slice()
            .iter_mut()
            .zip(other.bits.as_raw_slice())
        {
            *a |= *b;
        }
    }

    /// The words holding the bits; bits past the last block are zero.
    pub fn words(&self) -> &[u64] {
        self.bits.as_raw_slice()
    }

    /// Indexes of dirty blocks, ascending.
    pub fn dirty_blocks(&self) -> impl Iterator<Item = usize> + '_ {
        self.bits.iter_ones()
    }

    /// Runs of equal state covering the byte range `[offset, offset+len)`,
    /// clipped to the image.
    pub fn extents(&self, offset: u64, len: u64) -> impl Iterator<Item = Extent> + '_ {
        let end = offset.saturating_add(len).min(self.size);
        let g = self.granularity.bytes();
        let mut pos = offset.min(end);
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let block = (pos / g) as usize;
            let dirty = self.bits[block];
            let rest = &self.bits[block..];
            let run = if dirty {
                rest.first_zero()
            } else {
                rest.first_one()
            }
            .unwrap_or(rest.len());
            let run_end = ((block + run) as u64 * g).min(end);
            let e = Extent {
                offset: pos,
                len: run_end - pos,
                dirty,
            };
            pos = run_end;
            Some(e)
        })
    }
}

fn blocks_for(size: u64, g: Granularity) -> usize {
    size.div_ceil(g.bytes()) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: u64 = 4096;

    fn bm(size: u64) -> DirtyBitmap {
        DirtyBitmap::new(size, Granularity::new(G).unwrap())
    }

    #[test]
    fn granularity_bounds() {
        assert!(Granularity::new(4096).is_ok());
        assert!(Granularity::new(4 << 20).is_ok());
        assert!(Granularity::new(2048).is_err());
        assert!(Granularity::new(8 << 20).is_err());
        assert!(Granularity::new(65536 + 4096).is_err());
    }

    #[test]
    fn mark_touches_every_block_of_the_range() {
        let mut b = bm(10 * G + 100);
        assert_eq!(b.blocks(), 11);
        b.mark(G - 1, 2);
        assert_eq!(b.dirty_blocks().collect::<Vec<_>>(), vec![0, 1]);
        b.mark(10 * G + 50, 1000);
        assert!(b.is_dirty(10));
        // The last block is clipped to the image size.
        assert_eq!(b.dirty_bytes(), 2 * G + 100);
    }

    #[test]
    fn mark_reports_changed_words_once() {
        let mut b = bm(200 * G);
        assert_eq!(b.mark(64 * G, G), 1..2);
        assert_eq!(b.mark(64 * G, G), 0..0);
        assert_eq!(b.mark(0, 200 * G), 0..4);
    }

    #[test]
    fn extents_merge_runs() {
        let mut b = bm(8 * G);
        b.mark(2 * G, 3 * G);
        let e: Vec<_> = b.extents(G, 6 * G).collect();
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: G,
                    len: G,
                    dirty: false
                },
                Extent {
                    offset: 2 * G,
                    len: 3 * G,
                    dirty: true
                },
                Extent {
                    offset: 5 * G,
                    len: 2 * G,
                    dirty: false
                },
            ]
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Mark(u64, u64),
        Clear,
        Merge(Vec<(u64, u64)>),
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0..size + G, 0..size / 2).prop_map(|(o, l)| Op::Mark(o, l)),
            1 => Just(Op::Clear),
            1 => proptest::collection::vec((0..size, 0..4 * G), 0..4).prop_map(Op::Merge),
        ]
    }

    proptest! {
        /// The bitmap behaves like a `Vec<bool>` of blocks.
        #[test]
        fn matches_vec_bool_model(size in 1u64..300 * G, ops in proptest::collection::vec(op(300 * G), 0..40)) {
            let mut b = bm(size);
            let blocks = size.div_ceil(G) as usize;
            let mut model = vec![false; blocks];
            let mark_model = |m: &mut Vec<bool>, o: u64, l: u64| {
                if l == 0 || o >= size { return; }
                let end = (o + l).min(size);
                for blk in (o / G)..=((end - 1) / G) { m[blk as usize] = true; }
            };
            for op in ops {
                match op {
                    Op::Mark(o, l) => {
                        let before = model.clone();
                        mark_model(&mut model, o, l);
                        let changed = b.mark(o, l);
                        prop_assert_eq!(changed.is_empty(), before == model);
                    }
                    Op::Clear => { b.clear(); model.iter_mut().for_each(|x| *x = false); }
                    Op::Merge(marks) => {
                        let mut other = bm(size);
                        for (o, l) in marks { other.mark(o, l); mark_model(&mut model, o, l); }
                        b.merge(&other);
                    }
                }
            }
            let got: Vec<bool> = (0..blocks).map(|i| b.is_dirty(i)).collect();
            prop_assert_eq!(&got, &model);
            prop_assert_eq!(b.count_dirty(), model.iter().filter(|x| **x).count());
            // Extents tile the image exactly and agree with the model.
            let mut pos = 0;
            for e in b.extents(0, size) {
                prop_assert_eq!(e.offset, pos);
                prop_assert!(e.len > 0);
                for blk in (e.offset / G)..=((e.offset + e.len - 1) / G) {
                    prop_assert_eq!(model[blk as usize], e.dirty);
                }
                pos += e.len;
            }
            prop_assert_eq!(pos, size);
            let round = DirtyBitmap::from_words(size, b.granularity(), b.words().to_vec()).unwrap();
            prop_assert_eq!(round, b);
        }
    }
}
