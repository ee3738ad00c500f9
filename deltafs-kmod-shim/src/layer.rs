//! Layer directories on the backing filesystem: `<store>/layers/<layer-id>/f<file-id>`
//! backing files, created and copied up here.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::futimens;
use nix::sys::time::TimeSpec;
use nix::unistd::{Whence, lseek};

use crate::chunks::ChunkPolicy;
use crate::ids::LayerId;
use crate::ioctl::{ficlone, try_ficlone};

/// Failures on layer directories and backing files. Each keeps the errno a FUSE caller
/// should see (`ENOSPC` on a full store stays `ENOSPC`).
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// Creating a directory or file failed.
    #[error("cannot create {path}")]
    Create {
        /// What was to be created.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Opening a backing file failed.
    #[error("cannot open {path}")]
    Open {
        /// The backing file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Copying data into a new backing file failed.
    #[error("cannot copy data into {path}")]
    Copy {
        /// The new backing file (removed again).
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Renaming a backing file failed.
    #[error("cannot rename {from} to {to}")]
    Rename {
        /// Old path.
        from: PathBuf,
        /// New path.
        to: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Removing a layer directory failed.
    #[error("cannot remove {path}")]
    Remove {
        /// The layer directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl LayerError {
    /// The errno a FUSE caller gets for this failure.
    pub fn errno(&self) -> i32 {
        let source = match self {
            Self::Create { source, .. }
            | Self::Open { source, .. }
            | Self::Copy { source, .. }
            | Self::Rename { source, .. }
            | Self::Remove { source, .. } => source,
        };
        source.raw_os_error().unwrap_or(libc::EIO)
    }
}

/// How a copy was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Files cloned with `FICLONE` (no data written).
    pub cloned: u64,
    /// Bytes copied because the filesystem cannot clone.
    pub bytes_copied: u64,
    /// Files copied up chunk by chunk ([`crate::chunks`]): `bytes_copied` is what the
    /// copy-up itself wrote (0 unless a chain was flattened); writes copy chunks later.
    pub chunked: u64,
}

impl CopyStats {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: CopyStats) {
        self.cloned += other.cloned;
        self.bytes_copied += other.bytes_copied;
        self.chunked += other.chunked;
    }
}

/// The `layers/` directory of a store.
#[derive(Debug)]
pub struct Layers {
    root: PathBuf,
    reflink: bool,
    policy: ChunkPolicy,
}

impl Layers {
    /// Opens (creating) `root` and probes once whether its filesystem can `FICLONE`.
    pub fn open(root: PathBuf) -> Result<Self, LayerError> {
        Self::open_with(root, ChunkPolicy::default())
    }

    /// [`Layers::open`] with chunk-granular copy-ups made as `policy` says.
    pub fn open_with(root: PathBuf, policy: ChunkPolicy) -> Result<Self, LayerError> {
        fs::create_dir_all(&root).map_err(|source| LayerError::Create {
            path: root.clone(),
            source,
        })?;
        let reflink = probe_reflink(&root);
        let policy = ChunkPolicy {
            chunk: policy.chunk.max(1),
            ..policy
        };
        Ok(Self {
            root,
            reflink,
            policy,
        })
    }

    /// How copy-ups that cannot clone are made chunk by chunk.
    pub fn policy(&self) -> ChunkPolicy {
        self.policy
    }

    /// Whether copies are reflinks (xfs, btrfs) rather than full copies.
    pub fn reflink(&self) -> bool {
        self.reflink
    }

    /// The `layers/` directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of `layer`.
    pub fn dir(&self, layer: LayerId) -> PathBuf {
        self.root.join(layer.to_string())
    }

    /// The path of backing file `file` of `layer`.
    pub fn file(&self, layer: LayerId, file: u64) -> PathBuf {
        self.dir(layer).join(format!("f{file:x}"))
    }

    /// Creates the directory of `layer` if it is not there yet (layers are created
    /// lazily, on their first file or at freeze).
    pub fn ensure(&self, layer: LayerId) -> Result<PathBuf, LayerError> {
        let dir = self.dir(layer);
        match fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(dir),
            Err(source) => Err(LayerError::Create { path: dir, source }),
        }
    }

    /// Creates the empty backing file `file` of `layer`, open for reading and writing
    /// (and the layer's directory, the first time).
    pub fn create(&self, layer: LayerId, file: u64) -> Result<File, LayerError> {
        create_at(&self.file(layer, file))
    }

    /// Opens backing file `path` for reading, or reading and writing.
    pub fn open_file(path: &Path, write: bool) -> Result<File, LayerError> {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| LayerError::Open {
                path: path.to_owned(),
                source,
            })
    }

    /// Creates `dest` as a copy of `src` (a clone where possible) with `src`'s
    /// modification time; returns it open for reading and writing. On failure `dest` is
    /// removed, so a full store leaves no partial file behind.
    pub fn copy_to(&self, src: &File, dest: &Path) -> Result<(File, CopyStats), LayerError> {
        create_filled(dest, |file| {
            let stats = self.clone_into(src, file)?;
            copy_times(src, file)?;
            Ok(stats)
        })
    }

    /// Copies all of `src` into the empty `dest`: `FICLONE` when the store can, else a
    /// sparse-aware copy (holes stay holes).
    pub fn clone_into(&self, src: &File, dest: &File) -> io::Result<CopyStats> {
        if self.reflink && try_ficlone(dest, src)? {
            return Ok(CopyStats {
                cloned: 1,
                ..CopyStats::default()
            });
        }
        // Write back `src`'s dirty pages first, as FICLONE does: that write-protects
        // the pages of its shared mappings, so the next write through one faults and
        // bumps the file's times, which a switch relies on to tell a file kept live at
        // a freeze changed since (`View::switch`). Without it a mapped write after the
        // freeze went unseen on stores without reflink, and a rollback kept the file
        // connected with the write in it (`tests/invariants.rs`,
        // `old_handles_never_write_into_a_checkpoint`, with `DELTAFS_TEST_STORE=plain`).
        crate::writeback::write_back(src)?;
        let bytes_copied = sparse_copy(src, dest)?;
        Ok(CopyStats {
            bytes_copied,
            ..CopyStats::default()
        })
    }

    /// Renames a backing file (within the store).
    pub fn rename(from: &Path, to: &Path) -> Result<(), LayerError> {
        fs::rename(from, to).map_err(|source| LayerError::Rename {
            from: from.to_owned(),
            to: to.to_owned(),
            source,
        })
    }

    /// Removes the directory of `layer` and everything in it.
    pub fn remove(&self, layer: LayerId) -> Result<(), LayerError> {
        let path = self.dir(layer);
        match fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LayerError::Remove { path, source }),
        }
    }

    /// The ids of the layer directories present, and the names that are not layers.
    pub fn list(&self) -> Result<Vec<LayerId>, LayerError> {
        let read_err = |source| LayerError::Open {
            path: self.root.clone(),
            source,
        };
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            if let Some(id) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Bytes used by the layer directories (allocated blocks), for reports and tests.
    pub fn disk_usage(&self) -> u64 {
        fn walk(path: &Path) -> u64 {
            let Ok(meta) = fs::symlink_metadata(path) else {
                return 0;
            };
            let mut total = meta.blocks() * 512;
            if meta.is_dir()
                && let Ok(entries) = fs::read_dir(path)
            {
                for entry in entries.flatten() {
                    total += walk(&entry.path());
                }
            }
            total
        }
        walk(&self.root)
    }
}

