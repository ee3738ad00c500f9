//! FUSE passthrough probe: does this kernel serve a FUSE file's data straight from a
//! backing file, the way DeltaFS needs it to?
//!
//! [`passthrough_probe`] mounts a one-file FUSE filesystem in a temporary directory. Its
//! `open` registers a backing file with the kernel (`FUSE_DEV_IOC_BACKING_OPEN`) and
//! replies `FOPEN_PASSTHROUGH`; the probe then reads the file through the mount, checks the
//! bytes, and checks that the daemon's `read` handler was never called, which proves the
//! data came through passthrough and not through the daemon. The mount and the temporary
//! directory are removed whatever the outcome.
//!
//! What passthrough needs (found on the target kernel, see DESIGN.md): the kernel must offer
//! `FUSE_PASSTHROUGH` (FUSE ABI 7.40, Linux 6.9), the daemon must request it **and** set
//! `max_stack_depth` to at least 1 in `init` (0, the default, makes every backing open fail
//! with `EPERM`), the daemon needs `CAP_SYS_ADMIN`, and there must be no writeback cache.

mod filesystem;

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption};
use nix::mount::{MntFlags, umount2};
use nix::unistd::mkdtemp;

use self::filesystem::{FILE_NAME, Observed, ProbeFs};

/// How long the probe waits for the read through the mount before giving up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Three pages and a tail: enough that a short or page-granular read shows as a mismatch.
const CONTENT_LEN: usize = 3 * 4096 + 123;

/// What a successful probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// FUSE protocol version the kernel announced, e.g. `7.45`.
    pub kernel_abi: String,
    /// Bytes read through the mount (all of them matched the backing file).
    pub bytes_read: usize,
    /// `OPEN` requests the daemon answered with passthrough.
    pub opens: u64,
    /// `READ` requests that reached the daemon: always 0 in a report, else the probe fails.
    pub daemon_reads: u64,
    /// Wall time of the whole probe: mount, read, unmount, cleanup.
    pub elapsed: Duration,
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FUSE passthrough works: {} bytes read from the backing file, {} read requests \
             reached the daemon (FUSE ABI {}, {:.1} ms)",
            self.bytes_read,
            self.daemon_reads,
            self.kernel_abi,
            self.elapsed.as_secs_f64() * 1e3,
        )
    }
}

