//! Drawing a checkpoint forest as text, like `tree(1)`. Pure functions: the caller
//! passes the nodes, which templates are live, and the time, so the output is
//! deterministic.
//!
//! ```text
//! 4e5f6a7b "base"  5m ago  ckpt 1.2 ms  4.0 KiB  template: live
//! ├── 9a0b1c2d  4m ago  ckpt 3.0 ms  12.5 MiB  template: none
//! │   └── 77aa88bb "tests pass"  1m ago  ckpt 2.1 ms  8.0 KiB  template: live  ← sb 11112222
//! └── 5c6d7e8f  3m ago  ckpt 0.9 ms  512 B  template: live  ← sb 33334444, sb 55556666
//! ```
//!
//! Children are drawn in creation order; a node whose parent is not among the nodes
//! given (an orphan, after its parent was removed) is drawn as a root.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use super::ids::{NodeId, SandboxId};
use super::records::{NodeRecord, SandboxRecord};

/// A node to draw.
#[derive(Debug, Clone)]
pub struct RenderNode<'a> {
    /// The node.
    pub node: &'a NodeRecord,
    /// Whether its templates are live (a rollback to it is a fork, not a dump restore).
    pub template_live: bool,
    /// The sandboxes whose head is this node.
    pub here: Vec<SandboxId>,
}

/// Pairs nodes with the sandboxes whose head they are; `template_live` says whether a
/// node's templates are live.
pub fn render_nodes<'a>(
    nodes: &'a [NodeRecord],
    sandboxes: &[SandboxRecord],
    template_live: impl Fn(&NodeRecord) -> bool,
) -> Vec<RenderNode<'a>> {
    nodes
        .iter()
        .map(|node| RenderNode {
            node,
            template_live: template_live(node),
            here: sandboxes
                .iter()
                .filter(|s| s.head == Some(node.id))
                .map(|s| s.id)
                .collect(),
        })
        .collect()
}

