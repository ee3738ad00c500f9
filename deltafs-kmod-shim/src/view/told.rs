//! What the kernel was last told of the attributes of files that may be written through
//! a `MAP_SHARED` mapping (`ViewState::maybe_mapped`).
//!
//! Replies let the kernel keep attributes for the long TTL. Every change through the
//! mount updates or invalidates its copy, except writes through a writable mapping of a
//! passthrough file: they change the backing file's mtime and blocks unseen. So the
//! attributes a reply hands out for such a candidate are recorded, and the janitor
//! compares them with what a reply would say now — every
//! [`super::janitor::CHECK_PERIOD`] while any are recorded, and a last time when a
//! candidate stops being one — and invalidates the kernel's copy when they differ. A
//! file never written through a mapping (tar's, git's) so costs no round trip later,
//! where a short TTL cost a `LOOKUP` or `GETATTR` per file once it expired.

use std::time::SystemTime;

use fuser::{FileAttr, FileType};

use super::nodeids::Resolved;
use super::state::ViewState;
use crate::ids::Ino;

/// The parts of a file's attributes that a mapping's writes can change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Told {
    nid: u64,
    size: u64,
    blocks: u64,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Told {
    fn of(attr: &FileAttr) -> Self {
        Self {
            nid: attr.ino.0,
            size: attr.size,
            blocks: attr.blocks,
            mtime: attr.mtime,
            ctime: attr.ctime,
        }
    }
}

impl ViewState {
    /// Records `attr`, about to be sent to the kernel, if its file may be mapped.
    pub fn told(&mut self, attr: &FileAttr) {
        if attr.kind != FileType::RegularFile {
            return;
        }
        if let Resolved::Live(ino) = self.nids.resolve(attr.ino.0)
            && self.maybe_mapped.contains_key(&ino)
        {
            if self.told.is_empty() {
                // The janitor sleeps without a deadline while nothing is watched.
                self.janitor.poke();
            }
            self.told.insert(ino, Told::of(attr));
        }
    }

    /// The node ids whose attributes the kernel holds differ from the current ones
    /// (each then recorded as current: the kernel asks again once invalidated): of every
    /// recorded file when `all`, else only of those no longer candidates. Records of
    /// files no longer candidates are checked a last time and dropped.
    pub fn stale_told(&mut self, all: bool) -> Vec<u64> {
        let mut stale = Vec::new();
        let inos: Vec<Ino> = self
            .told
            .keys()
            .copied()
            .filter(|ino| all || !self.maybe_mapped.contains_key(ino))
            .collect();
        for ino in inos {
            let Some(&told) = self.told.get(&ino) else {
                continue;
            };
            let now = match self.attr_of_ino(ino) {
                Ok(attr) if attr.ino.0 == told.nid => Some(Told::of(&attr)),
                // Removed, or retired by a switch (which invalidated it): nothing to keep.
                _ => None,
            };
            if now.is_some_and(|now| now != told) {
                stale.push(told.nid);
            }
            match now {
                Some(now) if self.maybe_mapped.contains_key(&ino) => {
                    self.told.insert(ino, now);
                }
                _ => {
                    self.told.remove(&ino);
                }
            }
        }
        stale
    }
}