/// Creates `path` (never an existing file), and its directory if that is missing: a
/// layer's directory is made on its first file, without a `mkdir` per file.
pub(crate) fn create_at(path: &Path) -> Result<File, LayerError> {
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
    };
    let created = match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match path.parent() {
            Some(dir) => match fs::create_dir(dir) {
                Ok(()) => open(),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open(),
                Err(e) => Err(e),
            },
            None => Err(e),
        },
        other => other,
    };
    created.map_err(|source| LayerError::Create {
        path: path.to_owned(),
        source,
    })
}

/// Creates `dest` ([`create_at`]) and has `fill` write it; if `fill` fails, `dest` is
/// removed, so a full store leaves no partial file behind.
pub(crate) fn create_filled<T>(
    dest: &Path,
    fill: impl FnOnce(&File) -> io::Result<T>,
) -> Result<(File, T), LayerError> {
    let file = create_at(dest)?;
    match fill(&file) {
        Ok(made) => Ok((file, made)),
        Err(source) => {
            drop(file);
            let _ = fs::remove_file(dest);
            Err(LayerError::Copy {
                path: dest.to_owned(),
                source,
            })
        }
    }
}

/// Gives `dest` the access and modification times of `src`.
pub(crate) fn copy_times(src: &File, dest: &File) -> io::Result<()> {
    let meta = src.metadata()?;
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    futimens(dest.as_fd(), &atime, &mtime).map_err(io::Error::from)
}

