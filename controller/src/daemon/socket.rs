//! Claiming the API's Unix socket path: a live owner is an error naming its pid, a
//! stale socket (nothing listens) is replaced, anything else at the path is left alone.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::DaemonError;

/// Mode of the socket: the API can load programs' state and watch any cgroup, so only
/// root may talk to it.
const SOCKET_MODE: u32 = 0o600;

/// Mode of a socket directory this daemon creates.
const SOCKET_DIR_MODE: u32 = 0o755;

/// A bound API socket and the identity of its file, so that only this file is removed
/// at exit (not a socket a later daemon bound at the same path). Dropping it removes
/// the file.
#[derive(Debug)]
pub struct ApiSocket {
    listener: UnixListener,
    file: SocketFile,
}

impl ApiSocket {
    /// Binds `path`: creates its parent directory, replaces a stale socket, and fails
    /// if a process accepts connections on it or if something else is there.
    pub fn claim(path: &Path) -> Result<Self, DaemonError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(SOCKET_DIR_MODE)
                .create(parent)
                .map_err(|source| DaemonError::SocketDir {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        match fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(DaemonError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(stream) => {
                    // The owner's pid, as the kernel recorded it when it called listen().
                    let pid = getsockopt(&stream, PeerCredentials)
                        .ok()
                        .map(|cred| cred.pid());
                    return Err(DaemonError::SocketInUse {
                        path: path.to_path_buf(),
                        pid,
                    });
                }
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::warn!(socket = %path.display(), "removing stale socket");
                    remove_if_present(path).map_err(|source| DaemonError::SocketProbe {
                        path: path.to_path_buf(),
                        source,
                    })?;
                }
                // Removed between the stat and the connect: nothing to replace.
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(DaemonError::SocketProbe {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            },
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DaemonError::SocketProbe {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| match source.kind() {
            // Another daemon bound it between our probe and our bind.
            io::ErrorKind::AddrInUse => DaemonError::SocketInUse {
                path: path.to_path_buf(),
                pid: None,
            },
            _ => DaemonError::Bind {
                path: path.to_path_buf(),
                source,
            },
        })?;
        // bind() created the file with mode 0777 & ~umask; with the usual umask 022
        // nobody else can connect (that needs write permission) before this chmod.
        let bind_err = |source| DaemonError::Bind {
            path: path.to_path_buf(),
            source,
        };
        fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE)).map_err(bind_err)?;
        let file = SocketFile::of(path).map_err(bind_err)?;
        Ok(Self { listener, file })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// A tokio listener, and the file to remove at exit.
    pub fn into_tokio(self) -> Result<(tokio::net::UnixListener, SocketFile), DaemonError> {
        let err = |source| DaemonError::Bind {
            path: self.file.path.clone(),
            source,
        };
        self.listener.set_nonblocking(true).map_err(err)?;
        let listener = tokio::net::UnixListener::from_std(self.listener).map_err(err)?;
        Ok((listener, self.file))
    }
}

/// The socket file this daemon created, identified by device and inode; removed when
/// dropped.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and change time: tmpfs reuses inode numbers at once, so a
    /// successor's socket can have ours; the change time (set by our chmod) tells
    /// them apart.
    identity: (u64, u64, i64, i64),
}

impl SocketFile {
    fn of(path: &Path) -> io::Result<Self> {
        let meta = fs::symlink_metadata(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            identity: identity(&meta),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file if it is still the one this daemon bound. Returns whether it
    /// removed it.
    pub fn remove(&self) -> bool {
        let ours =
            fs::symlink_metadata(&self.path).is_ok_and(|meta| identity(&meta) == self.identity);
        if !ours {
            return false;
        }
        match fs::remove_file(&self.path) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(socket = %self.path.display(), error = %err, "cannot remove socket");
                false
            }
        }
    }
}

impl Drop for SocketFile {
    /// A daemon that fails after claiming the socket (no programs to adopt, say)
    /// leaves no socket file behind.
    fn drop(&mut self) {
        self.remove();
    }
}

fn identity(meta: &fs::Metadata) -> (u64, u64, i64, i64) {
    (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_owner_is_named_by_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _owner = UnixListener::bind(&path).unwrap();
        let err = ApiSocket::claim(&path).unwrap_err();
        let pid = i32::try_from(std::process::id()).unwrap();
        assert!(
            matches!(err, DaemonError::SocketInUse { pid: Some(p), .. } if p == pid),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(&format!("pid {pid}")), "{message}");
        assert_eq!(err.exit_code(), 75);
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        let err = UnixStream::connect(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);

        let claimed = ApiSocket::claim(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, SOCKET_MODE);
        // Replaced by a live one: connecting works now.
        UnixStream::connect(&path).unwrap();

        let (_listener, file) = claimed.into_tokio_for_test();
        assert!(file.remove());
        assert!(!path.exists());
    }

    #[test]
    fn non_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        fs::write(&path, "keep me").unwrap();
        let err = ApiSocket::claim(&path).unwrap_err();
        assert!(matches!(err, DaemonError::NotASocket { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[test]
    fn creates_parent_directory_and_removes_the_file_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/deltabox/api.sock");
        let claimed = ApiSocket::claim(&path).unwrap();
        assert_eq!(claimed.path(), path);
        assert!(path.exists());
        // What happens when start-up fails after the claim.
        drop(claimed);
        assert!(!path.exists());
    }

    #[test]
    fn only_our_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let claimed = ApiSocket::claim(&path).unwrap();
        let (_listener, file) = claimed.into_tokio_for_test();
        // A successor replaced the file.
        fs::remove_file(&path).unwrap();
        let _successor = UnixListener::bind(&path).unwrap();
        assert!(!file.remove());
        assert!(path.exists());
    }

    impl ApiSocket {
        /// Like `into_tokio`, without needing a runtime.
        fn into_tokio_for_test(self) -> (UnixListener, SocketFile) {
            (self.listener, self.file)
        }
    }
}
