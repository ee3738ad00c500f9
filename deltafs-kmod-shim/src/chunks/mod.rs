//! Chunk-granular copy-up, for stores that cannot `FICLONE` (ext4, tmpfs) and for base
//! files on another filesystem than the store.
//!
//! Copying a frozen file up then copies no data: the new backing file is sparse, of the
//! frozen file's size, and the node gets a [`Partial`] record: the file below (`below`,
//! with its own record if it is partial too: `lower`) and the byte ranges the new
//! backing file holds (`held`). A byte not held reads from below. A write first copies
//! the [`ChunkPolicy::chunk`]-sized chunks it touches that are not held yet, except those
//! it covers whole (read-modify-write), then writes; so a 1-byte write into a frozen
//! 1 GiB file copies at most one chunk. A truncate that shrinks marks everything from the
//! new size on held (the backing file reads zeros there), so it copies nothing.
//!
//! Invariant: a range the record does not hold is a hole (zeros) in the backing file, so
//! holding it reads zeros until written. Reads past the end of any file in the chain
//! read zeros, which is what the byte is: a file grows only by writes (held) or by
//! extension from its size, and a file that shrank below its lower file's size holds
//! everything past the cut.
//!
//! Such *partial* files are served by the daemon, never passthrough (the kernel would read
//! the backing file's holes). A partial file is *completed* (the rest copied, the record
//! dropped) once it holds half of its bytes or more than [`MAX_RANGES`] ranges; its next
//! first open is then passthrough. Chains stay bounded: copying up a file whose chain is
//! [`MAX_DEPTH`] deep *flattens* it (the new file copies what the chain's upper files
//! hold and sits directly on the chain's bottom file).

mod copy;
mod io;

use std::sync::Arc;

pub(crate) use self::io::{Resolve, complete, fill, flatten, materialize, own, seek};
use crate::node::DataRef;

/// The chunk size of copy-ups: 128 KiB. A 1-byte write into a frozen file copies one
/// chunk (~0.1 ms at 1–2 GB/s), and 128 KiB is the kernel's default largest FUSE `WRITE`
/// (32 pages), so a sequential rewrite of a partial file arrives in whole chunks and
/// copies nothing before writing. Smaller chunks would fragment the record (a 1 GiB file
/// has 8 192 chunks of 128 KiB; [`MAX_RANGES`] bounds what is kept) for little gain.
pub const CHUNK: u64 = 128 << 10;

/// Files smaller than this are copied whole at copy-up (one chunk or less: a whole copy
/// costs what one chunk copy would, and the copy can be passthrough at once).
pub const CHUNKED_MIN: u64 = CHUNK + 1;

/// Most links a chain may have below a partial file; copying up a file with a chain this
/// deep flattens it. Reads of bytes no upper file holds open one file per link.
pub const MAX_DEPTH: usize = 4;

/// Most held ranges a record keeps before its file is completed: bounds the record's size
/// in `layer.bin` (a few bytes per range) and the cost of walking it.
pub const MAX_RANGES: usize = 1024;

/// How a store copies files up when it cannot `FICLONE` them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPolicy {
    /// Chunk size (bytes, > 0): what a write copies from below at least.
    pub chunk: u64,
    /// Files of this size or more are copied up chunk by chunk; smaller ones whole.
    pub min_size: u64,
    /// Complete a file once it holds half of its bytes (else only past [`MAX_RANGES`]
    /// ranges). Off only to keep files partial in tests.
    pub complete_at_half: bool,
}

impl Default for ChunkPolicy {
    fn default() -> Self {
        Self {
            chunk: CHUNK,
            min_size: CHUNKED_MIN,
            complete_at_half: true,
        }
    }
}

/// The record of a partial file: where the bytes it does not hold come from, and which
/// it holds. Immutable once in a frozen node (a change makes a new one).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Partial {
    /// The frozen file below: a base file or a frozen layer's backing file.
    pub below: DataRef,
    /// `below`'s own record when it is partial too.
    pub lower: Option<Arc<Partial>>,
    /// Byte ranges `[start, end)` the backing file holds: sorted, disjoint, not
    /// adjacent, non-empty. `end` is `u64::MAX` for "everything from `start` on".
    pub held: Vec<(u64, u64)>,
}

impl Partial {
    /// A record holding nothing over `below` (with its record `lower`).
    pub fn over(below: DataRef, lower: Option<Arc<Partial>>) -> Self {
        Self {
            below,
            lower,
            held: Vec::new(),
        }
    }

    /// Links of the chain below the file: 1 when `below` is a whole file.
    pub fn depth(&self) -> usize {
        1 + self.lower.as_ref().map_or(0, |lower| lower.depth())
    }