/// Draws the forest, one line per node, each line ending in `\n`; `now_ms` (unix ms)
/// is the time ages are measured from.
pub fn render_tree(nodes: &[RenderNode<'_>], now_ms: u64) -> String {
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by_key(|&i| (nodes[i].node.created_ms, nodes[i].node.id));
    let mut index: HashMap<NodeId, usize> = HashMap::new();
    for &i in &order {
        index.entry(nodes[i].node.id).or_insert(i);
    }
    let mut kids: HashMap<NodeId, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for &i in &order {
        let n = nodes[i].node;
        match n.parent {
            Some(p) if p != n.id && index.contains_key(&p) => kids.entry(p).or_default().push(i),
            _ => roots.push(i),
        }
    }
    // Nodes on a parent cycle are reachable from no root; draw them too, as roots.
    let mut out = String::new();
    let mut drawn = HashSet::new();
    for start in roots.into_iter().chain(order.iter().copied()) {
        if drawn.contains(&nodes[start].node.id) {
            continue;
        }
        // (node, prefix of its line, connector); explicit stack: chains can be long.
        let mut stack = vec![(start, String::new(), "")];
        while let Some((i, prefix, connector)) = stack.pop() {
            let r = &nodes[i];
            if !drawn.insert(r.node.id) {
                continue;
            }
            let _ = writeln!(out, "{prefix}{connector}{}", describe(r, now_ms));
            let child_prefix = match connector {
                "├── " => format!("{prefix}│   "),
                "└── " => format!("{prefix}    "),
                _ => prefix,
            };
            let children: Vec<usize> = kids
                .get(&r.node.id)
                .map(|k| {
                    k.iter()
                        .copied()
                        .filter(|c| !drawn.contains(&nodes[*c].node.id))
                        .collect()
                })
                .unwrap_or_default();
            let last = children.len().saturating_sub(1);
            for (pos, c) in children.into_iter().enumerate().rev() {
                let conn = if pos == last {
                    "└── "
                } else {
                    "├── "
                };
                stack.push((c, child_prefix.clone(), conn));
            }
        }
    }
    out
}

fn describe(r: &RenderNode<'_>, now_ms: u64) -> String {
    let n = r.node;
    let mut s = n.id.short();
    if let Some(label) = &n.label {
        // Debug quoting escapes newlines and control characters: one line per node.
        let _ = write!(s, " {label:?}");
    }
    let _ = write!(
        s,
        "  {}  ckpt {}  {}  template: {}",
        age(now_ms, n.created_ms),
        latency(n.checkpoint_ms),
        human_bytes(n.bytes),
        if r.template_live { "live" } else { "none" }
    );
    if !r.here.is_empty() {
        let mut here = r.here.clone();
        here.sort();
        let marks: Vec<String> = here.iter().map(|s| format!("sb {}", s.short())).collect();
        let _ = write!(s, "  ← {}", marks.join(", "));
    }
    s
}

/// How long ago `then_ms` was at `now_ms`: `42s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn age(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// A checkpoint latency: `1.2 ms`, or `3.4 s` from a second on.
pub fn latency(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}

/// Bytes in binary units: `512 B`, `4.0 KiB`, `12.5 MiB`; `? B` for 0 (unknown).
pub fn human_bytes(bytes: u64) -> String {
    if bytes == 0 {
        return "? B".to_owned();
    }
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    for unit in ["KiB", "MiB", "GiB", "TiB"] {
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.1} PiB")
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::tree::ids::{SessionId, TreeId};
    use crate::tree::records::NodeSession;

    fn id<T: From<Uuid>>(tail: &str) -> T {
        let s = format!("0193b2c4-5d6e-7f80-9a1b-0000{tail}");
        Uuid::parse_str(&s).unwrap().into()
    }

    fn node(tail: &str, parent: Option<&str>, created_ms: u64, label: Option<&str>) -> NodeRecord {
        NodeRecord {
            id: id(tail),
            tree: id("00000001"),
            sandbox: id("00000002"),
            parent: parent.map(id),
            label: label.map(str::to_owned),
            created_ms,
            snapshot: "01a20200-0000-7000-8000-000000000001".to_owned(),
            sessions: vec![NodeSession {
                session: id::<SessionId>("00000003"),
                kind: "bash".into(),
                template: None,
            }],
            bytes: 4096,
            checkpoint_ms: 1.24,
            limits: serde_json::Value::Null,
            processes: Vec::new(),
            pipes: serde_json::Value::Null,
        }
    }

    #[test]
    fn units() {
        assert_eq!(human_bytes(0), "? B");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(13_107_200), "12.5 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(age(10_000, 10_000), "0s ago");
        assert_eq!(age(10_000, 20_000), "0s ago");
        assert_eq!(age(100_000, 0), "1m ago");
        assert_eq!(age(7_200_000, 0), "2h ago");
        assert_eq!(age(200_000_000, 0), "2d ago");
        assert_eq!(latency(0.91), "0.9 ms");
        assert_eq!(latency(2500.0), "2.5 s");
    }

    #[test]
    fn draws_a_forest_with_orphans_and_markers() {
        let now = 1_000_000;
        let mut nodes = [
            // Given out of order: the drawing sorts by creation time.
            node("aaaa0003", Some("aaaa0001"), 30_000, None),
            node("aaaa0001", None, 10_000, Some("base")),
            node("aaaa0002", Some("aaaa0001"), 20_000, Some("a\nb")),
            node("aaaa0004", Some("aaaa0002"), 40_000, None),
            node("aaaa0005", Some("ffff0000"), 50_000, Some("orphan")),
            node("aaaa0006", Some("aaaa0005"), 900_000, None),
            node("aaaa0007", None, 950_000, Some("second root")),
        ];
        nodes[3].bytes = 0;
        nodes[3].checkpoint_ms = 1500.0;
        let sandboxes: Vec<SandboxId> = vec![id("bbbb0002"), id("bbbb0001")];
        let render: Vec<RenderNode<'_>> = nodes
            .iter()
            .map(|n| RenderNode {
                node: n,
                template_live: n.label.is_some(),
                here: match n.id.short().as_str() {
                    "aaaa0004" => sandboxes.clone(),
                    "aaaa0007" => vec![sandboxes[0]],
                    _ => vec![],
                },
            })
            .collect();
        let expected = "\
aaaa0001 \"base\"  16m ago  ckpt 1.2 ms  4.0 KiB  template: live
├── aaaa0002 \"a\\nb\"  16m ago  ckpt 1.2 ms  4.0 KiB  template: live
│   └── aaaa0004  16m ago  ckpt 1.5 s  ? B  template: none  ← sb bbbb0001, sb bbbb0002
└── aaaa0003  16m ago  ckpt 1.2 ms  4.0 KiB  template: none
aaaa0005 \"orphan\"  15m ago  ckpt 1.2 ms  4.0 KiB  template: live
└── aaaa0006  1m ago  ckpt 1.2 ms  4.0 KiB  template: none
aaaa0007 \"second root\"  50s ago  ckpt 1.2 ms  4.0 KiB  template: live  ← sb bbbb0002
";
        assert_eq!(render_tree(&render, now), expected);
        assert_eq!(render_tree(&[], now), "");
    }

    #[test]
    fn cycles_and_duplicates_are_drawn_once() {
        let a = node("aaaa0001", Some("aaaa0002"), 1, None);
        let b = node("aaaa0002", Some("aaaa0001"), 2, None);
        let r = [&a, &b, &a].map(|node| RenderNode {
            node,
            template_live: false,
            here: vec![],
        });
        let out = render_tree(&r, 0);
        assert_eq!(out.lines().count(), 2, "{out}");
    }

    #[test]
    fn render_nodes_marks_heads() {
        let n = node("aaaa0001", None, 1, None);
        let nodes = [n.clone()];
        let mut sb = crate::tree::records::tests::sandbox(TreeId::new(), Some(n.id));
        let other = crate::tree::records::tests::sandbox(TreeId::new(), None);
        sb.id = id("cccc0001");
        let r = render_nodes(&nodes, &[sb.clone(), other], |_| true);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].here, vec![sb.id]);
        assert!(r[0].template_live);
    }
}
