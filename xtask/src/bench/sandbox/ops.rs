//! The sandbox calls the benchmarks make, each timed twice: by this client (the API
//! round trip) and, where the daemon reports it, by the daemon (the operation itself).

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};

use super::http::Api;

/// One call's latency in milliseconds, as the client saw it and as the daemon timed it.
#[derive(Debug, Clone)]
pub struct Timed {
    /// The API round trip.
    pub client_ms: f64,
    /// The daemon's `total_ms` (or a session run's `duration_ms`).
    pub daemon_ms: Option<f64>,
    /// The daemon's breakdown (`timings` other than `total_ms`: `quiesce_ms`, `files_ms`…).
    pub parts: Vec<(String, f64)>,
}

impl Timed {
    /// From an answer's `timings` object.
    fn from_timings(client_ms: f64, timings: &Value) -> Self {
        let parts = timings
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| *k != "total_ms")
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            client_ms,
            daemon_ms: timings["total_ms"].as_f64(),
            parts,
        }
    }
}

/// A sandbox made by the bench, with its sessions.
pub struct Sandbox {
    /// Its full id.
    pub id: String,
}

/// What a session run printed, and how long it took.
pub struct Ran {
    /// What the code printed.
    pub stdout: String,
    /// The round trip, and the run as the daemon timed it (`duration_ms`).
    pub timed: Timed,
}

/// Sandboxes the bench made, removed by [`Made::remove_all`] or, failing that, when
/// dropped (best effort: the daemon's own shutdown stops whatever remains).
pub struct Made<'a> {
    api: &'a Api,
    ids: Vec<String>,
}

impl<'a> Made<'a> {
    /// None yet.
    pub fn new(api: &'a Api) -> Self {
        Self {
            api,
            ids: Vec::new(),
        }
    }

    /// Lists a sandbox for removal.
    pub fn add(&mut self, id: &str) {
        self.ids.push(id.to_owned());
    }

    /// Forgets a sandbox the bench removed itself.
    pub fn forget(&mut self, id: &str) {
        self.ids.retain(|i| i != id);
    }

