//! [`ExecEvents`]: the events of a streamed `exec`, read line by line from the answer's
//! body as the daemon sends them.

use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::task::JoinHandle;

use super::{Client, ClientError};
use crate::sandbox_types::{ExecEvent, ExecResult};

/// The events of one streamed `exec`, in order; the last is `exit` or `error`.
pub struct ExecEvents {
    client: Client,
    body: Incoming,
    status: u16,
    connection: JoinHandle<()>,
    /// Bytes read but not yet a whole line.
    pending: BytesMut,
    /// When the whole stream must be over (the command's timeout and a margin), and
    /// that limit.
    deadline: Option<(tokio::time::Instant, Duration)>,
    /// The last event was read.
    done: bool,
}

impl ExecEvents {
    pub(super) fn new(
        client: Client,
        response: hyper::Response<Incoming>,
        connection: JoinHandle<()>,
        deadline: Option<(tokio::time::Instant, Duration)>,
    ) -> Self {
        Self {
            client,
            status: response.status().as_u16(),
            body: response.into_body(),
            connection,
            pending: BytesMut::new(),
            deadline,
            done: false,
        }
    }

    /// The next event; `None` after the last one. A stream that ends without an
    /// `exit` or `error` event (the daemon died) is an error.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let event = match self.deadline {
            None => self.next_line().await?,
            Some((at, limit)) => tokio::time::timeout_at(at, self.next_line())
                .await
                .map_err(|_| self.client.timeout_error(limit))??,
        };
        if matches!(event, ExecEvent::Exit(_) | ExecEvent::Error(_)) {
            self.done = true;
            self.connection.abort();
        }
        Ok(Some(event))
    }

    async fn next_line(&mut self) -> Result<ExecEvent, ClientError> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line = self.pending.split_to(end + 1);
                let text = &line[..end];
                if text.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(text).map_err(|err| ClientError::BadResponse {
                    status: self.status,
                    detail: format!("cannot decode an exec event: {err}"),
                });
            }
            let Some(frame) = self.body.frame().await else {
                return Err(ClientError::BadResponse {
                    status: self.status,
                    detail: "the exec stream ended before its exit or error event".to_owned(),
                });
            };
            let frame = frame.map_err(|source| self.client.http_error(source))?;
            if let Ok(mut data) = frame.into_data() {
                while data.has_remaining() {
                    let chunk = data.chunk();
                    self.pending.extend_from_slice(chunk);
                    let n = chunk.len();
                    data.advance(n);
                }
            }
        }
    }

    /// Reads the stream to its end, handing each output chunk to `on_output` (`true`
    /// for stderr), and returns the collected result (output undecodable as base64 is
    /// an error); an `error` event is [`ClientError::Api`].
    pub async fn finish(
        mut self,
        mut on_output: impl FnMut(bool, &[u8]),
    ) -> Result<ExecResult, ClientError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(event) = self.next().await? {
            let (is_err, chunk) = match event {
                ExecEvent::Stdout(chunk) => (false, chunk),
                ExecEvent::Stderr(chunk) => (true, chunk),
                ExecEvent::Exit(exit) => return Ok(exit.into_result(&stdout, &stderr)),
                ExecEvent::Error(err) => {
                    return Err(ClientError::Api {
                        status: err.status,
                        kind: err.code,
                        message: err.message,
                    });
                }
            };
            let bytes = chunk.bytes().ok_or_else(|| ClientError::BadResponse {
                status: self.status,
                detail: "an exec event's data_b64 is not base64".to_owned(),
            })?;
            on_output(is_err, &bytes);
            if is_err {
                stderr.extend_from_slice(&bytes);
            } else {
                stdout.extend_from_slice(&bytes);
            }
        }
        Err(ClientError::BadResponse {
            status: self.status,
            detail: "the exec stream ended before its exit or error event".to_owned(),
        })
    }
}

impl Drop for ExecEvents {
    fn drop(&mut self) {
        self.connection.abort();
    }
}
