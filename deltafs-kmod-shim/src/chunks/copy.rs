//! The copy-up of a frozen file: a clone where the store can, else chunk by chunk (large
//! files) or whole (small ones).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use super::{MAX_DEPTH, Partial, Resolve, flatten, materialize};
use crate::ioctl::try_ficlone;
use crate::layer::{CopyStats, LayerError, Layers, copy_times, create_filled, sparse_copy};
use crate::node::DataRef;

/// A copy-up's new backing file, the record it needs (`None`: it holds everything), and
/// what it cost.
pub(crate) type CopiedUp = (File, Option<Arc<Partial>>, CopyStats);

impl Layers {
    /// Creates `dest` as the copy-up of the frozen file `src_data` (open as `src`, with
    /// record `src_partial` if it is partial), with `src`'s times:
    /// - a `FICLONE` clone when the store can (the clone keeps `src`'s record);
    /// - else, for a file of at least [`super::ChunkPolicy::min_size`] bytes, an empty
    ///   sparse file over `src_data` (flattened when the chain would exceed
    ///   [`MAX_DEPTH`]);
    /// - else a whole copy (through the chain if `src` is partial).
    ///
    /// On failure `dest` is removed, so a full store leaves no partial file behind.
    pub(crate) fn copy_up(
        &self,
        src: &File,
        src_data: &DataRef,
        src_partial: Option<&Arc<Partial>>,
        resolve: Resolve<'_>,
        dest: &Path,
    ) -> Result<CopiedUp, LayerError> {
        let (file, (partial, stats)) = create_filled(dest, |file| {
            let made = self.fill_copy(src, src_data, src_partial, resolve, file)?;
            copy_times(src, file)?;
            Ok(made)
        })?;
        Ok((file, partial, stats))
    }

    fn fill_copy(
        &self,
        src: &File,
        src_data: &DataRef,
        src_partial: Option<&Arc<Partial>>,
        resolve: Resolve<'_>,
        dest: &File,
    ) -> io::Result<(Option<Arc<Partial>>, CopyStats)> {
        if self.reflink() && try_ficlone(dest, src)? {
            let stats = CopyStats {
                cloned: 1,
                ..CopyStats::default()
            };
            return Ok((src_partial.cloned(), stats));
        }
        let size = src.metadata()?.len();
        if size >= self.policy().min_size {
            dest.set_len(size)?;
            let (partial, bytes_copied) = match src_partial {
                None => (Some(Partial::over(src_data.clone(), None)), 0),
                Some(lower) if lower.depth() < MAX_DEPTH => (
                    Some(Partial::over(src_data.clone(), Some(Arc::clone(lower)))),
                    0,
                ),
                Some(lower) => match flatten(src, lower, resolve, dest)? {
                    (Some(flat), bytes) => (Some(flat), bytes),
                    (None, _) => (None, materialize(src, lower, resolve, dest)?),
                },
            };
            let stats = CopyStats {
                bytes_copied,
                chunked: u64::from(partial.is_some()),
                ..CopyStats::default()
            };
            return Ok((partial.map(Arc::new), stats));
        }
        let bytes_copied = match src_partial {
            None => sparse_copy(src, dest)?,
            Some(partial) => materialize(src, partial, resolve, dest)?,
        };
        let stats = CopyStats {
            bytes_copied,
            ..CopyStats::default()
        };
        Ok((None, stats))
    }
}
