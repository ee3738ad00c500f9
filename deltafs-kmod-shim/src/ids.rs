//! Identifiers: layers and snapshots (UUIDv7, globally unique, never counters) and inode
//! numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A DeltaFS inode number: stable for the life of a file in every view and snapshot of a
/// store. 1 is the root; numbers from the base tree have [`BASE_INO_FLAG`] set; the rest
/// come from the store's allocator and are never reused.
pub type Ino = u64;

/// The root directory's inode number (FUSE's `FUSE_ROOT_ID`).
pub const ROOT_INO: Ino = 1;

/// Set in the inode numbers of objects that come from the base tree (derived from the
/// base's own inode numbers, so they are the same in every view and after a restart).
pub const BASE_INO_FLAG: Ino = 1 << 62;

/// The id of a layer: a directory `<store>/layers/<id>/`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LayerId(Uuid);

impl LayerId {
    /// A fresh id (UUIDv7: time-ordered, globally unique).
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id's 16 bytes (as stored in binary layer metadata).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.into_bytes()
    }

    /// The id whose bytes are `bytes`.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LayerId({self})")
    }
}

/// A string that is not a layer or snapshot id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {0:?}: expected a UUID")]
pub struct IdError(pub String);

impl FromStr for LayerId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| IdError(s.to_owned()))
    }
}

impl TryFrom<String> for LayerId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<LayerId> for String {
    fn from(id: LayerId) -> Self {
        id.to_string()
    }
}

/// The id of a snapshot (a checkpoint): the id of the layer that was frozen to make it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId(LayerId);

impl SnapshotId {
    /// The snapshot made by freezing `layer`.
    pub fn of_layer(layer: LayerId) -> Self {
        Self(layer)
    }

    /// The layer frozen to make this snapshot.
    pub fn layer(self) -> LayerId {
        self.0
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

impl FromStr for SnapshotId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        s.parse().map(Self)
    }
}

impl TryFrom<String> for SnapshotId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<SnapshotId> for String {
    fn from(id: SnapshotId) -> Self {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_unique() {
        let a = LayerId::generate();
        let b = LayerId::generate();
        assert_ne!(a, b);
        assert_eq!(a.to_string().parse::<LayerId>().unwrap(), a);
        let s = SnapshotId::of_layer(a);
        assert_eq!(s.to_string(), a.to_string());
        assert_eq!(s.to_string().parse::<SnapshotId>().unwrap(), s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, format!("\"{a}\""));
        assert_eq!(serde_json::from_str::<SnapshotId>(&json).unwrap(), s);
        assert!("nope".parse::<LayerId>().is_err());
    }
}
