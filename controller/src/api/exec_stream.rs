//! The streamed `exec`: `POST /v1/sandboxes/{id}/exec` with `Accept:
//! application/x-ndjson` answers `200` with one JSON [`ExecEvent`] per line, sent as the
//! command writes.
//!
//! The command runs on the blocking pool through [`SandboxOps::exec_streamed`] (the
//! same code as the collected `exec`: caps, timeout, auto-checkpoint, the sandbox's
//! lock). Its sink turns chunks into events and hands them to a bounded channel that
//! the response body drains: a client that reads slowly fills the channel, the sink
//! blocks, the command's pipes fill and it blocks on its writes, as on a terminal.
//! The headers go out only once the command has started, so that errors before
//! (unknown sandbox, bad request) are ordinary error answers; later ones end the
//! stream with an `error` event.

use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::ApiError;
use super::sandbox_types::{
    ExecEvent, ExecExit, ExecRequest, ExecResult, OutputChunk, StreamError,
};
use super::service::ApiService;
use crate::sandbox::ops::{ExecSink, OutputStream};

/// The media type of the streamed answer (and of the `Accept` header that asks for it).
pub use deltabox_client::NDJSON;

/// Events the channel holds before the sink blocks: with reads of at most 64 KiB, about
/// 1.5 MiB of output (base64 included) waits for a slow client, no more.
const CHANNEL_EVENTS: usize = 16;

/// Whether the request asks for the streamed answer (`Accept` names [`NDJSON`]).
pub fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let essence = item.split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case(NDJSON)
        })
}

/// Holds back an incomplete UTF-8 character at the end of a read, so that text split
/// between two reads is still sent as text.
#[derive(Debug, Default)]
pub struct Utf8Chunks {
    carry: Vec<u8>,
}

impl Utf8Chunks {
    /// The next chunk of the stream, `None` if all of it is held back.
    pub fn push(&mut self, bytes: &[u8]) -> Option<OutputChunk> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(bytes);
        if let Err(e) = std::str::from_utf8(&buf)
            && e.error_len().is_none()
        {
            // Valid up to a character cut short by the end of the read.
            self.carry = buf.split_off(e.valid_up_to());
        }
        (!buf.is_empty()).then(|| OutputChunk::of(buf))
    }

    /// What is still held back (the stream ended inside a character), as base64.
    pub fn finish(&mut self) -> Option<OutputChunk> {
        let rest = std::mem::take(&mut self.carry);
        (!rest.is_empty()).then(|| OutputChunk::of(rest))
    }
}

