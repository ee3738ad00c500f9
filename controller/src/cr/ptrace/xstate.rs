//! [`XState`]: a task's XSAVE area, and how records carry it.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The XSAVE area of a task (x87, SSE, AVX, … state), as `PTRACE_GETREGSET
/// NT_X86_XSTATE` returns it: opaque bytes given back whole to `PTRACE_SETREGSET`.
///
/// Serialized as one base64 string: ~2.7 KiB with AVX-512, which as a JSON array of
/// numbers was most of a tree node's record (and of the time to write and check it).
/// An array, as records written before were, is still read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XState(pub Vec<u8>);

impl Serialize for XState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for XState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(XStateVisitor)
    }
}

struct XStateVisitor;

impl<'de> Visitor<'de> for XStateVisitor {
    type Value = XState;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an XSAVE area as a base64 string (or an array of bytes)")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<XState, E> {
        STANDARD
            .decode(v)
            .map(XState)
            .map_err(|e| E::custom(format!("XSAVE area: {e}")))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<XState, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(b) = seq.next_element::<u8>()? {
            bytes.push(b);
        }
        Ok(XState(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_base64_and_reads_the_old_array_form() {
        let x = XState((0..=255).collect());
        let json = serde_json::to_string(&x).unwrap();
        assert!(json.starts_with('"'), "{json}");
        assert_eq!(serde_json::from_str::<XState>(&json).unwrap(), x);
        let old = serde_json::to_string(&x.0).unwrap();
        assert_eq!(serde_json::from_str::<XState>(&old).unwrap(), x);
        assert!(serde_json::from_str::<XState>("\"not base64!\"").is_err());
    }
}