/// Why the probe failed. Each message says what is missing; [`ProbeError::hint`] says how
/// to get it.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `/dev/fuse` does not exist.
    #[error("/dev/fuse is missing")]
    NoDevice,
    /// The temporary directory could not be created.
    #[error("cannot create a temporary directory under {base}")]
    TempDir {
        /// Directory the temporary directory was to be created in.
        base: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The backing file or the mount point could not be created.
    #[error("cannot create {path}")]
    Create {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The kernel's `INIT` did not offer `FUSE_PASSTHROUGH`.
    #[error("the kernel does not offer FUSE passthrough (FUSE ABI {kernel_abi})")]
    NotOffered {
        /// FUSE protocol version the kernel announced.
        kernel_abi: String,
    },
    /// The kernel rejected the requested `max_stack_depth`.
    #[error("the kernel rejected max_stack_depth 1 (its maximum is {max})")]
    StackDepth {
        /// The largest depth the kernel accepts.
        max: u32,
    },
    /// Mounting the probe filesystem failed.
    #[error("cannot mount the probe filesystem at {mountpoint}")]
    Mount {
        /// Where it was to be mounted.
        mountpoint: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `FUSE_DEV_IOC_BACKING_OPEN` failed, so `open` could not reply with passthrough.
    #[error("the kernel refused the passthrough backing file (FUSE_DEV_IOC_BACKING_OPEN)")]
    OpenBacking {
        /// The ioctl's error: `EPERM` without `CAP_SYS_ADMIN` or with `max_stack_depth` 0.
        #[source]
        source: io::Error,
    },
    /// Reading the file through the mount failed.
    #[error("cannot read {path} through the probe mount")]
    Read {
        /// The file inside the mount.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The read returned other bytes than the backing file holds.
    #[error(
        "read {got} bytes through the mount, expected the backing file's {expected} bytes \
         (first difference at byte {first_difference})"
    )]
    ContentMismatch {
        /// Length of the backing file.
        expected: usize,
        /// Bytes the read returned.
        got: usize,
        /// Offset of the first byte that differs.
        first_difference: usize,
    },
    /// The daemon's `read` handler was called: the open was not passthrough.
    #[error("{reads} read requests reached the daemon: the open was not served by passthrough")]
    NotPassthrough {
        /// How many `READ` requests the daemon saw.
        reads: u64,
    },
    /// The read through the mount did not finish in time.
    #[error("the read through the probe mount did not finish within {0:?}")]
    Timeout(Duration),
    /// Unmounting the probe filesystem failed.
    #[error("cannot unmount the probe filesystem at {mountpoint}")]
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl ProbeError {
    /// How to fix the failure, for people reading setup's output.
    pub fn hint(&self) -> &'static str {
        match self {
            Self::NoDevice => {
                "the kernel needs CONFIG_FUSE_FS=y (it cannot be a module here), and devtmpfs \
                 must be mounted on /dev"
            }
            Self::TempDir { .. } | Self::Create { .. } => {
                "the temporary directory must be writable; set TMPDIR to a writable directory"
            }
            Self::NotOffered { .. } => {
                "FUSE passthrough needs Linux 6.9 or later (FUSE ABI 7.40) built with \
                 CONFIG_FUSE_PASSTHROUGH=y"
            }
            Self::StackDepth { .. } => "the kernel's FILESYSTEM_MAX_STACK_DEPTH is below 1",
            Self::Mount { .. } => {
                "mounting FUSE needs root (CAP_SYS_ADMIN) and a kernel with CONFIG_FUSE_FS=y; \
                 run as root"
            }
            Self::OpenBacking { .. } => {
                "passthrough backing files need CAP_SYS_ADMIN in the daemon (run as root), \
                 max_stack_depth of at least 1 in its init, and a backing filesystem that is \
                 not itself stacked (ext4, xfs, btrfs, tmpfs)"
            }
            Self::Read { .. } | Self::ContentMismatch { .. } | Self::NotPassthrough { .. } => {
                "the kernel's FUSE passthrough does not behave as DeltaFS needs; use Linux 6.9 \
                 or later with CONFIG_FUSE_PASSTHROUGH=y"
            }
            Self::Timeout(_) => "the FUSE daemon thread stalled; rerun the probe",
            Self::Unmount { .. } => "something still uses the probe mount; unmount it by hand",
        }
    }
}

/// Runs the probe in the system's temporary directory with [`DEFAULT_TIMEOUT`].
pub fn passthrough_probe() -> Result<ProbeReport, ProbeError> {
    passthrough_probe_in(&std::env::temp_dir(), DEFAULT_TIMEOUT)
}

/// Runs the probe in a fresh directory under `base`, waiting at most `timeout` for the read.
pub fn passthrough_probe_in(base: &Path, timeout: Duration) -> Result<ProbeReport, ProbeError> {
    let start = Instant::now();
    if !Path::new("/dev/fuse").exists() {
        return Err(ProbeError::NoDevice);
    }
    // Declared before the mount guard so that it is dropped after it: unmount, then remove.
    let dir = TempDir::new(base)?;
    let content = probe_content(CONTENT_LEN);
    let backing_path = dir.path().join("backing.bin");
    fs::write(&backing_path, &content).map_err(|source| ProbeError::Create {
        path: backing_path.clone(),
        source,
    })?;
    let backing = File::open(&backing_path).map_err(|source| ProbeError::Create {
        path: backing_path.clone(),
        source,
    })?;
    let mountpoint = dir.path().join("mnt");
    fs::create_dir(&mountpoint).map_err(|source| ProbeError::Create {
        path: mountpoint.clone(),
        source,
    })?;

    let observed = Arc::new(Observed::default());
    let filesystem = ProbeFs::new(backing, content.len() as u64, Arc::clone(&observed));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("deltafs-probe".to_owned()),
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    let session = fuser::spawn_mount(filesystem, &mountpoint, &config).map_err(|source| {
        observed
            .take_init_failure()
            .unwrap_or_else(|| ProbeError::Mount {
                mountpoint: mountpoint.clone(),
                source,
            })
    })?;
    let mut mount = MountGuard {
        session: Some(session),
        mountpoint: mountpoint.clone(),
    };

    let path = mountpoint.join(FILE_NAME);
    let Some(read) = read_with_timeout(&path, timeout) else {
        mount.abandon();
        return Err(ProbeError::Timeout(timeout));
    };
    let bytes_read = verdict(read, &content, &observed, &path)?;
    mount.unmount()?;
    drop(dir);

    Ok(ProbeReport {
        kernel_abi: observed.kernel_abi(),
        bytes_read,
        opens: observed.opens.load(Ordering::Relaxed),
        daemon_reads: observed.reads.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    })
}

/// Deterministic, non-repeating-per-page bytes, so a page served from the wrong offset or a
/// zero-filled hole shows as a mismatch.
fn probe_content(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 12)) as u8)
        .collect()
}

