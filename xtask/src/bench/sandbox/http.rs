//! A minimal HTTP/1.1 client for deltaboxd's API socket: one connection per request
//! (`Connection: close`), JSON in and out. The bench talks to the daemon directly rather
//! than through the `deltabox` CLI so that the client-side figures are the API round
//! trip, not the start-up of a CLI process.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// How long a request may wait for its answer: far longer than any call the benchmarks
/// make (a step's tests take about a second), so that a hung daemon fails the run with
/// the request named instead of stalling it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// The API on one Unix socket.
pub struct Api {
    socket: PathBuf,
}

/// An answer, and how long the round trip took as this client saw it (connect, send,
/// receive the whole body; parsing the JSON excluded).
pub struct Answer {
    /// The JSON body (`null` when empty).
    pub body: Value,
    /// Connect to end of body.
    pub elapsed: Duration,
}

impl Api {
    /// The API served on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Answer> {
        self.call("POST", path, Some(body))
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Answer> {
        self.call("DELETE", path, None)
    }

    /// Sends one request; a status outside 2xx is an error carrying the daemon's
    /// message and kind.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str("\r\n");
        request.push_str(&body);

        let start = Instant::now();
        let mut stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("cannot connect to {}", self.socket.display()))?;
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .context("cannot set a read timeout on the API socket")?;
        stream
            .write_all(request.as_bytes())
            .with_context(|| format!("cannot send {method} {path}"))?;
        let raw = read_response(&mut stream).with_context(|| format!("{method} {path}"))?;
        let elapsed = start.elapsed();

        let (status, payload) = raw;
        let body: Value = if payload.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&payload).with_context(|| {
                format!(
                    "{method} {path}: the answer is not JSON: {}",
                    String::from_utf8_lossy(&payload)
                )
            })?
        };
        if !(200..300).contains(&status) {
            bail!(
                "{method} {path} failed with {status} {}: {}",
                body["kind"].as_str().unwrap_or("?"),
                body["error"].as_str().unwrap_or(&body.to_string())
            );
        }
        Ok(Answer { body, elapsed })
    }
}

/// Reads one response: its status and body (by `Content-Length`, else to the end of the
/// stream, which `Connection: close` makes the end of the response; a chunked body is
/// decoded).
fn read_response(stream: &mut UnixStream) -> Result<(u16, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut chunk).context("cannot read the answer")?;
        if n == 0 {
            bail!("the daemon closed the connection before answering");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("the answer's head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.trim().eq_ignore_ascii_case("chunked");
            }
        }
    }
    let mut body = buf.split_off(head_end + 4);
    match length {
        Some(length) => {
            while body.len() < length {
                let n = stream
                    .read(&mut chunk)
                    .context("cannot read the answer's body")?;
                if n == 0 {
                    bail!("the answer ended after {} of {length} bytes", body.len());
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(length);
        }
        None => {
            stream
                .read_to_end(&mut body)
                .context("cannot read the answer's body")?;
            if chunked {
                body = dechunk(&body).context("the daemon sent a malformed chunked body")?;
            }
        }
    }
    Ok((status, body))
}

/// The payload of a complete chunked body (`<hex size>\r\n<data>\r\n`… `0\r\n\r\n`).
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Standard base64 (with padding), to pass a binary file through the API's text `stdin`.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4 + data.len() / 57 + 1);
    for (i, group) in data.chunks(3).enumerate() {
        // Lines of 76 characters, as base64(1) writes them (it accepts any length).
        if i > 0 && i % 19 == 0 {
            out.push('\n');
        }
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= group.len() {
                out.push(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        assert_eq!(base64(b""), "\n");
        assert_eq!(base64(b"f"), "Zg==\n");
        assert_eq!(base64(b"fo"), "Zm8=\n");
        assert_eq!(base64(b"foo"), "Zm9v\n");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy\n");
        let long = base64(&[0xff; 60]);
        assert_eq!(long.lines().next().map(str::len), Some(76));
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        assert_eq!(
            dechunk(b"4\r\n{\"a\"\r\n3;ext=1\r\n:1}\r\n0\r\n\r\n").as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(dechunk(b"5\r\nab"), None, "cut short");
        assert_eq!(dechunk(b"zz\r\n"), None, "not hex");
    }
}
