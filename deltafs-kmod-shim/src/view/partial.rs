//! Data I/O of chunk-granular copies ([`crate::chunks`]) on behalf of daemon-served
//! handles: what a read needs, copying chunks up before a write, completing.
//!
//! The record lives in the node (the live inode's, or a retired id's for a handle opened
//! before a switch), so it is persisted with the layer's metadata at freeze like the rest
//! of the node. Chunks are copied and marked held under the view's lock; the write itself
//! then runs outside it like any daemon-served write. A freeze between the two finds the
//! chunk copied and held (the write lands in the live file, which the freeze keeps open),
//! so the snapshot stays consistent.

use std::fs::File;
use std::sync::Arc;

use fuser::Errno;

use super::nodeids::Resolved;
use super::open::Backing;
use super::state::{FsResult, IntoErrno, Paths, ViewState};
use crate::chunks::{self, Partial};
use crate::node::Node;

/// What a daemon-served read of a handle needs: its backing file, and for a partial file
/// its record and where to find the files below.
pub(crate) struct ReadPlan {
    pub file: Arc<File>,
    pub partial: Option<(Arc<Partial>, Paths)>,
}

/// What a truncate of `file` (record `partial`) to `size` does to the record, if anything:
/// a shrink holds everything from `size` on (the backing file reads zeros there, which a
/// later extension must show), so it copies nothing; a record that then holds the whole
/// file is dropped (`Some(None)`), so the file can be passthrough again.
pub(crate) fn cut(
    partial: Option<&Arc<Partial>>,
    file: &File,
    size: u64,
) -> FsResult<Option<Option<Arc<Partial>>>> {
    let Some(partial) = partial else {
        return Ok(None);
    };
    let len = file.metadata().map_err(IntoErrno::errno)?.len();
    if size >= len || partial.holds(size, u64::MAX) {
        return Ok(None);
    }
    let mut cut = Partial::clone(partial);
    cut.hold(size, u64::MAX);
    if cut.holds(0, u64::MAX) {
        return Ok(Some(None));
    }
    Ok(Some(Some(Arc::new(cut))))
}

/// A handle's backing file, with its node id and record if its file is partial.
type WrittenPartial = (Arc<Backing>, Option<(u64, Arc<Partial>)>);

impl ViewState {
    /// The chunk record of the node whose data handle id `nid` reads and writes: its
    /// live inode's, or the node its retired id keeps. `None` also when the node is not
    /// at hand (an inode the index has not loaded is no chunk-granular copy: those are
    /// made by copy-ups, which load it).
    fn handle_partial(&self, nid: u64) -> Option<Arc<Partial>> {
        let node = match self.nids.resolve(nid) {
            Resolved::Live(ino) => self.index.node(ino)?,
            Resolved::Retired => &self.nids.retired.get(&nid)?.node,
        };
        node.partial.clone()
    }

    /// Handle `fh`'s backing file and, if its file is partial, the handle's node id and
    /// the record; `EBADF` for a handle not open for writing.
    fn written_partial(&self, fh: u64) -> FsResult<WrittenPartial> {
        let handle = self.handles.get(&fh).ok_or(Errno::EBADF)?;
        if !handle.write {
            return Err(Errno::EBADF);
        }
        let partial = self.handle_partial(handle.nid).map(|p| (handle.nid, p));
        Ok((Arc::clone(&handle.backing), partial))
    }

    /// Sets the record of the node handle id `nid` names (live: recorded in the delta).
    fn set_partial(&mut self, nid: u64, partial: Option<Arc<Partial>>) -> FsResult<()> {
        match self.nids.resolve(nid) {
            Resolved::Live(ino) => {
                self.txn()
                    .update(ino, |node| node.partial = partial)
                    .map_err(IntoErrno::errno)?;
            }
            Resolved::Retired => {
                let retired = self.nids.retired.get_mut(&nid).ok_or(Errno::ESTALE)?;
                let mut node = Node::clone(&retired.node);
                node.partial = partial;
                retired.node = Arc::new(node);
            }
        }
        Ok(())
    }

    /// What a read through handle `fh` needs.
    pub fn read_plan(&self, fh: u64) -> FsResult<ReadPlan> {
        let handle = self.handles.get(&fh).ok_or(Errno::EBADF)?;
        let file = handle.backing.file();
        let partial = self
            .handle_partial(handle.nid)
            .map(|partial| (partial, self.paths()));
        Ok(ReadPlan { file, partial })
    }

    /// Before a write (or a hole punch or zeroing, `covered`: the range's whole chunks
    /// are overwritten) of `[start, end)` through handle `fh`: if its file is partial,
    /// copies the chunks the range touches from below and marks them held, completing
    /// the file when it holds enough (see [`crate::chunks`]). Returns the handle's
    /// backing file to write to; `EBADF` for a handle not open for writing.
    pub fn prepare_write(
        &mut self,
        fh: u64,
        start: u64,
        end: u64,
        covered: bool,
    ) -> FsResult<Arc<Backing>> {
        let (backing, partial) = self.written_partial(fh)?;
        let Some((nid, partial)) = partial else {
            return Ok(backing);
        };
        let file = backing.file();
        let paths = self.paths();
        let resolve = |d: &crate::node::DataRef| paths.path(d);
        let mut record = Partial::clone(&partial);
        let policy = self.store.layers.policy();
        let chunk = policy.chunk;
        let mut copied = chunks::own(&file, &mut record, &resolve, start, end, covered, chunk)
            .map_err(IntoErrno::errno)?;
        let size = file.metadata().map_err(IntoErrno::errno)?.len().max(end);
        let complete = record.should_complete(size, &policy);
        if complete {
            copied += chunks::complete(&file, &record, &resolve).map_err(IntoErrno::errno)?;
        }
        if complete || record != *partial {
            self.set_partial(nid, (!complete).then(|| Arc::new(record)))?;
        }
        self.store
            .stats
            .chunks_copied(self.writable, copied, complete);
        Ok(backing)
    }

    /// Before an operation that moves data within handle `fh`'s file (collapse or insert
    /// range): completes it if it is partial. Returns the handle's backing file.
    pub fn complete_for(&mut self, fh: u64) -> FsResult<Arc<Backing>> {
        let (backing, partial) = self.written_partial(fh)?;
        let Some((nid, partial)) = partial else {
            return Ok(backing);
        };
        let paths = self.paths();
        let copied = chunks::complete(&backing.file(), &partial, &|d| paths.path(d))
            .map_err(IntoErrno::errno)?;
        self.set_partial(nid, None)?;
        self.store.stats.chunks_copied(self.writable, copied, true);
        Ok(backing)
    }
}
