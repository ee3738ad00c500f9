//! Raw HTTP/1.1 to a test daemon's sandbox API over its Unix socket: any method, path,
//! body and content type (malformed ones included), answered as a status and JSON.
//! Synchronous, so tests can call from several threads at once.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use serde_json::{Value, json};

/// An answer of the daemon.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// The body parsed as JSON (`Value::Null` if it is not JSON).
    pub body: Value,
    /// The body as text.
    pub text: String,
}

impl Reply {
    /// The body, after asserting the status is `status`.
    pub fn expect(self, status: u16, what: &str) -> Value {
        assert_eq!(self.status, status, "{what}: {}", self.text);
        self.body
    }

    /// Asserts an error answer: `status`, `kind`, and a message holding every one of
    /// `needles` (the ids or values the message must name).
    pub fn expect_error(&self, status: u16, kind: &str, needles: &[&str], what: &str) {
        assert_eq!(
            (self.status, self.body["kind"].as_str()),
            (status, Some(kind)),
            "{what}: {}",
            self.text
        );
        let message = self.body["error"].as_str().unwrap_or_default();
        for needle in needles {
            assert!(
                message.contains(needle),
                "{what}: the message {message:?} does not name {needle:?}"
            );
        }
    }
}

/// A client of one daemon's socket.
#[derive(Clone, Debug)]
pub struct Http {
    socket: PathBuf,
}

/// Longest time a request may take (an `exec` with a timeout, an OOM, a fork bomb).
const READ_TIMEOUT: Duration = Duration::from_secs(120);

impl Http {
    /// A client of `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends `method path` with `body` (and `Content-Type: content_type` when given).
    /// The body is written from a thread: a daemon that refuses it early (413) stops
    /// reading it, and the answer must still be read.
    pub fn raw(&self, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Reply {
        let mut conn = UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.socket.display()));
        conn.set_read_timeout(Some(READ_TIMEOUT))
            .expect("set read timeout");
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut writer = conn.try_clone().expect("clone the connection");
        let payload = [head.as_bytes(), body].concat();
        let sender = thread::spawn(move || {
            // Errors (EPIPE after an early answer) are the reader's business.
            let _ = writer.write_all(&payload);
        });
        let mut raw = Vec::new();
        let read = conn.read_to_end(&mut raw);
        let _ = conn.shutdown(std::net::Shutdown::Both);
        let _ = sender.join();
        // A daemon that answers before reading the whole body (413) and closes leaves
        // the unread rest behind: the kernel then resets the connection after the
        // answer, which was read before the error.
        if let Err(e) = read
            && (e.kind() != std::io::ErrorKind::ConnectionReset || raw.is_empty())
        {
            panic!("{method} {path}: reading the answer: {e}");
        }
        parse(&raw).unwrap_or_else(|| {
            panic!(
                "{method} {path}: not an HTTP answer: {:?}",
                String::from_utf8_lossy(&raw)
            )
        })
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Reply {
        self.raw("GET", path, None, b"")
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Reply {
        self.raw("DELETE", path, None, b"")
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.raw(
            "POST",
            path,
            Some("application/json"),
            body.to_string().as_bytes(),
        )
    }

    /// `POST path` with `body` as it is, as JSON.
    pub fn post_text(&self, path: &str, body: &str) -> Reply {
        self.raw("POST", path, Some("application/json"), body.as_bytes())
    }

    /// Creates a sandbox from `req`; returns its `SandboxInfo`.
    pub fn create(&self, req: &Value) -> Value {
        self.post("/v1/sandboxes", req).expect(201, "create")
    }

    /// Runs `argv` in `sandbox` (with `timeout_ms`); returns the `ExecResult`.
    pub fn exec(&self, sandbox: &str, argv: &[&str], timeout_ms: Option<u64>) -> Value {
        let mut req = json!({ "argv": argv });
        if let Some(t) = timeout_ms {
            req["timeout_ms"] = json!(t);
        }
        self.post(&format!("/v1/sandboxes/{sandbox}/exec"), &req)
            .expect(200, &format!("exec {argv:?} in {sandbox}"))
    }

    /// `exec` of `sh -c script`, asserting it exits 0; returns its stdout.
    pub fn sh(&self, sandbox: &str, script: &str) -> String {
        let out = self.exec(sandbox, &["sh", "-c", script], Some(60_000));
        assert_eq!(out["exit_code"], 0, "sh -c {script:?} in {sandbox}: {out}");
        out["stdout"].as_str().unwrap_or_default().to_owned()
    }

    /// Starts a `kind` session in `sandbox`; returns its id.
    pub fn session(&self, sandbox: &str, kind: &str) -> String {
        let info = self
            .post(
                &format!("/v1/sandboxes/{sandbox}/sessions"),
                &json!({ "kind": kind }),
            )
            .expect(201, &format!("start a {kind} session in {sandbox}"));
        id_of(&info)
    }

    /// Runs `code` in a session, asserting status 0; returns its stdout.
    pub fn run(&self, sandbox: &str, session: &str, code: &str) -> String {
        let out = self.run_reply(sandbox, session, code).expect(
            200,
            &format!("run {code:?} in session {session} of {sandbox}"),
        );
        assert_eq!(out["status"], 0, "run {code:?}: {out}");
        out["stdout"].as_str().unwrap_or_default().to_owned()
    }

    /// Runs `code` in a session; returns the answer as it is.
    pub fn run_reply(&self, sandbox: &str, session: &str, code: &str) -> Reply {
        self.post(
            &format!("/v1/sandboxes/{sandbox}/sessions/{session}/run"),
            &json!({ "code": code }),
        )
    }

    /// Checkpoints `sandbox`; returns the node's id.
    pub fn checkpoint(&self, sandbox: &str, label: &str) -> String {
        let node = self
            .post(
                &format!("/v1/sandboxes/{sandbox}/checkpoint"),
                &json!({ "label": label }),
            )
            .expect(201, &format!("checkpoint {sandbox}"));
        id_of(&node)
    }

    /// Rolls `sandbox` back to `node` (files and processes).
    pub fn rollback(&self, sandbox: &str, node: &str) -> Value {
        self.post(
            &format!("/v1/sandboxes/{sandbox}/rollback"),
            &json!({ "node": node, "mode": "all" }),
        )
        .expect(200, &format!("rollback {sandbox} to {node}"))
    }

    /// Branches `count` sandboxes from `node`; returns their `SandboxInfo`s.
    pub fn branch(&self, node: &str, count: u32) -> Vec<Value> {
        let out = self
            .post(
                &format!("/v1/nodes/{node}/branch"),
                &json!({ "count": count }),
            )
            .expect(201, &format!("branch {node} ×{count}"));
        out["sandboxes"].as_array().cloned().unwrap_or_default()
    }

    /// `GET /v1/sandboxes/{sandbox}`.
    pub fn sandbox(&self, sandbox: &str) -> Value {
        self.get(&format!("/v1/sandboxes/{sandbox}"))
            .expect(200, &format!("show {sandbox}"))
    }

    /// The ids of the sandbox's tree's nodes.
    pub fn node_ids(&self, sandbox: &str) -> Vec<String> {
        let tree = self
            .get(&format!("/v1/sandboxes/{sandbox}/tree"))
            .expect(200, &format!("tree of {sandbox}"));
        tree["nodes"]
            .as_array()
            .map(|nodes| nodes.iter().map(id_of).collect())
            .unwrap_or_default()
    }

    /// The ids of every sandbox.
    pub fn sandbox_ids(&self) -> Vec<String> {
        let list = self.get("/v1/sandboxes").expect(200, "list sandboxes");
        list["sandboxes"]
            .as_array()
            .map(|s| s.iter().map(id_of).collect())
            .unwrap_or_default()
    }
}

/// The `id` field of an answer.
pub fn id_of(value: &Value) -> String {
    value["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {value}"))
        .to_owned()
}

