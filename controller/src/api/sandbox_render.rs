//! Sandbox API values as text, for `deltabox`: tables of sandboxes, one sandbox,
//! checkpoint and rollback summaries, diff lines.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use super::render::{Align, Table};
use super::sandbox_types::{
    BranchResult, DiffResult, GcResult, LimitsSpec, NodeInfo, Removed, RollbackMode,
    RollbackResult, SandboxInfo, SessionInfo,
};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long ago `then_ms` was, at `now_ms`: `12s`, `3m`, `5h`, `2d`.
pub fn age(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Bytes as a short binary size: `512B`, `1.5KiB`, `2GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    // Display only: the precision lost above 2^53 does not show in one decimal.
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{}", UNITS[unit])
}

/// A size: bytes, or a number with a K, M, G or T unit (powers of 1024; `Ki`, `KiB`
/// and `KB` spell the same unit).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text:?} is not a size: use bytes or a number with K, M, G or T (512M, 2G, 1.5GiB)"
        )
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit.strip_suffix('B').unwrap_or(&unit);
    let unit = unit.strip_suffix('I').unwrap_or(unit);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    // 2^64 is exact in f64; below it the product rounds to whole bytes.
    let bytes = (value * f64::from(1u32 << 10).powi(shift / 10)).round();
    if !(1.0..18_446_744_073_709_551_616.0).contains(&bytes) {
        return Err(format!("{text:?} is out of range: from 1 byte to 16 EiB"));
    }
    // Checked above: a whole number in 1..2^64.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bytes as u64)
}

/// Limits as `memory 2GiB, cpus 1.5, pids 256`, or `none`.
pub fn limits(limits: &LimitsSpec) -> String {
    let mut parts = Vec::new();
    if let Some(bytes) = limits.memory_bytes {
        parts.push(format!("memory {}", size(bytes)));
    }
    if let Some(cpus) = limits.cpus {
        parts.push(format!("cpus {cpus}"));
    }
    if let Some(pids) = limits.pids {
        parts.push(format!("pids {pids}"));
    }
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Every sandbox, one per row.
pub fn sandboxes_table(sandboxes: &[SandboxInfo], now_ms: u64) -> String {
    if sandboxes.is_empty() {
        return "no sandboxes\n".to_owned();
    }
    let mut table = Table::new(&[
        ("SANDBOX", Align::Left),
        ("STATE", Align::Left),
        ("AGE", Align::Right),
        ("SESSIONS", Align::Right),
        ("HEAD", Align::Left),
        ("ROOTFS", Align::Left),
    ]);
    for s in sandboxes {
        table.row(vec![
            s.id.clone(),
            s.state.clone(),
            age(now_ms, s.created_ms),
            s.sessions.len().to_string(),
            s.head.clone().unwrap_or_else(|| "-".to_owned()),
            s.rootfs.clone().unwrap_or_else(|| "(default)".to_owned()),
        ]);
    }
    table.render()
}

/// One sandbox: its fields, then its sessions.
pub fn sandbox_text(s: &SandboxInfo, now_ms: u64) -> String {
    let mut out = String::new();
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    // Writing to a String cannot fail.
    let _ = writeln!(out, "sandbox:          {}", s.id);
    let _ = writeln!(out, "state:            {}", s.state);
    let _ = writeln!(out, "tree:             {}", s.tree);
    let _ = writeln!(out, "created:          {} ago", age(now_ms, s.created_ms));
    let _ = writeln!(
        out,
        "rootfs:           {}",
        s.rootfs.as_deref().unwrap_or("(default)")
    );
    let _ = writeln!(out, "limits:           {}", limits(&s.limits));
    let _ = writeln!(out, "auto-checkpoint:  {}", s.auto_checkpoint);
    let _ = writeln!(out, "head:             {}", or_dash(&s.head));
    let _ = writeln!(out, "branched from:    {}", or_dash(&s.branched_from));
    out.push('\n');
    out.push_str(&sessions_table(&s.sessions, now_ms));
    out
}

/// Sessions, one per row.
pub fn sessions_table(sessions: &[SessionInfo], now_ms: u64) -> String {
    if sessions.is_empty() {
        return "no sessions\n".to_owned();
    }
    let mut table = Table::new(&[
        ("SESSION", Align::Left),
        ("KIND", Align::Left),
        ("PID", Align::Right),
        ("AGE", Align::Right),
    ]);
    for s in sessions {
        table.row(vec![
            s.id.clone(),
            s.kind.clone(),
            s.pid.to_string(),
            age(now_ms, s.started_ms),
        ]);
    }
    table.render()
}

/// Where a new checkpoint's time went (the id is printed apart, alone on its line).
pub fn checkpoint_timings(node: &NodeInfo) -> String {
    let t = &node.timings;
    let label = node
        .label
        .as_ref()
        .map_or_else(String::new, |l| format!(" {l:?}"));
    format!(
        "checkpoint{label} took {:.1} ms (quiesce {:.1}, files {:.1}, processes {:.1}, record {:.1}); {} sessions, layer {}\n",
        t.total_ms,
        t.quiesce_ms,
        t.files_ms,
        t.processes_ms,
        t.record_ms,
        node.sessions.len(),
        size(node.bytes)
    )
}

/// A rollback: where the sandbox is now and how long it took.
pub fn rollback_text(r: &RollbackResult) -> String {
    let what = match r.mode {
        RollbackMode::All => "files and processes",
        RollbackMode::FilesOnly => "files only",
        RollbackMode::ProcessesOnly => "processes only",
    };
    let t = &r.timings;
    let warm_up = if r.warm_up {
        "; warming up (the next command waits for it)"
    } else {
        ""
    };
    format!(
        "sandbox {} is at node {} ({what}, {} sessions)\nrollback took {:.1} ms (kill {:.1}, files {:.1}, processes {:.1}){warm_up}\n",
        r.sandbox,
        r.node,
        r.sessions.len(),
        t.total_ms,
        t.kill_ms,
        t.files_ms,
        t.processes_ms
    )
}

/// How long each branch took, as one line (the ids are printed apart).
pub fn branch_timings(b: &BranchResult) -> String {
    let times: Vec<String> = b.branch_ms.iter().map(|ms| format!("{ms:.1}")).collect();
    format!(
        "branched {} sandboxes from node {} ({} ms)\n",
        b.sandboxes.len(),
        b.node,
        times.join(", ")
    )
}

/// A diff as `+ path`, `- path`, `~ path` lines (directories end in `/`).
pub fn diff_lines(d: &DiffResult) -> String {
    if d.changes.is_empty() {
        return format!("no differences between {} and {}\n", d.from, d.to);
    }
    let mut out = String::new();
    for c in &d.changes {
        let mark = match c.change.as_str() {
            "added" => '+',
            "removed" => '-',
            "modified" => '~',
            _ => '?',
        };
        let slash = if c.file_type == "dir" && !c.path.ends_with('/') {
            "/"
        } else {
            ""
        };
        let _ = writeln!(out, "{mark} {}{slash}", c.path);
    }
    out
}

/// What a removal removed.
pub fn removed_text(r: &Removed) -> String {
    let mut out = String::new();
    for s in &r.sandboxes {
        let _ = writeln!(out, "removed sandbox {s}");
    }
    for n in &r.nodes {
        let _ = writeln!(out, "removed node {n}");
    }
    if out.is_empty() {
        out.push_str("nothing was removed\n");
    }
    out
}

/// What `gc` dropped.
pub fn gc_text(g: &GcResult) -> String {
    let mut out = format!(
        "removed {} unreferenced layers, {} empty trees and {} dumps of removed nodes\n\
         squashed {} layers of removed nodes into the layers above them, freeing {}\n",
        g.layers_removed,
        g.trees_removed,
        g.dumps_removed,
        g.layers_squashed,
        size(g.squash_bytes_freed)
    );
    if g.squash_deferred > 0 {
        let _ = writeln!(
            out,
            "{} chains left unsquashed: a sandbox using them was busy (run gc again)",
            g.squash_deferred
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::sandbox_types::DiffEntry;

    #[test]
    fn formats_sizes_and_ages() {
        assert_eq!(size(512), "512B");
        assert_eq!(size(1536), "1.5KiB");
        assert_eq!(size(2 << 30), "2GiB");
        assert_eq!(age(10_000, 9_000), "1s");
        assert_eq!(age(4_000_000, 0), "1h");
        assert_eq!(age(0, 5), "0s", "a clock step back is not negative");
        let l = LimitsSpec {
            memory_bytes: Some(512 << 20),
            cpus: Some(1.5),
            pids: None,
        };
        assert_eq!(limits(&l), "memory 512MiB, cpus 1.5");
        assert_eq!(limits(&LimitsSpec::default()), "none");
    }

    #[test]
    fn diff_marks_each_change() {
        let entry = |path: &str, change: &str, file_type: &str| DiffEntry {
            path: path.into(),
            change: change.into(),
            file_type: file_type.into(),
        };
        let d = DiffResult {
            from: "a".into(),
            to: "b".into(),
            changes: vec![
                entry("/w/new", "added", "file"),
                entry("/w/d", "removed", "dir"),
                entry("/w/f", "modified", "file"),
            ],
        };
        assert_eq!(diff_lines(&d), "+ /w/new\n- /w/d/\n~ /w/f\n");
    }
}