    /// Removes every sandbox still listed; fails with the first error after trying all.
    pub fn remove_all(&mut self) -> Result<()> {
        let mut first = None;
        for id in std::mem::take(&mut self.ids) {
            if let Err(err) = remove(self.api, &id) {
                first.get_or_insert(err.context(format!("cannot remove sandbox {id}")));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Made<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.remove_all() {
            eprintln!("warning: {err:#}");
        }
    }
}

fn ms(elapsed: std::time::Duration) -> f64 {
    elapsed.as_secs_f64() * 1e3
}

fn string(value: &Value, field: &str) -> Result<String> {
    value[field]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no {field:?} in {value}"))
}

/// Creates a sandbox (the default root: the host's system directories read-only, an
/// empty `/workspace`) and lists it in `made`.
pub fn create(api: &Api, made: &mut Made) -> Result<Sandbox> {
    let answer = api.post("/v1/sandboxes", &json!({}))?;
    let id = string(&answer.body, "id")?;
    made.add(&id);
    Ok(Sandbox { id })
}

/// Removes a sandbox; returns the client-side latency.
pub fn remove(api: &Api, id: &str) -> Result<f64> {
    Ok(ms(api.delete(&format!("/v1/sandboxes/{id}"))?.elapsed))
}

/// Runs `argv` to completion with `stdin`; fails unless it exits 0.
pub fn exec(api: &Api, sandbox: &Sandbox, argv: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut body = json!({ "argv": argv });
    if let Some(stdin) = stdin {
        body["stdin"] = json!(stdin);
    }
    let answer = api.post(&format!("/v1/sandboxes/{}/exec", sandbox.id), &body)?;
    let out = &answer.body;
    ensure!(
        out["exit_code"] == 0,
        "`{}` in sandbox {} failed ({}): {}{}",
        argv.join(" "),
        sandbox.id,
        out["exit_code"],
        out["stdout"].as_str().unwrap_or(""),
        out["stderr"].as_str().unwrap_or("")
    );
    Ok(out["stdout"].as_str().unwrap_or("").to_owned())
}

/// Starts a `bash` or `python` session; returns its id and the client-side latency.
pub fn start_session(api: &Api, sandbox: &Sandbox, kind: &str) -> Result<(String, f64)> {
    let answer = api.post(
        &format!("/v1/sandboxes/{}/sessions", sandbox.id),
        &json!({ "kind": kind }),
    )?;
    Ok((string(&answer.body, "id")?, ms(answer.elapsed)))
}

/// Stops a session; returns the client-side latency.
pub fn stop_session(api: &Api, sandbox: &Sandbox, session: &str) -> Result<f64> {
    let answer = api.delete(&format!("/v1/sandboxes/{}/sessions/{session}", sandbox.id))?;
    Ok(ms(answer.elapsed))
}

/// Runs `code` in a session; fails unless its status is 0.
pub fn run(api: &Api, sandbox: &Sandbox, session: &str, code: &str) -> Result<Ran> {
    let answer = api.post(
        &format!("/v1/sandboxes/{}/sessions/{session}/run", sandbox.id),
        &json!({ "code": code }),
    )?;
    let out = &answer.body;
    ensure!(
        out["status"] == 0,
        "session {session} of sandbox {} failed ({}): {}{}",
        sandbox.id,
        out["status"],
        out["stdout"].as_str().unwrap_or(""),
        out["stderr"].as_str().unwrap_or("")
    );
    Ok(Ran {
        stdout: out["stdout"].as_str().unwrap_or("").to_owned(),
        timed: Timed {
            client_ms: ms(answer.elapsed),
            daemon_ms: out["duration_ms"].as_f64(),
            parts: Vec::new(),
        },
    })
}

/// Checkpoints the sandbox; returns the node's id.
pub fn checkpoint(api: &Api, sandbox: &Sandbox, label: &str) -> Result<(String, Timed)> {
    let answer = api.post(
        &format!("/v1/sandboxes/{}/checkpoint", sandbox.id),
        &json!({ "label": label }),
    )?;
    let timed = Timed::from_timings(ms(answer.elapsed), &answer.body["timings"]);
    Ok((string(&answer.body, "id")?, timed))
}

/// Rolls the sandbox (files and processes) back to `node`; returns the restored
/// sessions' ids by kind.
pub fn rollback(
    api: &Api,
    sandbox: &Sandbox,
    node: &str,
) -> Result<(Vec<(String, String)>, Timed)> {
    let answer = api.post(
        &format!("/v1/sandboxes/{}/rollback", sandbox.id),
        &json!({ "node": node, "mode": "all" }),
    )?;
    let timed = Timed::from_timings(ms(answer.elapsed), &answer.body["timings"]);
    Ok((sessions(&answer.body["sessions"])?, timed))
}

/// `(id, kind)` of each `SessionInfo` in a list.
fn sessions(list: &Value) -> Result<Vec<(String, String)>> {
    list.as_array()
        .with_context(|| format!("no session list in {list}"))?
        .iter()
        .map(|s| Ok((string(s, "id")?, string(s, "kind")?)))
        .collect()
}

/// The session of `kind` in a list of `(id, kind)`.
pub fn session_of(sessions: &[(String, String)], kind: &str) -> Result<String> {
    sessions
        .iter()
        .find(|(_, k)| k == kind)
        .map(|(id, _)| id.clone())
        .with_context(|| format!("no {kind} session among {sessions:?}"))
}

/// A branch from a node: the new sandboxes with their sessions, the client-side
/// latency of the whole call and the daemon's time for each sandbox.
pub struct Branched {
    /// Each new sandbox with its sessions' `(id, kind)`.
    pub sandboxes: Vec<(Sandbox, Vec<(String, String)>)>,
    /// The whole call.
    pub client_ms: f64,
    /// `branch_ms`: one per new sandbox.
    pub daemon_ms: Vec<f64>,
}

/// Branches `count` sandboxes from `node`, listing them in `made`.
pub fn branch(api: &Api, node: &str, count: usize, made: &mut Made) -> Result<Branched> {
    let answer = api.post(
        &format!("/v1/nodes/{node}/branch"),
        &json!({ "count": count }),
    )?;
    let list = answer.body["sandboxes"]
        .as_array()
        .with_context(|| format!("no sandboxes in {}", answer.body))?;
    let mut sandboxes = Vec::new();
    for info in list {
        let id = string(info, "id")?;
        made.add(&id);
        sandboxes.push((Sandbox { id }, sessions(&info["sessions"])?));
    }
    ensure!(
        sandboxes.len() == count,
        "branching {count} from {node} made {} sandboxes",
        sandboxes.len()
    );
    let daemon_ms = answer.body["branch_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    Ok(Branched {
        sandboxes,
        client_ms: ms(answer.elapsed),
        daemon_ms,
    })
}
