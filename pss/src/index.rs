//! The block index: every stored block's version and the location of its record in the
//! blob segments, held in memory (~60 bytes a block; `max_blocks` bounds it) and shared
//! by the Raft thread (the only writer) and the read handlers.
//!
//! It is not kept in sled. Its durable form is a **base** plus the blob log after it:
//! the base is the index file of the newest checkpoint (`snapshot`), or nothing (the
//! blob log from its first segment), or, for a state directory of an older PSS, sled's
//! block entries as they were. Every block write appends a record (key, version) and
//! every delete a tombstone to the blob log in apply order, so replaying the records after
//! the base's blob position rebuilds the index exactly ([`IndexBase`]). A per-write sled
//! insert of the block's entry was a third of a loaded node's CPU (sled's tree update and
//! its IO threads).
//!
//! **Invariant:** the blob records past the durable base's position are never collected
//! (garbage collection takes only segments below it), and a delete always leaves a
//! tombstone, so a replay from the base sees every change since.

use crate::blobs::Loc;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// One volume's blocks.
pub type BlockMap = HashMap<u64, Loc>;

/// Every block's index entry, by volume.
#[derive(Default)]
pub struct BlockIndex {
    volumes: HashMap<Box<str>, BlockMap>,
    entries: usize,
}

/// The index as the Raft thread and the readers share it.
pub type SharedIndex = Arc<RwLock<BlockIndex>>;

/// Read access (a poisoned lock still holds a consistent index: writers only insert).
pub fn read(index: &SharedIndex) -> std::sync::RwLockReadGuard<'_, BlockIndex> {
    index.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Write access.
pub fn write(index: &SharedIndex) -> std::sync::RwLockWriteGuard<'_, BlockIndex> {
    index.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl BlockIndex {
    pub fn get(&self, volume: &str, block: u64) -> Option<Loc> {
        self.volumes.get(volume).and_then(|m| m.get(&block)).copied()
    }

    /// Sets (or, with `None`, removes) a block's entry.
    pub fn set(&mut self, volume: &str, block: u64, loc: Option<Loc>) {
        match loc {
            Some(loc) => {
                let m = match self.volumes.get_mut(volume) {
                    Some(m) => m,
                    None => self.volumes.entry(volume.into()).or_default(),
                };
                if m.insert(block, loc).is_none() {
                    self.entries += 1;
                }
            }
            None => {
                if let Some(m) = self.volumes.get_mut(volume) {
                    if m.remove(&block).is_some() {
                        self.entries -= 1;
                    }
                    if m.is_empty() {
                        self.volumes.remove(volume);
                    }
                }
            }
        }
    }

    /// [`BlockIndex::set`] by block key (`b name 0 block-be`); other keys are ignored.
    pub fn set_key(&mut self, key: &[u8], loc: Option<Loc>) {
        if let Some((volume, block)) = parse_block_key(key) {
            self.set(volume, block, loc);
        }
    }

    /// Blocks indexed.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Blocks `volume` stores.
    pub fn volume_entries(&self, volume: &str) -> usize {
        self.volumes.get(volume).map_or(0, |m| m.len())
    }

    /// Every entry: `(volume, block, location)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64, Loc)> {
        self.volumes.iter().flat_map(|(v, m)| m.iter().map(move |(b, l)| (&**v, *b, *l)))
    }

    /// A copy of every volume's entries (for a checkpoint written on another thread).
    pub fn copy(&self) -> Vec<(Box<str>, BlockMap)> {
        self.volumes.iter().map(|(v, m)| (v.clone(), m.clone())).collect()
    }

    /// The key and location of every block whose record is in segment `seg`, by offset.
    pub fn in_segment(&self, seg: u32) -> Vec<(Vec<u8>, Loc)> {
        let mut out: Vec<(Vec<u8>, Loc)> = self
            .iter()
            .filter(|(_, _, l)| l.segment == seg)
            .map(|(v, b, l)| (block_key(v, b), l))
            .collect();
        out.sort_unstable_by_key(|(_, l)| l.offset);
        out
    }

    /// Up to `limit` blocks of `volume` from `start` on, in block order, and the next
    /// block if there are more. Linear in the volume's blocks past `start` plus
    /// `limit log limit` (only the page is sorted: paging through a volume of a million
    /// blocks no longer sorts the rest of it per page).
    pub fn list(&self, volume: &str, start: u64, limit: usize) -> (Vec<(u64, Loc)>, Option<u64>) {
        let Some(m) = self.volumes.get(volume) else { return (Vec::new(), None) };
        let mut blocks: Vec<(u64, Loc)> =
            m.iter().filter(|(b, _)| **b >= start).map(|(b, l)| (*b, *l)).collect();
        let mut next = None;
        if blocks.len() > limit {
            // The page's blocks before `limit`, the first block after them at `limit`.
            blocks.select_nth_unstable_by_key(limit, |(b, _)| *b);
            next = Some(blocks[limit].0);
            blocks.truncate(limit);
        }
        blocks.sort_unstable_by_key(|(b, _)| *b);
        (blocks, next)
    }
}

