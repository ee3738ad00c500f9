//! Which pages of a template are the very pages of its parent node's template: the
//! page frames `/proc/<pid>/pagemap` reports (to a reader with `CAP_SYS_ADMIN`).
//!
//! A template is a fork of its session, and the session a fork (or the original) of
//! the process the parent node's template was forked from: a page the session did not
//! write between the two checkpoints is one physical page mapped by both templates,
//! copy-on-write. Templates never run, so neither can change it; equal frames at an
//! address mean equal bytes, and the dump can take that page's entry from the parent's
//! dump (made from the parent's template) without reading or hashing it. A page the
//! session wrote has a frame of its own. Frames are compared, never trusted alone: a
//! page that is not present in both, or a frame of 0 (no `CAP_SYS_ADMIN`), is read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;

use super::{PAGE, PM_FILE, PM_PRESENT, PM_SWAPPED};
use crate::cr::Template;

/// Bits 0–54 of a pagemap entry: the page frame number of a present page.
const PM_PFN: u64 = (1 << 55) - 1;

/// The base template's page map, opened once per dump.
pub(crate) struct BaseFrames<'a> {
    template: &'a Template,
    pagemap: File,
}

impl<'a> BaseFrames<'a> {
    /// Opens `template`'s page map; `None` if it is gone or unreadable (then nothing
    /// is compared: every page is read).
    pub(crate) fn open(template: &'a Template) -> Option<Self> {
        let pagemap = File::open(format!("/proc/{}/pagemap", template.pid())).ok()?;
        // Opened after the pidfd: if the template is still alive now, the file is its.
        template.is_alive().then_some(Self { template, pagemap })
    }

    /// The frames of `count` pages from `first` (`None` where not present), or `None`
    /// if the page map cannot be read.
    pub(crate) fn frames(&self, first: u64, count: u64) -> Option<Vec<Option<u64>>> {
        read_frames(&self.pagemap, first, count).ok()
    }

    /// Whether the template lived through the dump: frames read from a process that
    /// has died since may have been handed to other pages.
    pub(crate) fn still_alive(&self) -> bool {
        self.template.is_alive()
    }
}

/// The frame of each of `count` pages from `first` in `pagemap`: `Some(pfn)` for a
/// present private page with a known frame, else `None`.
pub(crate) fn read_frames(pagemap: &File, first: u64, count: u64) -> io::Result<Vec<Option<u64>>> {
    let mut raw = vec![0u8; (count * 8) as usize];
    pagemap.read_exact_at(&mut raw, first / PAGE * 8)?;
    Ok(raw
        .chunks_exact(8)
        .map(|e| frame(u64::from_ne_bytes(e.try_into().expect("8 bytes"))))
        .collect())
}

/// The frame of one pagemap entry, if present, private and known.
pub(crate) fn frame(entry: u64) -> Option<u64> {
    let private = entry & (PM_PRESENT | PM_FILE | PM_SWAPPED) == PM_PRESENT;
    let pfn = entry & PM_PFN;
    (private && pfn != 0).then_some(pfn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_present_private_pages_with_a_frame_have_one() {
        assert_eq!(frame(PM_PRESENT | 42), Some(42));
        assert_eq!(
            frame(PM_PRESENT),
            None,
            "frame hidden without CAP_SYS_ADMIN"
        );
        assert_eq!(frame(PM_PRESENT | PM_FILE | 42), None);
        assert_eq!(frame(PM_SWAPPED | 42), None);
        assert_eq!(frame(42), None);
        // Bits above the frame (soft-dirty, exclusive) do not count.
        assert_eq!(frame(PM_PRESENT | (1 << 55) | (1 << 56) | 7), Some(7));
    }
}