/// The longest common prefix of two ids (a prefix that names both).
pub fn common_prefix(a: &str, b: &str) -> String {
    a.chars()
        .zip(b.chars())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

/// Parses an HTTP/1.1 answer (`Content-Length` or chunked body).
fn parse(raw: &[u8]) -> Option<Reply> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = raw[end + 4..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Some(Reply { status, body, text })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
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

/// A sandbox with state worth losing: a python session with `x = 1`, a file, a node.
pub struct World {
    /// The client.
    pub http: Http,
    /// The sandbox.
    pub sandbox: String,
    /// Its python session.
    pub session: String,
    /// Its node with `x = 1`.
    pub node: String,
}

impl World {
    /// Makes it on `daemon`.
    pub fn new(daemon: &crate::daemon::TestDaemon) -> Self {
        let http = Http::new(daemon.socket());
        let sandbox = id_of(&http.create(&json!({})));
        let session = http.session(&sandbox, "python");
        http.run(
            &sandbox,
            &session,
            "x = 1\nopen('/workspace/f.txt', 'w').write('one')",
        );
        let node = http.checkpoint(&sandbox, "one");
        // State after the node, which a rollback must undo.
        http.run(
            &sandbox,
            &session,
            "x = 2\nopen('/workspace/f.txt', 'w').write('two')",
        );
        Self {
            http,
            sandbox,
            session,
            node,
        }
    }

    /// Nothing was lost and the daemon serves: the sandbox is listed with its head,
    /// the session has its state, the file is there, the node is in the tree and a
    /// rollback to it restores `x = 1`.
    pub fn assert_intact(&self, after: &str) {
        let http = &self.http;
        assert_eq!(
            http.get("/v1/status").status,
            200,
            "the daemon stopped serving after {after}"
        );
        assert!(
            http.sandbox_ids().contains(&self.sandbox),
            "sandbox {} is gone after {after}",
            self.sandbox
        );
        let info = http.sandbox(&self.sandbox);
        assert!(
            info["sessions"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["id"] == self.session.as_str())),
            "session {} is gone after {after}: {info}",
            self.session
        );
        assert!(
            http.node_ids(&self.sandbox).contains(&self.node),
            "node {} is gone after {after}",
            self.node
        );
        let x = http.run(&self.sandbox, &self.session, "print(x)");
        let file = http.sh(&self.sandbox, "cat /workspace/f.txt");
        let rolled = http.rollback(&self.sandbox, &self.node);
        assert_eq!(rolled["node"], self.node.as_str(), "after {after}");
        assert_eq!(
            http.run(&self.sandbox, &self.session, "print(x)"),
            "1\n",
            "after {after}"
        );
        assert_eq!(http.sh(&self.sandbox, "cat /workspace/f.txt"), "one");
        // Back to the state before the rollback, for the next check.
        http.run(
            &self.sandbox,
            &self.session,
            &format!(
                "x = {}\nopen('/workspace/f.txt', 'w').write({file:?})",
                x.trim()
            ),
        );
    }
}