/// The key of a block (volume names never contain 0, so `b name 0` is an exact prefix).
pub fn block_key(volume: &str, block: u64) -> Vec<u8> {
    let mut k = block_prefix(volume);
    k.extend_from_slice(&block.to_be_bytes());
    k
}

/// The prefix of a volume's block keys.
pub fn block_prefix(volume: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + volume.len());
    k.push(b'b');
    k.extend_from_slice(volume.as_bytes());
    k.push(0);
    k
}

/// The volume and block of a block key.
pub fn parse_block_key(key: &[u8]) -> Option<(&str, u64)> {
    let rest = key.strip_prefix(b"b")?;
    let (name, block) = rest.split_at_checked(rest.len().checked_sub(9)?)?;
    let block = block.strip_prefix(&[0])?;
    Some((std::str::from_utf8(name).ok()?, u64::from_be_bytes(block.try_into().ok()?)))
}

/// Where the durable index starts; the blob records from `at` on complete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexBase {
    /// Nothing: every record from the first blob segment on.
    Scratch,
    /// sled's block entries (a state directory of a PSS before this format).
    Sled { at: (u32, u64) },
    /// The index file of the checkpoint at Raft index `index`.
    Checkpoint { index: u64, at: (u32, u64) },
}

impl IndexBase {
    /// The blob position the replay starts from (`Scratch`: the caller's first segment).
    pub fn at(&self) -> Option<(u32, u64)> {
        match self {
            IndexBase::Scratch => None,
            IndexBase::Sled { at } | IndexBase::Checkpoint { at, .. } => Some(*at),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let (tag, index, at) = match *self {
            IndexBase::Scratch => (0u8, 0, (0, 0)),
            IndexBase::Sled { at } => (1, 0, at),
            IndexBase::Checkpoint { index, at } => (2, index, at),
        };
        let mut b = vec![tag];
        b.extend_from_slice(&index.to_be_bytes());
        b.extend_from_slice(&at.0.to_be_bytes());
        b.extend_from_slice(&at.1.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 21 {
            return None;
        }
        let index = u64::from_be_bytes(b[1..9].try_into().ok()?);
        let at = (
            u32::from_be_bytes(b[9..13].try_into().ok()?),
            u64::from_be_bytes(b[13..21].try_into().ok()?),
        );
        match b[0] {
            0 => Some(IndexBase::Scratch),
            1 => Some(IndexBase::Sled { at }),
            2 => Some(IndexBase::Checkpoint { index, at }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_bases_and_listing() {
        assert_eq!(parse_block_key(&block_key("car-7", 1 << 40)), Some(("car-7", 1 << 40)));
        assert_eq!(parse_block_key(b"vcar-7"), None);
        for base in [
            IndexBase::Scratch,
            IndexBase::Sled { at: (3, 99) },
            IndexBase::Checkpoint { index: 7, at: (4, 0) },
        ] {
            assert_eq!(IndexBase::decode(&base.encode()), Some(base));
        }
        let mut ix = BlockIndex::default();
        let loc = |b: u64| Loc { version: 1, segment: (b % 2) as u32, offset: b, len: 10 };
        for b in [5u64, 1, 9, 3] {
            ix.set("v", b, Some(loc(b)));
        }
        ix.set("w", 1, Some(loc(1)));
        assert_eq!(ix.entries(), 5);
        let (first, next) = ix.list("v", 2, 2);
        assert_eq!(first.iter().map(|(b, _)| *b).collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(next, Some(9));
        // Paging through many blocks inserted out of order: every block once, in order.
        let mut x = BlockIndex::default();
        let n = 1000u64;
        for i in 0..n {
            let b = (i * 7919) % n * 3; // a permutation of 0, 3, .., 2997
            x.set("p", b, Some(loc(b)));
        }
        let (mut seen, mut start) = (Vec::new(), 0);
        loop {
            let (page, next) = x.list("p", start, 7);
            assert!(page.len() <= 7);
            seen.extend(page.iter().map(|(b, _)| *b));
            match next {
                Some(b) => start = b,
                None => break,
            }
        }
        assert_eq!(seen, (0..n).map(|i| i * 3).collect::<Vec<_>>());
        assert_eq!(x.list("p", 0, 0), (Vec::new(), Some(0)));
        ix.set("w", 1, None);
        assert_eq!(ix.entries(), 4);
        assert_eq!(ix.in_segment(1).len(), 4, "5, 1, 9, 3 are odd");
        assert!(ix.in_segment(1).windows(2).all(|w| w[0].1.offset < w[1].1.offset));
    }
}
