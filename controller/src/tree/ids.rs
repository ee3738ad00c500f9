//! Ids of trees, sandboxes, nodes and sessions: UUIDv7, globally unique and sortable by
//! creation time, written as lower-case hyphenated strings.
//!
//! A UUIDv7 starts with a 48-bit millisecond timestamp, so ids made in the same minute
//! share their first 8 hex digits; the uuid crate then puts a 42-bit counter, leaving
//! the last 32 bits random. The [short form](NodeId::short) is therefore the *last* 8 hex
//! digits, and [`match_prefix`] accepts a prefix of either the full id or the short form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Length of an id's short form, in hex digits.
pub const SHORT_LEN: usize = 8;

/// An id string that is not a UUID.
#[derive(Debug, thiserror::Error)]
#[error(
    "{kind} id {input:?} is not a uuid (expected 32 hex digits, e.g. 0193b2c4-5d6e-7f80-9a1b-2c3d4e5f6a7b): {source}"
)]
pub struct ParseIdError {
    /// What the id names (`"node"`, `"sandbox"` ...).
    pub kind: &'static str,
    /// The text that failed to parse.
    pub input: String,
    /// The uuid crate's reason.
    #[source]
    pub source: uuid::Error,
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Uuid);

        impl $name {
            /// What this id names, for messages.
            pub const KIND: &'static str = $kind;

            /// A fresh id (UUIDv7: the current unix time in ms, then a counter that
            /// keeps ids made by this process in creation order, then random bits).
            #[allow(clippy::new_without_default)] // a default id would hide a fresh one
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// The id's UUID.
            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            /// The short form for display: the last 8 hex digits (the random part).
            pub fn short(&self) -> String {
                short_of(&self.0)
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::try_parse(s.trim()).map(Self).map_err(|source| ParseIdError {
                    kind: $kind,
                    input: s.to_owned(),
                    source,
                })
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0.hyphenated())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

define_id!(
    /// A checkpoint tree: the root of a sandbox's history and every branch made from it.
    TreeId,
    "tree"
);
define_id!(
    /// A live sandbox.
    SandboxId,
    "sandbox"
);
define_id!(
    /// A node of a checkpoint tree (one checkpoint).
    NodeId,
    "node"
);
define_id!(
    /// A persistent session (an interpreter process) in a sandbox.
    SessionId,
    "session"
);

fn short_of(u: &Uuid) -> String {
    let simple = u.simple().to_string();
    simple[simple.len() - SHORT_LEN..].to_owned()
}

/// How a prefix failed to pick exactly one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixMatch<T> {
    /// Exactly one id matches.
    One(T),
    /// No id matches.
    None,
    /// Several ids match (all of them, in the order given).
    Many(Vec<T>),
}

/// Normalises a user's prefix: lower case, dashes removed; `None` if it is empty or
/// holds anything but hex digits and dashes (such a prefix can match no id).
pub fn normalise_prefix(prefix: &str) -> Option<String> {
    let p: String = prefix
        .trim()
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (!p.is_empty() && p.chars().all(|c| c.is_ascii_hexdigit())).then_some(p)
}

/// True if the normalised prefix `p` starts the id's 32 hex digits or its short form.
pub fn id_matches(p: &str, id: &Uuid) -> bool {
    let simple = id.simple().to_string();
    simple.starts_with(p) || short_of(id).starts_with(p)
}

/// Picks the ids that `prefix` names among `ids`: a prefix of the full id (dashes and
/// case ignored) or of the short form. A full id is always unique: no other id starts
/// with it, and a short form is too short to equal it.
pub fn match_prefix<T, I>(prefix: &str, ids: I) -> PrefixMatch<T>
where
    T: Copy + Into<Uuid>,
    I: IntoIterator<Item = T>,
{
    let Some(p) = normalise_prefix(prefix) else {
        return PrefixMatch::None;
    };
    let mut found: Vec<T> = ids
        .into_iter()
        .filter(|id| id_matches(&p, &(*id).into()))
        .collect();
    match found.len() {
        0 => PrefixMatch::None,
        1 => PrefixMatch::One(found.remove(0)),
        _ => PrefixMatch::Many(found),
    }
}

macro_rules! into_uuid {
    ($($name:ident),*) => {$(
        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }
    )*};
}
into_uuid!(TreeId, SandboxId, NodeId, SessionId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_and_serde_round_trip() {
        let id = NodeId::new();
        let s = id.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(s.parse::<NodeId>().unwrap(), id);
        assert_eq!(s.to_uppercase().parse::<NodeId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
        assert_eq!(id.as_uuid().get_version_num(), 7);
    }

    #[test]
    fn parse_error_names_kind_and_input() {
        let e = "not-an-id".parse::<SandboxId>().unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("sandbox id \"not-an-id\""), "{msg}");
        assert!(serde_json::from_str::<SandboxId>("\"zz\"").is_err());
    }

    #[test]
    fn ids_sort_in_creation_order_and_shorts_differ() {
        let ids: Vec<NodeId> = (0..1000).map(|_| NodeId::new()).collect();
        let mut sorted = ids.clone();
        sorted.sort_by_key(|i| i.to_string());
        assert_eq!(sorted, ids, "string order is creation order");
        let shorts: std::collections::HashSet<String> = ids.iter().map(|i| i.short()).collect();
        assert_eq!(shorts.len(), ids.len(), "short forms are random, not time");
        assert!(ids[0].to_string().ends_with(&ids[0].short()));
    }

    #[test]
    fn prefix_matching() {
        let a: NodeId = "0193b2c4-5d6e-7f80-9a1b-2c3d4e5f6a7b".parse().unwrap();
        let b: NodeId = "0193b2c4-5d6e-7f80-9a1b-aaaa11112222".parse().unwrap();
        let ids = [a, b];
        assert_eq!(match_prefix("4e5f", ids), PrefixMatch::One(a));
        assert_eq!(match_prefix("11112222", ids), PrefixMatch::One(b));
        assert_eq!(
            match_prefix("0193B2C4-5d", ids),
            PrefixMatch::Many(vec![a, b])
        );
        assert_eq!(match_prefix(&a.to_string(), ids), PrefixMatch::One(a));
        assert_eq!(match_prefix("ffff", ids), PrefixMatch::None);
        assert_eq!(match_prefix("", ids), PrefixMatch::None);
        assert_eq!(match_prefix("xyz", ids), PrefixMatch::None);
    }
}
