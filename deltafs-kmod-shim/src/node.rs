//! What the index stores per inode: [`Node`], its [`Kind`], times and the reference to
//! the backing data ([`DataRef`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::chunks::Partial;
use crate::ids::{Ino, LayerId};

/// The type of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// Regular file (data in a backing file).
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
}

impl Kind {
    /// The kind named by the `S_IFMT` bits of `mode`.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Self::File,
            libc::S_IFDIR => Self::Dir,
            libc::S_IFLNK => Self::Symlink,
            libc::S_IFIFO => Self::Fifo,
            libc::S_IFSOCK => Self::Socket,
            libc::S_IFCHR => Self::CharDev,
            libc::S_IFBLK => Self::BlockDev,
            _ => return None,
        })
    }

    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Self::File => libc::S_IFREG,
            Self::Dir => libc::S_IFDIR,
            Self::Symlink => libc::S_IFLNK,
            Self::Fifo => libc::S_IFIFO,
            Self::Socket => libc::S_IFSOCK,
            Self::CharDev => libc::S_IFCHR,
            Self::BlockDev => libc::S_IFBLK,
        }
    }
}

/// A timestamp with nanoseconds, as `stat` reports it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Time {
    /// Seconds since the epoch (negative before it).
    pub sec: i64,
    /// Nanoseconds, below 1e9.
    pub nsec: u32,
}

impl Time {
    /// The current time.
    pub fn now() -> Self {
        SystemTime::now().into()
    }

    /// The `SystemTime` this is.
    pub fn to_system(self) -> SystemTime {
        if self.sec >= 0 {
            UNIX_EPOCH + Duration::new(self.sec as u64, self.nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.sec.unsigned_abs()) + Duration::new(0, self.nsec)
        }
    }
}

impl From<SystemTime> for Time {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos();
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Self { sec, nsec }
            }
        }
    }
}

/// Bytes that serialize as a string when they are UTF-8 (names, paths, xattr values are
/// almost always) and as an array of numbers otherwise.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(&self.0), f)
    }
}

impl From<&[u8]> for Bytes {
    fn from(b: &[u8]) -> Self {
        Self(b.to_vec())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => self.0.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Raw(Vec<u8>),
        }
        Ok(match Repr::deserialize(d)? {
            Repr::Text(text) => Self(text.into_bytes()),
            Repr::Raw(raw) => Self(raw),
        })
    }
}

/// Where a node's content comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataRef {
    /// A path relative to the base tree's root: a file's data, or a directory whose
    /// listing seeds this directory (read on first use).
    Base(Bytes),
    /// Backing file `f<file>` of a layer (regular files only).
    Layer {
        /// The layer that owns the backing file.
        layer: LayerId,
        /// The file's number within that layer.
        file: u64,
    },
}

/// One inode of the index. Immutable once shared: a change makes a new `Arc<Node>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// File type.
    pub kind: Kind,
    /// Permission bits, setuid/setgid/sticky included (`mode & 0o7777`).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Number of names (directories: 2 + subdirectories).
    pub nlink: u32,
    /// Device number of a device node.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    /// Size of anything but a regular file (whose size is its backing file's).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// Last access.
    pub atime: Time,
    /// Last modification; for a regular file with `mtime_from_data`, its backing file's.
    pub mtime: Time,
    /// Last status change.
    pub ctime: Time,
    /// A regular file's modification time is its backing file's (which passthrough
    /// writes update without the daemon knowing). False after a `utimensat` on a file
    /// whose data is frozen: then `mtime` holds it until the next copy-up.
    pub mtime_from_data: bool,
    /// A directory's parent (for `..`); 0 otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parent: Ino,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Bytes>,
    /// Extended attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<Bytes, Bytes>,
    /// A regular file's backing file, or a base directory's base listing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataRef>,
    /// A regular file copied up chunk by chunk: where the bytes its backing file does not
    /// hold come from ([`crate::chunks`]). Never in version-1 (JSON) metadata.
    #[serde(skip)]
    pub partial: Option<Arc<Partial>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Node {
    /// A fresh node of `kind` owned by `uid:gid`, all times now, one link (two for a
    /// directory).
    pub fn new(kind: Kind, perm: u16, uid: u32, gid: u32) -> Self {
        let now = Time::now();
        Self {
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            rdev: 0,
            size: if kind == Kind::Dir { 4096 } else { 0 },
            atime: now,
            mtime: now,
            ctime: now,
            mtime_from_data: kind == Kind::File,
            parent: 0,
            target: None,
            xattrs: BTreeMap::new(),
            data: None,
            partial: None,
        }
    }

    /// `st_mode`: type and permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | u32::from(self.perm)
    }

    /// The layer holding this node's backing file, if it is in a layer.
    pub fn data_layer(&self) -> Option<LayerId> {
        match self.data {
            Some(DataRef::Layer { layer, .. }) => Some(layer),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_convert_both_ways() {
        for t in [
            Time { sec: 0, nsec: 0 },
            Time {
                sec: 1_700_000_000,
                nsec: 123,
            },
            Time {
                sec: -5,
                nsec: 250_000_000,
            },
        ] {
            assert_eq!(Time::from(t.to_system()), t);
        }
    }

    #[test]
    fn bytes_serialize_as_text_or_numbers() {
        let text = Bytes(b"a/b".to_vec());
        assert_eq!(serde_json::to_string(&text).unwrap(), "\"a/b\"");
        let raw = Bytes(vec![0xff, 0x00]);
        let json = serde_json::to_string(&raw).unwrap();
        assert_eq!(json, "[255,0]");
        assert_eq!(serde_json::from_str::<Bytes>(&json).unwrap(), raw);
        assert_eq!(serde_json::from_str::<Bytes>("\"a/b\"").unwrap(), text);
    }

    #[test]
    fn kinds_round_trip_through_mode() {
        for kind in [
            Kind::File,
            Kind::Dir,
            Kind::Symlink,
            Kind::Fifo,
            Kind::Socket,
            Kind::CharDev,
            Kind::BlockDev,
        ] {
            assert_eq!(Kind::from_mode(kind.mode_bits() | 0o644), Some(kind));
        }
        let node = Node::new(Kind::Dir, 0o1755, 1, 2);
        assert_eq!(node.mode(), libc::S_IFDIR | 0o1755);
        assert_eq!(node.nlink, 2);
    }
}
