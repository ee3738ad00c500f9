//! The demo's workload (a real `sh` in the demo cgroup writing files of different sizes
//! with `dd` and `printf`) and the table of what the tracker counted for them.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Once;

use anyhow::{Context as _, Result, bail};

use super::daemon::InodeStat;
use crate::cgroup::Cgroup;
use crate::util::ChildGuard;

/// One phase of the workload: a shell script and the files it writes.
pub struct Phase {
    pub script: &'static str,
    pub files: &'static [&'static str],
}

/// Before the epoch advance: four files of different sizes, one appended five times.
pub const FIRST: Phase = Phase {
    script: r#"set -e
dd if=/dev/zero of=small.bin bs=4096 count=1 status=none
dd if=/dev/zero of=medium.bin bs=65536 count=4 status=none
dd if=/dev/zero of=large.bin bs=1048576 count=4 status=none
i=0
while [ "$i" -lt 5 ]; do
    printf 'entry %d: appended by the demo workload\n' "$i" >> journal.log
    i=$((i + 1))
done
"#,
    files: &["small.bin", "medium.bin", "large.bin", "journal.log"],
};

/// After the epoch advance: one new file and one more append.
pub const SECOND: Phase = Phase {
    script: r#"set -e
dd if=/dev/zero of=after-epoch.bin bs=8192 count=2 status=none
printf 'entry 5: appended after the epoch advance\n' >> journal.log
"#,
    files: &["after-epoch.bin", "journal.log"],
};

/// Runs `phase` with `sh -c` inside `cgroup`, in `dir`, and waits for it. Returns the
/// inode number of each file it wrote, by `stat`.
pub fn run(phase: &Phase, cgroup: &Cgroup, dir: &Path) -> Result<HashMap<u64, &'static str>> {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", phase.script])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child = ChildGuard::new(cgroup.spawn(&mut cmd)?);
    let status = child.wait()?;
    if !status.success() {
        bail!("the workload failed ({status})");
    }
    let mut inodes = HashMap::new();
    for file in phase.files {
        let path = dir.join(file);
        let meta =
            fs::metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?;
        inodes.insert(meta.ino(), *file);
    }
    Ok(inodes)
}

/// Prints the stats of `epoch` as a table, the workload's files first (in the order it
/// wrote them) and any other inode the cgroup wrote after. Fails if a file of the phase
/// has no counts: the tracker missed it.
pub fn print_table(
    phase: &Phase,
    inodes: &HashMap<u64, &'static str>,
    stats: &[InodeStat],
    epoch: u64,
) -> Result<()> {
    let current: Vec<&InodeStat> = stats.iter().filter(|stat| stat.epoch == epoch).collect();
    let by_name: HashMap<&str, &InodeStat> = current
        .iter()
        .filter_map(|stat| Some((*inodes.get(&stat.ino)?, *stat)))
        .collect();
    println!(
        "  {:<38} {:>7} {:>10} {:>14}",
        "file (epoch ".to_owned() + &epoch.to_string() + ")",
        "writes",
        "bytes",
        "pages dirtied"
    );
    let mut missing = Vec::new();
    for file in phase.files {
        match by_name.get(file) {
            Some(stat) => print_row(file, stat),
            None => missing.push(*file),
        }
    }
    for stat in current
        .iter()
        .filter(|stat| !inodes.contains_key(&stat.ino))
    {
        let label = if stat.name.is_empty() {
            // No write syscall named it: a page dirtied through another path, such as a
            // filesystem metadata block in the block device's page cache.
            format!("ino {} (unnamed: fs metadata?)", stat.ino)
        } else {
            format!("{} (ino {}, not a demo file)", stat.name, stat.ino)
        };
        print_row(&label, stat);
    }
    print_notes(&current);
    if !missing.is_empty() {
        bail!(
            "the tracker counted nothing in epoch {epoch} for {} (cgroup ids in the stats: {:?})",
            missing.join(", "),
            stats.iter().map(|stat| stat.cgroup_id).collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Explains the counts that surprise: fewer dirtied pages than 4 KiB pages written.
fn print_notes(stats: &[&InodeStat]) {
    static FOLIO_NOTE: Once = Once::new();
    if stats
        .iter()
        .any(|stat| stat.pages_dirtied > 0 && stat.pages_dirtied < stat.bytes.div_ceil(4096))
    {
        FOLIO_NOTE.call_once(|| {
            println!(
                "  (pages dirtied counts page-cache folios as the kernel dirties them: with \
                 large folios one write can dirty a single folio of many 4 KiB pages)"
            );
        });
    }
    if stats
        .iter()
        .any(|stat| stat.writes > 0 && stat.pages_dirtied == 0)
    {
        println!(
            "  (0 pages dirtied after writes: the page was still dirty from an earlier epoch, \
             not yet written back, so no page became dirty)"
        );
    }
}

fn print_row(label: &str, stat: &InodeStat) {
    println!(
        "  {label:<38} {:>7} {:>10} {:>14}",
        stat.writes, stat.bytes, stat.pages_dirtied
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(ino: u64, epoch: u64, writes: u64) -> InodeStat {
        InodeStat {
            cgroup_id: 7,
            ino,
            epoch,
            name: String::new(),
            writes,
            bytes: writes * 10,
            pages_dirtied: 1,
        }
    }

    #[test]
    fn every_phase_file_is_one_the_script_writes() {
        for phase in [&FIRST, &SECOND] {
            for file in phase.files {
                assert!(phase.script.contains(file), "{file}");
            }
        }
    }

    #[test]
    fn the_table_fails_when_a_file_was_not_counted() {
        let inodes = HashMap::from([(10, "after-epoch.bin"), (11, "journal.log")]);
        let stats = [stat(10, 2, 2), stat(11, 2, 1), stat(12, 2, 1)];
        assert!(print_table(&SECOND, &inodes, &stats, 2).is_ok());
        // Counts of an older epoch do not count for this one.
        let stale = [stat(10, 1, 2), stat(11, 2, 1)];
        let err = print_table(&SECOND, &inodes, &stale, 2).unwrap_err();
        assert!(err.to_string().contains("after-epoch.bin"), "{err}");
    }
}
