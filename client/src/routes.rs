//! Paths of the API's routes (and of the metrics endpoint), shared by the daemon's
//! server, this client and the tests.

/// `GET`: daemon, eBPF and counter status.
pub const STATUS: &str = "/v1/status";
/// `GET`: watched cgroups.
pub const CGROUPS: &str = "/v1/cgroups";
/// `POST`: start counting a cgroup.
pub const WATCH: &str = "/v1/cgroups/watch";
/// `POST`: stop counting a cgroup.
pub const UNWATCH: &str = "/v1/cgroups/unwatch";
/// `POST`: advance a cgroup's epoch.
pub const EPOCH: &str = "/v1/cgroups/epoch";
/// `GET`: per-inode counters of the current epochs.
pub const INODE_STATS: &str = "/v1/inode-stats";
/// `GET`: latency percentiles since start and what the tree costs.
pub const STATS: &str = "/v1/stats";
/// `GET`, on the loopback TCP address: Prometheus text exposition.
pub const METRICS: &str = "/metrics";
/// `POST`: create a sandbox; `GET`: list them.
pub const SANDBOXES: &str = "/v1/sandboxes";
/// `GET`: one sandbox; `DELETE`: remove it.
pub const SANDBOX: &str = "/v1/sandboxes/{id}";
/// `POST`: run a one-shot command in a sandbox.
pub const SANDBOX_EXEC: &str = "/v1/sandboxes/{id}/exec";
/// `POST`: start a session.
pub const SANDBOX_SESSIONS: &str = "/v1/sandboxes/{id}/sessions";
/// `DELETE`: stop a session.
pub const SANDBOX_SESSION: &str = "/v1/sandboxes/{id}/sessions/{session}";
/// `POST`: run code in a session.
pub const SANDBOX_SESSION_RUN: &str = "/v1/sandboxes/{id}/sessions/{session}/run";
/// `POST`: checkpoint a sandbox.
pub const SANDBOX_CHECKPOINT: &str = "/v1/sandboxes/{id}/checkpoint";
/// `POST`: roll a sandbox back to a node.
pub const SANDBOX_ROLLBACK: &str = "/v1/sandboxes/{id}/rollback";
/// `GET`: the tree a sandbox belongs to.
pub const SANDBOX_TREE: &str = "/v1/sandboxes/{id}/tree";
/// `DELETE`: remove a node and its subtree.
pub const NODE: &str = "/v1/nodes/{node}";
/// `POST`: new sandboxes from a node.
pub const NODE_BRANCH: &str = "/v1/nodes/{node}/branch";
/// `GET`: the tree a node belongs to.
pub const NODE_TREE: &str = "/v1/nodes/{node}/tree";
/// `GET ?from=NODE&to=NODE`: files that differ between two nodes.
pub const DIFF: &str = "/v1/diff";
/// `POST`: drop unreferenced layers and empty trees.
pub const GC: &str = "/v1/gc";

/// A route template with its `{name}` parameters replaced, in order, by `values`
/// (percent-encoded as path segments).
pub fn fill(template: &str, values: &[&str]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut values = values.iter();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .map_or(rest.len(), |e| start + e + 1);
        out.push_str(&encode_segment(values.next().copied().unwrap_or_default()));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn encode_segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