/// Copies the data extents of `src` into `dest` with `copy_file_range`, leaving holes;
/// returns the bytes copied.
pub(crate) fn sparse_copy(src: &File, dest: &File) -> io::Result<u64> {
    let len = src.metadata()?.len() as i64;
    let mut copied = 0u64;
    let mut pos = 0i64;
    while pos < len {
        let start = match lseek(src.as_fd(), pos, Whence::SeekData) {
            Ok(start) => start,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = lseek(src.as_fd(), start, Whence::SeekHole)
            .map_err(io::Error::from)?
            .min(len);
        copied += copy_range(src, dest, start as u64, end as u64)?;
        pos = end;
    }
    dest.set_len(len as u64)?;
    Ok(copied)
}

/// Copies `[start, end)` of `src` to the same offsets of `dest`: `copy_file_range` within a
/// filesystem, a read/write loop across filesystems (a base on ext4, a store on xfs).
fn copy_range(src: &File, dest: &File, start: u64, end: u64) -> io::Result<u64> {
    let mut off = start;
    while off < end {
        let (mut off_in, mut off_out) = (off as i64, off as i64);
        match nix::fcntl::copy_file_range(
            src.as_fd(),
            Some(&mut off_in),
            dest.as_fd(),
            Some(&mut off_out),
            (end - off) as usize,
        ) {
            Ok(0) => break,
            Ok(n) => off += n as u64,
            Err(
                nix::errno::Errno::EXDEV
                | nix::errno::Errno::EINVAL
                | nix::errno::Errno::EOPNOTSUPP
                | nix::errno::Errno::ENOSYS,
            ) => {
                let mut buf = vec![0u8; (1 << 20).min((end - off) as usize)];
                while off < end {
                    let want = buf.len().min((end - off) as usize);
                    let n = src.read_at(&mut buf[..want], off)?;
                    if n == 0 {
                        break;
                    }
                    dest.write_all_at(&buf[..n], off)?;
                    off += n as u64;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(off - start)
}

/// Whether `dir`'s filesystem supports `FICLONE` (two scratch files, removed again).
fn probe_reflink(dir: &Path) -> bool {
    let src_path = dir.join(".reflink-probe-src");
    let dest_path = dir.join(".reflink-probe-dest");
    let result = (|| -> io::Result<()> {
        let src = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&src_path)?;
        std::io::Write::write_all(&mut &src, &[0u8; 4096])?;
        let dest = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dest_path)?;
        ficlone(&dest, &src)
    })();
    let _ = fs::remove_file(&src_path);
    let _ = fs::remove_file(&dest_path);
    result.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_keep_data_holes_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let layers = Layers::open(dir.path().join("layers")).unwrap();
        let a = LayerId::generate();
        let src = layers.create(a, 1).unwrap();
        src.write_all_at(b"head", 0).unwrap();
        src.write_all_at(b"tail", 10 << 20).unwrap();
        let dest_path = layers.file(a, 2);
        let (dest, stats) = layers.copy_to(&src, &dest_path).unwrap();
        assert_eq!(dest.metadata().unwrap().len(), (10 << 20) + 4);
        let mut buf = [0u8; 4];
        dest.read_exact_at(&mut buf, 10 << 20).unwrap();
        assert_eq!(&buf, b"tail");
        if !layers.reflink() {
            assert!(stats.bytes_copied < 1 << 20, "{stats:?}");
            assert!(dest.metadata().unwrap().blocks() < 2048);
        }
        assert_eq!(
            dest.metadata().unwrap().mtime(),
            src.metadata().unwrap().mtime()
        );
        // A second create of the same file fails: backing files are never overwritten.
        assert!(layers.create(a, 1).is_err());
        assert_eq!(layers.list().unwrap(), [a]);
        layers.remove(a).unwrap();
        assert!(layers.list().unwrap().is_empty());
    }
}
