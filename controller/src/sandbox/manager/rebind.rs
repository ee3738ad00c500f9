//! Taking adopted templates off the dead daemon's views.
//!
//! A template maps its program and libraries through the view of the sandbox it was
//! made in, served by the daemon that made it. After that daemon died, a page of those
//! mappings that is not in memory any more cannot be read: every process forked from
//! the template would die of `SIGBUS` on touching it. So before anything is forked from
//! an adopted template, each of its private file mappings of a view file is rebound to
//! the frozen backing file of the same file in the template's node
//! ([`deltafs::Store::backing_file`], [`crate::cr::Rebind`]): same bytes, now read from
//! the store or the base without FUSE, so later restarts cannot break them again.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use deltafs::SnapshotId;

use super::{NodeTemplates, SandboxManager};
use crate::cr::procfs::Mapping;
use crate::cr::{Rebind, Template};
use crate::sandbox::runtime::{MAX_HELD, TreeRuntime};
use crate::tree::db::Op;
use crate::tree::ids::NodeId;
use crate::tree::records::NodeRecord;

/// Why a template was not rebound.
enum Failure {
    /// Between whole mappings: it is kept as it is (its forks may fault on the pages of
    /// the mappings still on the dead views).
    Untouched(String),
    /// While its mappings were replaced: its memory may be half rebound, so it goes.
    Broken(String),
}

impl SandboxManager {
    /// Rebinds the view-file mappings of every template in `templates` (the adopted
    /// templates of one tree, by node). A node whose templates cannot all be rebound
    /// loses them (killed, recorded as gone: the node keeps its files); the returned
    /// operations record that.
    pub(super) fn rebind_templates(
        &self,
        runtime: &TreeRuntime,
        nodes: &[NodeRecord],
        templates: &mut HashMap<NodeId, Arc<NodeTemplates>>,
    ) -> Vec<Op> {
        let mut ops = Vec::new();
        for node in nodes {
            let Some(node_templates) = templates.get(&node.id) else {
                continue;
            };
            let result = super::tree_ops::snapshot_of(node)
                .map_err(|e| Failure::Untouched(e.to_string()))
                .and_then(|snapshot| {
                    // The sessions' templates and the other processes'.
                    node_templates
                        .sessions
                        .iter()
                        .map(|(_, _, template)| template)
                        .chain(node_templates.processes.iter().map(|t| &**t))
                        .try_for_each(|template| self.rebind_template(runtime, snapshot, template))
                });
            match result {
                Ok(()) => {}
                Err(Failure::Untouched(why)) => {
                    tracing::warn!(node = %node.id, "its templates stay on the dead views: {why}");
                }
                Err(Failure::Broken(why)) => {
                    tracing::warn!(node = %node.id, "its templates cannot leave the dead views, dropping them: {why}");
                    templates.remove(&node.id);
                    let mut updated = node.clone();
                    for session in &mut updated.sessions {
                        session.template = None;
                    }
                    for process in &mut updated.processes {
                        process.template = None;
                    }
                    ops.push(Op::PutNode(updated));
                }
            }
        }
        ops
    }

    fn rebind_template(
        &self,
        runtime: &TreeRuntime,
        snapshot: SnapshotId,
        template: &Template,
    ) -> Result<(), Failure> {
        let pid = template.pid();
        let mappings = template
            .file_mappings()
            .map_err(|e| Failure::Untouched(format!("template {pid}: {e}")))?;
        let mut files: Vec<OwnedFd> = Vec::new();
        let mut by_path: HashMap<PathBuf, usize> = HashMap::new();
        // Each mapping with the index of its backing file in `files`.
        let mut plan: Vec<(Mapping, usize)> = Vec::new();
        for mapping in mappings {
            let Some(rel) = view_path(&mapping.name) else {
                continue;
            };
            let backing = match self.store.backing_file(snapshot, &rel) {
                Ok(b) if b.ino == mapping.inode => b,
                // Not a file of the node (a device, a file replaced or removed since it
                // was mapped): left as it is.
                Ok(_) | Err(_) => continue,
            };
            let index = match by_path.get(&backing.path) {
                Some(&i) => i,
                None => {
                    let file = File::open(&backing.path).map_err(|e| {
                        Failure::Untouched(format!(
                            "opening {} (for {}): {e}",
                            backing.path.display(),
                            mapping.name
                        ))
                    })?;
                    files.push(file.into());
                    by_path.insert(backing.path, files.len() - 1);
                    files.len() - 1
                }
            };
            plan.push((mapping, index));
        }
        for (chunk, fds) in files.chunks(MAX_HELD).enumerate() {
            let first = chunk * MAX_HELD;
            // The mappings rebound so far are whole: the template is consistent.
            let held = runtime
                .hold_files(fds)
                .map_err(|e| Failure::Untouched(format!("handing the backing files over: {e}")))?;
            let rebinds: Vec<Rebind> = plan
                .iter()
                .filter(|(_, i)| (first..first + fds.len()).contains(i))
                .map(|(mapping, i)| Rebind {
                    mapping: mapping.clone(),
                    file: held.path(i - first),
                })
                .collect();
            template
                .rebind(&rebinds)
                .map_err(|e| Failure::Broken(format!("template {pid}: {e}")))?;
        }
        tracing::info!(template = %pid, mappings = plan.len(), files = files.len(), "rebound to backing files");
        Ok(())
    }
}

/// The path inside its view of a file a template maps, as `/proc/<pid>/maps` names it:
/// `/sb/<sandbox>/<path>` while the view is mounted in the tree, `/<path>` once it was
/// detached (its sandbox removed). `None` for a deleted file.
fn view_path(name: &str) -> Option<PathBuf> {
    if name.ends_with(" (deleted)") || !name.starts_with('/') {
        return None;
    }
    let path = Path::new(name);
    let mut parts = path.components();
    parts.next(); // the root
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(sb)), Some(Component::Normal(_))) if sb == "sb" => {
            Some(parts.as_path().to_path_buf())
        }
        _ => Some(path.strip_prefix("/").ok()?.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_paths_drop_the_sandbox_prefix() {
        assert_eq!(
            view_path("/sb/01a2-x/usr/lib/libc.so.6"),
            Some(PathBuf::from("usr/lib/libc.so.6"))
        );
        assert_eq!(
            view_path("/usr/lib/libc.so.6"),
            Some(PathBuf::from("usr/lib/libc.so.6"))
        );
        assert_eq!(view_path("/sb/x/tmp/gone (deleted)"), None);
        assert_eq!(view_path("[heap]"), None);
    }
}
