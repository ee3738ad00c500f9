//! Chunk records ([`crate::chunks::Partial`]) in the binary format (version 4): see the
//! grammar in the parent module (`partial`).

use std::sync::Arc;

use super::{Decoder, Encoder, data_kind};
use crate::chunks::Partial;
use crate::ids::LayerId;
use crate::persist::PersistError;

/// Deepest chain of chunk records decoded (writers flatten at
/// [`crate::chunks::MAX_DEPTH`]); a damaged file cannot recurse further.
const MAX_CHAIN: usize = 64;

impl Encoder {
    /// Writes a chunk record (`partial` in the grammar).
    pub(super) fn partial(&mut self, partial: &Partial, own: LayerId, layers: &[LayerId]) {
        self.varint(partial.held.len() as u64);
        let mut prev = 0;
        for &(s, e) in &partial.held {
            self.varint(s - prev);
            self.varint(if e == u64::MAX { 0 } else { e - s });
            prev = e;
        }
        self.buf.push(data_kind(&partial.below, own));
        self.data_ref(&partial.below, own, layers);
        match &partial.lower {
            Some(lower) => {
                self.buf.push(1);
                self.partial(lower, own, layers);
            }
            None => self.buf.push(0),
        }
    }
}

impl Decoder<'_> {
    /// A chunk record, `depth` records deep in its chain.
    pub(super) fn partial(
        &mut self,
        own: LayerId,
        layers: &[LayerId],
        depth: usize,
    ) -> Result<Partial, PersistError> {
        if depth >= MAX_CHAIN {
            return Err(self.error("chain of chunk records too deep"));
        }
        let count = self.count()?;
        let mut held = Vec::with_capacity(count);
        let mut prev = 0u64;
        for i in 0..count {
            let gap = self.varint()?;
            let len = self.varint()?;
            let start = prev
                .checked_add(gap)
                .ok_or_else(|| self.error("held range out of range"))?;
            if i > 0 && gap == 0 {
                return Err(self.error("held ranges not disjoint"));
            }
            let end = if len == 0 {
                u64::MAX
            } else {
                start
                    .checked_add(len)
                    .filter(|&end| end < u64::MAX)
                    .ok_or_else(|| self.error("held range out of range"))?
            };
            held.push((start, end));
            prev = end;
        }
        let kind = self.byte()?;
        let below = self.data_ref(kind, own, layers)?;
        let lower = match self.byte()? {
            0 => None,
            1 => Some(Arc::new(self.partial(own, layers, depth + 1)?)),
            _ => return Err(self.error("bad chunk record flag")),
        };
        Ok(Partial { below, lower, held })
    }
}
