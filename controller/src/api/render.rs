//! API values as aligned text tables, for `deltabox` and `deltaboxd load`.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::bpf::{AttachedProgram, Origin};

use super::types::{InodeStat, StatusResponse, WatchedCgroup};

/// Column alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// A text table: a header row and aligned columns separated by two spaces.
#[derive(Clone, Debug)]
pub struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[(&'static str, Align)]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells are empty, extra cells dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as lines, each ending in a newline, without trailing spaces.
    pub fn render(&self) -> String {
        let cell = |row: &[String], i: usize| row.get(i).map_or("", String::as_str).to_owned();
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| cell(r, i).chars().count())
                    .chain([self.headers[i].0.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let header: Vec<String> = self.headers.iter().map(|(h, _)| (*h).to_owned()).collect();
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (_, align)) in self.headers.iter().enumerate() {
                let text = cell(row, i);
                let pad = widths[i].saturating_sub(text.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                match align {
                    Align::Left => {
                        line.push_str(&text);
                        line.push_str(&" ".repeat(pad));
                    }
                    Align::Right => {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(&text);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The attached programs.
pub fn programs_table(programs: &[AttachedProgram]) -> String {
    if programs.is_empty() {
        return "no programs are attached\n".to_owned();
    }
    let mut table = Table::new(&[
        ("PROGRAM", Align::Left),
        ("TRACEPOINT", Align::Left),
        ("PROG ID", Align::Right),
        ("LINK ID", Align::Right),
        ("PINNED AT", Align::Left),
    ]);
    for p in programs {
        table.row(vec![
            p.name.clone(),
            p.tracepoint.clone(),
            p.program_id.to_string(),
            p.link_id.to_string(),
            p.pinned_at.display().to_string(),
        ]);
    }
    table.render()
}

/// Watched cgroups.
pub fn watched_table(watched: &[WatchedCgroup]) -> String {
    if watched.is_empty() {
        return "no cgroups are watched\n".to_owned();
    }
    let mut table = Table::new(&[
        ("CGROUP", Align::Left),
        ("ID", Align::Right),
        ("EPOCH", Align::Right),
    ]);
    for w in watched {
        table.row(vec![w.path.clone(), w.id.to_string(), w.epoch.to_string()]);
    }
    table.render()
}

/// Per-inode counters.
pub fn inode_stats_table(stats: &[InodeStat]) -> String {
    if stats.is_empty() {
        return "no writes counted in the current epochs\n".to_owned();
    }
    let mut table = Table::new(&[
        ("CGROUP", Align::Left),
        ("EPOCH", Align::Right),
        ("INODE", Align::Right),
        ("NAME", Align::Left),
        ("WRITES", Align::Right),
        ("BYTES", Align::Right),
        ("PAGES DIRTIED", Align::Right),
    ]);
    for InodeStat {
        cgroup_path,
        record: s,
    } in stats
    {
        table.row(vec![
            cgroup_path.clone(),
            s.epoch.to_string(),
            s.ino.to_string(),
            if s.name.is_empty() {
                "-".to_owned()
            } else {
                s.name.clone()
            },
            s.writes.to_string(),
            s.bytes.to_string(),
            s.pages_dirtied.to_string(),
        ]);
    }
    table.render()
}

/// The status of a daemon: a summary, its programs and its watched cgroups.
pub fn status_text(status: &StatusResponse) -> String {
    let origin = match status.bpf.origin {
        Origin::Loaded => "loaded by this daemon",
        Origin::Adopted => "adopted from pins",
    };
    let c = &status.counters;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "deltaboxd {} (pid {}), up {}",
        status.version,
        status.pid,
        uptime(status.uptime_secs)
    );
    let _ = writeln!(out, "api socket:   {}", status.socket.display());
    let _ = writeln!(out, "metrics:      http://{}/metrics", status.metrics_addr);
    let _ = writeln!(
        out,
        "eBPF:         {} programs under {} ({origin})",
        status.bpf.programs.len(),
        status.bpf.pin_dir.display()
    );
    let _ = writeln!(
        out,
        "since load:   {} write syscalls, {} folios dirtied, {} fds unresolved, {} inodes dropped (stats map full)",
        c.write_syscalls, c.dirtied_folios, c.fd_unresolved, c.stats_full
    );
    out.push('\n');
    out.push_str(&programs_table(&status.bpf.programs));
    out.push('\n');
    out.push_str(&watched_table(&status.watched));
    out
}

/// What `deltaboxd unload` removed.
pub fn unloaded_text(unpinned: &[PathBuf]) -> String {
    if unpinned.is_empty() {
        return "nothing was pinned\n".to_owned();
    }
    let mut out = String::from("unpinned:\n");
    for path in unpinned {
        let _ = writeln!(out, "  {}", path.display());
    }
    out
}

fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&[("NAME", Align::Left), ("N", Align::Right)]);
        t.row(vec!["a".into(), "100".into()]);
        t.row(vec!["long name".into(), "2".into()]);
        assert_eq!(
            t.render(),
            "NAME         N\na          100\nlong name    2\n"
        );
    }

    #[test]
    fn formats_uptime() {
        assert_eq!(uptime(5), "5s");
        assert_eq!(uptime(65), "1m05s");
        assert_eq!(uptime(3 * 3600 + 120), "3h02m");
        assert_eq!(uptime(2 * 86_400 + 3600), "2d01h");
    }
}