/// Judges what the read through the mount returned, against the backing file's content and
/// what the daemon saw. Returns the number of bytes read.
fn verdict(
    read: io::Result<Vec<u8>>,
    expected: &[u8],
    observed: &Observed,
    path: &Path,
) -> Result<usize, ProbeError> {
    let data = match read {
        Ok(data) => data,
        Err(source) => {
            return Err(match observed.take_open_backing_error() {
                Some(source) => ProbeError::OpenBacking { source },
                None => ProbeError::Read {
                    path: path.to_owned(),
                    source,
                },
            });
        }
    };
    let reads = observed.reads.load(Ordering::Relaxed);
    if reads > 0 {
        return Err(ProbeError::NotPassthrough { reads });
    }
    if data != expected {
        let first_difference = data
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| data.len().min(expected.len()));
        return Err(ProbeError::ContentMismatch {
            expected: expected.len(),
            got: data.len(),
            first_difference,
        });
    }
    Ok(data.len())
}

/// Reads `path` on a helper thread; `None` when it does not finish within `timeout` (the
/// thread is then left blocked in the kernel until the mount goes away).
fn read_with_timeout(path: &Path, timeout: Duration) -> Option<io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_owned();
    let spawned = thread::Builder::new()
        .name("deltafs-probe-read".to_owned())
        .spawn(move || {
            // The receiver is gone only after a timeout; nothing is left to tell.
            let _ = tx.send(fs::read(&path));
        });
    if let Err(e) = spawned {
        return Some(Err(e));
    }
    rx.recv_timeout(timeout).ok()
}

/// Owns the background FUSE session; unmounts (lazily if it must) when dropped.
struct MountGuard {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl MountGuard {
    /// Unmounts and joins the session thread, reporting failure.
    fn unmount(&mut self) -> Result<(), ProbeError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        session
            .umount_and_join()
            .map_err(|source| ProbeError::Unmount {
                mountpoint: self.mountpoint.clone(),
                source,
            })
    }

    /// Detaches the mount without waiting for the session thread, which may be stuck.
    fn abandon(&mut self) {
        // Best effort: the mount may already be gone.
        let _ = umount2(&self.mountpoint, MntFlags::MNT_DETACH);
        // Dropping the session detaches its thread; its own unmount finds nothing to do.
        self.session = None;
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.unmount().is_err() {
            let _ = umount2(&self.mountpoint, MntFlags::MNT_DETACH);
        }
    }
}

