//! One output stream of a call: what the code printed (capped), and the
//! driver's end marker found in it. See `docs/sessions.md` for the markers.

/// What a marker reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reply {
    /// The driver is ready (`\x1eDBX-ready\x1e`).
    Ready,
    /// The call ended with this status (`\x1eDBX<nonce> <status>\x1e`).
    Status(i32),
    /// The code ended the interpreter with this status
    /// (`\x1eDBX<nonce> exit <status>\x1e`).
    Exit(i32),
}

/// Bytes of the stream kept across reads for finding a marker split between
/// two reads: more than the longest marker (`\x1eDBX`, 32 hex digits, a space,
/// `exit -2147483648`, `\x1e`).
const TAIL: usize = 128;
/// The longest marker body (between prefix and terminator) worth parsing.
const MAX_BODY: usize = 24;

/// What one stream carried during one call.
pub(super) struct Capture {
    prefix: Vec<u8>,
    cap: usize,
    kept: Vec<u8>,
    /// Bytes seen on the stream so far, marker included.
    total: usize,
    marker_len: usize,
    /// The last [`TAIL`] bytes of the stream while no marker was found.
    tail: Vec<u8>,
    /// The marker, once found.
    pub reply: Option<Reply>,
    /// The stream reached end of file.
    pub eof: bool,
}

impl Capture {
    /// A capture looking for markers that start with `prefix`, keeping at most
    /// `cap` bytes of output.
    pub fn new(prefix: Vec<u8>, cap: usize) -> Self {
        Self {
            prefix,
            cap,
            kept: Vec::new(),
            total: 0,
            marker_len: 0,
            tail: Vec::new(),
            reply: None,
            eof: false,
        }
    }

    /// Whether nothing more is expected from this stream in this call.
    pub fn done(&self) -> bool {
        self.reply.is_some() || self.eof
    }

    /// Takes in the next bytes read from the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        let room = self.cap.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let window_start = self.total - self.tail.len();
        self.total += chunk.len();
        if self.reply.is_some() {
            // Output after the marker (a background job of the code): kept
            // as output of this call.
            return;
        }
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(chunk);
        match find_marker(&window, &self.prefix) {
            Some((start, end, reply)) => {
                let (start, end) = (window_start + start, window_start + end);
                let len = self.kept.len();
                self.kept.drain(start.min(len)..end.min(len));
                self.marker_len = end - start;
                self.reply = Some(reply);
            }
            None => {
                let keep_from = window.len().saturating_sub(TAIL);
                self.tail = window.split_off(keep_from);
            }
        }
    }

    /// The output (lossy UTF-8) and whether some of it was dropped at the cap.
    pub fn finish(self) -> (String, bool) {
        let truncated = self.total - self.marker_len > self.kept.len();
        (String::from_utf8_lossy(&self.kept).into_owned(), truncated)
    }

    /// The output so far, for error reports.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }
}

/// Finds the first complete, well-formed marker `prefix body \x1e` in `window`:
/// its start, end, and what it says. A marker whose terminator has not
/// arrived yet is not found (it stays in the tail for the next read).
fn find_marker(window: &[u8], prefix: &[u8]) -> Option<(usize, usize, Reply)> {
    let mut from = 0;
    while let Some(pos) = find(&window[from..], prefix) {
        let start = from + pos;
        let body_start = start + prefix.len();
        let rest = &window[body_start..window.len().min(body_start + MAX_BODY + 1)];
        if let Some(term) = rest.iter().position(|&b| b == 0x1e)
            && let Some(reply) = parse_body(&rest[..term])
        {
            return Some((start, body_start + term + 1, reply));
        }
        from = start + 1;
    }
    None
}

fn parse_body(body: &[u8]) -> Option<Reply> {
    let body = std::str::from_utf8(body).ok()?;
    if body.is_empty() {
        return Some(Reply::Ready);
    }
    match body.strip_prefix("exit ") {
        Some(status) => status.parse().ok().map(Reply::Exit),
        None => body.parse().ok().map(Reply::Status),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &[u8] = b"\x1eDBXabc ";

    #[test]
    fn marker_split_across_reads_is_found_and_removed() {
        let mut c = Capture::new(PREFIX.to_vec(), 1 << 20);
        c.push(b"hello\x1eDB");
        assert_eq!(c.reply, None);
        c.push(b"Xabc 1");
        assert_eq!(c.reply, None);
        c.push(b"7\x1e");
        assert_eq!(c.reply, Some(Reply::Status(17)));
        assert_eq!(c.finish(), ("hello".to_string(), false));
    }

    #[test]
    fn other_nonces_and_malformed_markers_are_output() {
        let mut c = Capture::new(PREFIX.to_vec(), 1 << 20);
        let text = b"\x1eDBXabd 0\x1e \x1eDBXabc x\x1e ";
        c.push(text);
        c.push(b"\x1eDBXabc exit 3\x1e");
        assert_eq!(c.reply, Some(Reply::Exit(3)));
        assert_eq!(c.finish().0.as_bytes(), text);
    }

    #[test]
    fn cap_truncates_but_the_marker_is_still_found() {
        let mut c = Capture::new(PREFIX.to_vec(), 4);
        c.push(b"abcdefgh");
        c.push(b"\x1eDBXabc 0\x1etrailing");
        assert_eq!(c.reply, Some(Reply::Status(0)));
        assert_eq!(c.finish(), ("abcd".to_string(), true));
        let mut exact = Capture::new(PREFIX.to_vec(), 4);
        exact.push(b"abcd\x1eDBXabc 0\x1e");
        assert_eq!(exact.finish(), ("abcd".to_string(), false));
    }
}