/// One event as a line of the answer.
fn line(event: &ExecEvent) -> Vec<u8> {
    // Strings, numbers and options only: serialising cannot fail.
    let mut bytes = serde_json::to_vec(event).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

fn event(stream: OutputStream, chunk: OutputChunk) -> ExecEvent {
    match stream {
        OutputStream::Stdout => ExecEvent::Stdout(chunk),
        OutputStream::Stderr => ExecEvent::Stderr(chunk),
    }
}

/// The sink of a streamed `exec`: events into the response's channel.
struct ChannelSink {
    tx: mpsc::Sender<Bytes>,
    runtime: tokio::runtime::Handle,
    started: Option<oneshot::Sender<()>>,
    /// stdout's and stderr's held-back bytes.
    utf8: [Utf8Chunks; 2],
    /// The client went away: output is dropped, the command goes on.
    gone: bool,
}

impl ChannelSink {
    /// Sends a line, waiting for room until `until`; false if it was not taken in time.
    fn send(&mut self, bytes: Vec<u8>, until: Instant) -> bool {
        if self.gone {
            return true;
        }
        let until = tokio::time::Instant::from_std(until);
        let sent = self.runtime.block_on(tokio::time::timeout_at(
            until,
            self.tx.send(Bytes::from(bytes)),
        ));
        match sent {
            Ok(Ok(())) => true,
            Ok(Err(_)) => {
                self.gone = true;
                true
            }
            Err(_) => false,
        }
    }

    /// The events of what is still held back, as lines.
    fn finish(&mut self) -> Vec<u8> {
        let [out, err] = &mut self.utf8;
        let mut bytes = Vec::new();
        for (stream, chunks) in [(OutputStream::Stdout, out), (OutputStream::Stderr, err)] {
            if let Some(chunk) = chunks.finish() {
                bytes.extend(line(&event(stream, chunk)));
            }
        }
        bytes
    }
}

impl ExecSink for ChannelSink {
    fn started(&mut self) {
        if let Some(started) = self.started.take() {
            let _ = started.send(());
        }
    }

    fn output(&mut self, stream: OutputStream, bytes: &[u8], until: Instant) -> bool {
        let index = usize::from(stream == OutputStream::Stderr);
        match self.utf8[index].push(bytes) {
            Some(chunk) => self.send(line(&event(stream, chunk)), until),
            None => true,
        }
    }
}

/// What the blocking task hands back: how the call ended, and the last lines of the
/// stream (held-back output and the `exit` or `error` event).
struct Finished {
    outcome: Result<ExecResult, ApiError>,
    tail: Vec<u8>,
}

/// The last event for `outcome`.
fn last_event(outcome: Result<ExecResult, ApiError>) -> ExecEvent {
    match outcome {
        Ok(result) => ExecEvent::Exit(ExecExit::from(result)),
        Err(err) => {
            let (kind, status) = err.kind_and_status();
            ExecEvent::Error(StreamError {
                code: kind.as_str().to_owned(),
                message: err.message(),
                status: status.as_u16(),
            })
        }
    }
}

/// Runs `req` in `sandbox` and answers with its events.
pub async fn serve(svc: Arc<ApiService>, sandbox: String, req: ExecRequest) -> Response {
    let (tx, rx) = mpsc::channel(CHANNEL_EVENTS);
    let (started_tx, started_rx) = oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    let task = tokio::task::spawn_blocking(move || {
        let mut sink = ChannelSink {
            tx,
            runtime,
            started: Some(started_tx),
            utf8: Default::default(),
            gone: false,
        };
        let outcome = svc
            .sandboxes()
            .and_then(|ops| Ok(ops.exec_streamed(&sandbox, &req, &mut sink)?));
        if sink.started.is_none()
            && let Err(err) = &outcome
        {
            // Answered as a last `error` event of a 200 stream, not as an error
            // status: counted here, as the API layer counts error answers.
            svc.metrics().api_error(err.kind_and_status().0.as_str());
        }
        let tail = sink.finish();
        Finished { outcome, tail }
    });
    if started_rx.await.is_err() {
        // The sink went without the command starting: the call failed before it.
        let finished = match task.await {
            Ok(finished) => finished,
            Err(err) => return task_failed(&err).into_response(),
        };
        if let Err(err) = finished.outcome {
            return err.into_response();
        }
        let mut tail = finished.tail;
        tail.extend(line(&last_event(finished.outcome)));
        return stream_response(EventBody {
            rx: mpsc::channel(1).1,
            tail: None,
            ready_tail: Some(Bytes::from(tail)),
        });
    }
    stream_response(EventBody {
        rx,
        tail: Some(task),
        ready_tail: None,
    })
}

fn task_failed(err: &tokio::task::JoinError) -> ApiError {
    ApiError::Internal {
        message: format!("exec task failed: {err}"),
    }
}

fn stream_response(body: EventBody) -> Response {
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = StatusCode::OK;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    response
}

/// The answer's body: the channel's lines, then the task's last lines.
struct EventBody {
    rx: mpsc::Receiver<Bytes>,
    tail: Option<JoinHandle<Finished>>,
    ready_tail: Option<Bytes>,
}

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if let Some(bytes) = ready!(this.rx.poll_recv(cx)) {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        // Every sender is gone: the task has sent all its output.
        if let Some(task) = this.tail.as_mut() {
            let finished = ready!(Pin::new(task).poll(cx));
            this.tail = None;
            let tail = match finished {
                Ok(Finished { outcome, mut tail }) => {
                    tail.extend(line(&last_event(outcome)));
                    tail
                }
                Err(err) => line(&last_event(Err(task_failed(&err)))),
            };
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
        }
        Poll::Ready(this.ready_tail.take().map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::sandbox_types::base64;

    #[test]
    fn base64_round_trips() {
        for (bytes, text) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"\xff\xfe\x00", "//4A"),
        ] {
            assert_eq!(base64::encode(bytes), text);
            assert_eq!(base64::decode(text).as_deref(), Some(bytes));
        }
        assert_eq!(base64::decode("Zg="), None);
        assert_eq!(base64::decode("Zg==Zm9v"), None);
        assert_eq!(base64::decode("Z!=="), None);
    }

    #[test]
    fn text_split_inside_a_character_stays_text() {
        let mut chunks = Utf8Chunks::default();
        let euro = "€".as_bytes();
        let first = chunks.push(&[b'a', euro[0]]).unwrap();
        assert_eq!(first.data.as_deref(), Some("a"));
        assert_eq!(chunks.push(&euro[1..2]), None);
        let second = chunks.push(&[euro[2], b'b']).unwrap();
        assert_eq!(second.data.as_deref(), Some("€b"));
        assert_eq!(chunks.finish(), None);
    }

    #[test]
    fn bytes_that_are_not_utf8_go_as_base64() {
        let mut chunks = Utf8Chunks::default();
        let chunk = chunks.push(b"a\xffb").unwrap();
        assert_eq!(chunk.data, None);
        assert_eq!(chunk.bytes().unwrap(), b"a\xffb");
        // A stream that ends inside a character.
        assert_eq!(chunks.push(b"\xe2\x82"), None);
        let rest = chunks.finish().unwrap();
        assert_eq!(rest.bytes().unwrap(), b"\xe2\x82");
        assert!(rest.data_b64.is_some());
    }

    #[test]
    fn events_are_tagged_lines() {
        let out = line(&ExecEvent::Stdout(OutputChunk::of(b"hi\n".to_vec())));
        assert_eq!(out, b"{\"type\":\"stdout\",\"data\":\"hi\\n\"}\n");
        let err = line(&last_event(Err(ApiError::Sandbox(
            crate::sandbox::SandboxError::UnknownSandbox { id: "x".into() },
        ))));
        let value: serde_json::Value = serde_json::from_slice(&err).unwrap();
        assert_eq!(value["type"], "error");
        assert_eq!(value["code"], "unknown_sandbox");
        assert_eq!(value["status"], 404);
    }

    /// The route over the API tests' fake sandboxes (which stream through
    /// [`crate::sandbox::SandboxOps::exec_streamed`]'s default): the headers, the lines,
    /// and errors before the start as plain answers.
    #[tokio::test]
    async fn the_route_answers_ndjson_when_asked() {
        use axum::http::{Method, Request};
        use http_body_util::BodyExt as _;
        use tower::ServiceExt as _;

        use crate::api::routes;

        let h = crate::api::tests::Harness::new();
        let send = |method: Method, uri: String, body: &str, stream: bool| {
            let router = crate::api::server::api_router(h.service.clone());
            let mut req = Request::builder()
                .method(method)
                .uri(uri)
                .header(header::CONTENT_TYPE, "application/json");
            if stream {
                req = req.header(header::ACCEPT, NDJSON);
            }
            let req = req.body(Body::from(body.to_owned())).unwrap();
            async move {
                let response = router.oneshot(req).await.unwrap();
                let status = response.status();
                let ct = response.headers().get(header::CONTENT_TYPE).cloned();
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                (status, ct, bytes)
            }
        };
        let (status, _, created) = send(Method::POST, routes::SANDBOXES.into(), "{}", false).await;
        assert_eq!(status, StatusCode::CREATED);
        let id = serde_json::from_slice::<serde_json::Value>(&created).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let exec = routes::fill(routes::SANDBOX_EXEC, &[&id]);
        let (status, ct, body) = send(
            Method::POST,
            exec.clone(),
            r#"{"argv":["echo","hi"]}"#,
            true,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ct.unwrap(), NDJSON);
        let events: Vec<ExecEvent> = body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(
            events[0],
            ExecEvent::Stdout(OutputChunk::of(b"hi\n".to_vec()))
        );
        assert!(matches!(&events[1], ExecEvent::Exit(e) if e.exit_code == Some(0)));
        // Without the header: the collected result.
        let (status, ct, body) = send(
            Method::POST,
            exec.clone(),
            r#"{"argv":["echo","hi"]}"#,
            false,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ct.unwrap(), "application/json");
        let result: ExecResult = serde_json::from_slice(&body).unwrap();
        assert_eq!(result.stdout, "hi\n");
        // Errors before the start: plain JSON with their status.
        let (status, ct, _) = send(Method::POST, exec, r#"{"argv":[]}"#, true).await;
        assert_eq!(
            (status, ct.unwrap()),
            (
                StatusCode::BAD_REQUEST,
                HeaderValue::from_static("application/json")
            )
        );
        let unknown = routes::fill(routes::SANDBOX_EXEC, &["nope"]);
        let (status, _, _) = send(Method::POST, unknown, r#"{"argv":["true"]}"#, true).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_accept_header_asks_for_the_stream() {
        let mut headers = HeaderMap::new();
        assert!(!wants_stream(&headers));
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, application/x-ndjson;q=0.9"),
        );
        assert!(wants_stream(&headers));
    }
}