/// A directory created with `mkdtemp`, removed with its content when dropped.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(base: &Path) -> Result<Self, ProbeError> {
        mkdtemp(&base.join("deltafs-probe-XXXXXX"))
            .map(Self)
            .map_err(|errno| ProbeError::TempDir {
                base: base.to_owned(),
                source: errno.into(),
            })
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: nothing useful can be done with a failure while dropping.
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::filesystem::lock;
    use super::*;

    fn observed() -> Observed {
        Observed::default()
    }

    #[test]
    fn content_is_deterministic_and_differs_between_pages() {
        let content = probe_content(CONTENT_LEN);
        assert_eq!(content.len(), CONTENT_LEN);
        assert_eq!(content, probe_content(CONTENT_LEN));
        assert_ne!(content[..4096], content[4096..8192]);
        assert!(content.iter().any(|&b| b != 0));
    }

    #[test]
    fn verdict_accepts_matching_passthrough_read() {
        let content = probe_content(100);
        let n = verdict(Ok(content.clone()), &content, &observed(), Path::new("f")).unwrap();
        assert_eq!(n, 100);
    }

    #[test]
    fn verdict_rejects_reads_served_by_the_daemon() {
        let content = probe_content(100);
        let seen = observed();
        seen.reads.store(2, Ordering::Relaxed);
        let err = verdict(Ok(content.clone()), &content, &seen, Path::new("f")).unwrap_err();
        assert!(
            matches!(err, ProbeError::NotPassthrough { reads: 2 }),
            "{err}"
        );
    }

    #[test]
    fn verdict_reports_first_difference_and_short_reads() {
        let content = probe_content(100);
        let mut other = content.clone();
        other[42] ^= 0xff;
        let err = verdict(Ok(other), &content, &observed(), Path::new("f")).unwrap_err();
        assert!(matches!(
            err,
            ProbeError::ContentMismatch {
                expected: 100,
                got: 100,
                first_difference: 42
            }
        ));
        let err = verdict(
            Ok(content[..10].to_vec()),
            &content,
            &observed(),
            Path::new("f"),
        );
        assert!(matches!(
            err,
            Err(ProbeError::ContentMismatch {
                got: 10,
                first_difference: 10,
                ..
            })
        ));
    }

    #[test]
    fn verdict_prefers_the_backing_open_error_over_the_read_error() {
        let content = probe_content(10);
        let seen = observed();
        *lock(&seen.open_backing_error) = Some(io::Error::from_raw_os_error(libc::EPERM));
        let read = Err(io::Error::from_raw_os_error(libc::EPERM));
        let err = verdict(read, &content, &seen, Path::new("f")).unwrap_err();
        assert!(matches!(err, ProbeError::OpenBacking { .. }), "{err}");

        let read = Err(io::Error::from_raw_os_error(libc::EIO));
        let err = verdict(read, &content, &observed(), Path::new("f")).unwrap_err();
        assert!(matches!(err, ProbeError::Read { .. }), "{err}");
    }

    #[test]
    fn messages_are_lower_case_and_have_hints() {
        let errors = [
            ProbeError::NoDevice,
            ProbeError::NotOffered {
                kernel_abi: "7.31".to_owned(),
            },
            ProbeError::StackDepth { max: 0 },
            ProbeError::NotPassthrough { reads: 1 },
            ProbeError::Timeout(Duration::from_secs(1)),
        ];
        for err in errors {
            let message = err.to_string();
            let first = message.chars().next().unwrap();
            assert!(
                !first.is_uppercase() || message.starts_with("FUSE"),
                "{message}"
            );
            assert!(!message.ends_with('.'), "{message}");
            assert!(!err.hint().is_empty());
        }
    }

    #[test]
    fn temp_dir_is_created_and_removed() {
        let dir = TempDir::new(&std::env::temp_dir()).unwrap();
        let path = dir.path().to_owned();
        fs::write(path.join("x"), b"x").unwrap();
        assert!(path.is_dir());
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn read_with_timeout_reads_a_plain_file() {
        let dir = TempDir::new(&std::env::temp_dir()).unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"abc").unwrap();
        let data = read_with_timeout(&path, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(data, b"abc");
    }
}