    /// The files of the chain below, nearest first.
    pub fn files(&self) -> impl Iterator<Item = &DataRef> {
        let mut cur = Some(self);
        std::iter::from_fn(move || {
            let p = cur?;
            cur = p.lower.as_deref();
            Some(&p.below)
        })
    }

    /// Whether all of `[start, end)` is held.
    pub fn holds(&self, start: u64, end: u64) -> bool {
        let i = self.held.partition_point(|&(_, e)| e <= start);
        self.held
            .get(i)
            .is_some_and(|&(s, e)| s <= start && end <= e)
    }

    /// Marks `[start, end)` held (merging with neighbours).
    pub fn hold(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // Ranges touching or overlapping [start, end): from the first ending at or after
        // `start` to the last starting at or before `end`.
        let first = self.held.partition_point(|&(_, e)| e < start);
        let last = self.held.partition_point(|&(s, _)| s <= end);
        let (mut s, mut e) = (start, end);
        if first < last {
            s = s.min(self.held[first].0);
            e = e.max(self.held[last - 1].1);
        }
        self.held.splice(first..last, [(s, e)]);
    }

    /// Bytes held below `size`.
    pub fn held_bytes(&self, size: u64) -> u64 {
        self.held
            .iter()
            .take_while(|&&(s, _)| s < size)
            .map(|&(s, e)| e.min(size) - s)
            .sum()
    }

    /// `[start, end)` cut where holding changes: `(from, to, held)` pieces in order.
    pub fn segments(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut pos = start;
        let mut i = self.held.partition_point(|&(_, e)| e <= start);
        while pos < end {
            match self.held.get(i) {
                Some(&(s, e)) if s <= pos => {
                    let to = e.min(end);
                    out.push((pos, to, true));
                    pos = to;
                    i += 1;
                }
                Some(&(s, _)) => {
                    let to = s.min(end);
                    out.push((pos, to, false));
                    pos = to;
                }
                None => {
                    out.push((pos, end, false));
                    pos = end;
                }
            }
        }
        out
    }

    /// Whether the file should be completed now (see the module's documentation).
    pub fn should_complete(&self, size: u64, policy: &ChunkPolicy) -> bool {
        self.held.len() > MAX_RANGES
            || (policy.complete_at_half && self.held_bytes(size).saturating_mul(2) >= size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Bytes;

    fn record(held: &[(u64, u64)]) -> Partial {
        let mut p = Partial::over(DataRef::Base(Bytes(b"f".to_vec())), None);
        for &(s, e) in held {
            p.hold(s, e);
        }
        p
    }

    #[test]
    fn holding_merges_neighbours_and_overlaps() {
        let p = record(&[(10, 20), (30, 40), (20, 30)]);
        assert_eq!(p.held, [(10, 40)]);
        let p = record(&[(10, 20), (50, 60), (15, 55)]);
        assert_eq!(p.held, [(10, 60)]);
        let p = record(&[(50, 60), (10, 20), (30, 35)]);
        assert_eq!(p.held, [(10, 20), (30, 35), (50, 60)]);
        let p = record(&[(10, 20), (5, 5), (100, u64::MAX), (90, 101)]);
        assert_eq!(p.held, [(10, 20), (90, u64::MAX)]);
        assert!(p.holds(10, 20) && p.holds(12, 13) && !p.holds(9, 11) && !p.holds(20, 21));
        assert!(p.holds(95, 1 << 40));
        assert_eq!(p.held_bytes(100), 20);
        assert_eq!(p.held_bytes(15), 5);
    }

    #[test]
    fn segments_cover_the_range_in_order() {
        let p = record(&[(10, 20), (30, 40)]);
        assert_eq!(
            p.segments(0, 50),
            [
                (0, 10, false),
                (10, 20, true),
                (20, 30, false),
                (30, 40, true),
                (40, 50, false)
            ]
        );
        assert_eq!(
            p.segments(15, 35),
            [(15, 20, true), (20, 30, false), (30, 35, true)]
        );
        assert_eq!(p.segments(40, 40), []);
    }

    #[test]
    fn chains_count_their_links() {
        let bottom = Arc::new(record(&[(0, 1)]));
        let top = Partial::over(DataRef::Base(Bytes(b"g".to_vec())), Some(bottom));
        assert_eq!(top.depth(), 2);
        assert_eq!(top.files().count(), 2);
        let policy = ChunkPolicy::default();
        assert!(!top.should_complete(100, &policy));
        assert!(record(&[(0, 50)]).should_complete(100, &policy));
        let never = ChunkPolicy {
            complete_at_half: false,
            ..policy
        };
        assert!(!record(&[(0, 100)]).should_complete(100, &never));
    }
}
