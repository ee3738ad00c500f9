//! One-shot commands (`POST /v1/sandboxes/{id}/exec`): the request, the result, and the
//! events of its streamed form.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::NodeInfo;

/// `POST /v1/sandboxes/{id}/exec`: a one-shot command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command and its arguments (`argv[0]` is searched in `PATH`).
    pub argv: Vec<String>,
    /// Extra environment (over the sandbox's default `PATH`, `HOME`, `LANG`, `TERM`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox (default `/workspace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Data for its stdin (default: none, stdin is `/dev/null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill it (its whole process group) after this long (default 600 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The result of `exec`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// What it wrote to stdout (lossy UTF-8).
    pub stdout: String,
    /// What it wrote to stderr.
    pub stderr: String,
    /// Killed by the timeout.
    pub timed_out: bool,
    /// Output beyond the cap (8 MiB per stream) was dropped.
    pub truncated: bool,
    /// Wall time.
    pub duration_ms: f64,
    /// The checkpoint taken after it (`auto_checkpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeInfo>,
}

/// One event of a streamed `exec` (asked for with `Accept: application/x-ndjson`): one
/// JSON object per line, tagged by its `type`. Output events come as the command
/// writes; the last event is `exit` or `error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// A chunk of the command's stdout.
    Stdout(OutputChunk),
    /// A chunk of the command's stderr.
    Stderr(OutputChunk),
    /// The command ended (or was killed by its timeout): the last event.
    Exit(ExecExit),
    /// The call failed after the command started (its sandbox was removed, the
    /// auto-checkpoint failed): the last event.
    Error(StreamError),
}

/// Output bytes: `data` when they are UTF-8 text, else `data_b64` (standard base64,
/// padded). A character split between two reads is held back and sent whole.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// The bytes, when they are UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The bytes in base64, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
}

impl OutputChunk {
    /// The chunk for `bytes`: text if they are UTF-8, else base64.
    pub fn of(bytes: Vec<u8>) -> Self {
        match String::from_utf8(bytes) {
            Ok(text) => Self {
                data: Some(text),
                data_b64: None,
            },
            Err(e) => Self {
                data: None,
                data_b64: Some(base64::encode(e.as_bytes())),
            },
        }
    }

    /// The bytes it carries (`None`: `data_b64` is not valid base64).
    pub fn bytes(&self) -> Option<Vec<u8>> {
        match (&self.data, &self.data_b64) {
            (Some(text), _) => Some(text.clone().into_bytes()),
            (None, Some(b64)) => base64::decode(b64),
            (None, None) => Some(Vec::new()),
        }
    }
}

/// How a streamed command ended: the fields of [`ExecResult`] but its output, which
/// came as events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecExit {
    /// Exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Killed by the timeout.
    pub timed_out: bool,
    /// Output was dropped: beyond the cap (8 MiB per stream), or not taken by the
    /// client before the timeout.
    pub truncated: bool,
    /// Wall time.
    pub duration_ms: f64,
    /// The checkpoint taken after it (`auto_checkpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeInfo>,
}

impl From<ExecResult> for ExecExit {
    fn from(r: ExecResult) -> Self {
        Self {
            exit_code: r.exit_code,
            signal: r.signal,
            timed_out: r.timed_out,
            truncated: r.truncated,
            duration_ms: r.duration_ms,
            node: r.node,
        }
    }
}

impl ExecExit {
    /// The collected result, with the output gathered from the events.
    pub fn into_result(self, stdout: &[u8], stderr: &[u8]) -> ExecResult {
        ExecResult {
            exit_code: self.exit_code,
            signal: self.signal,
            stdout: String::from_utf8_lossy(stdout).into_owned(),
            stderr: String::from_utf8_lossy(stderr).into_owned(),
            timed_out: self.timed_out,
            truncated: self.truncated,
            duration_ms: self.duration_ms,
            node: self.node,
        }
    }
}

/// An error after a streamed command started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamError {
    /// The error's kind, as in the `kind` field of an error answer.
    pub code: String,
    /// What went wrong.
    pub message: String,
    /// The HTTP status the same error has as an answer.
    pub status: u16,
}

/// Standard base64 (RFC 4648, padded), for output that is not UTF-8: a few lines do not
/// warrant a dependency.
pub mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// `bytes` in base64.
    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for group in bytes.chunks(3) {
            let b = [
                group[0],
                *group.get(1).unwrap_or(&0),
                *group.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= group.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// The bytes of base64 `text` (`None` if it is not padded base64).
    pub fn decode(text: &str) -> Option<Vec<u8>> {
        let text = text.as_bytes();
        if !text.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(text.len() / 4 * 3);
        for (index, group) in text.chunks(4).enumerate() {
            let last = index + 1 == text.len() / 4;
            let pad = group.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && !last) {
                return None;
            }
            let mut n = 0u32;
            for &c in &group[..4 - pad] {
                let v = ALPHABET.iter().position(|&a| a == c)?;
                n = (n << 6) | v as u32;
            }
            n <<= 6 * pad as u32;
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pad]);
        }
        Some(out)
    }
}
