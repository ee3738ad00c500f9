//! Tests of [`TreeDb`] on real redb files in temporary directories (no root needed).
//! Two tests re-execute this test binary as a child process (an `#[ignore]`d test
//! selected with `--exact --ignored`, its role given by an environment variable).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::records::tests::{node, sandbox};
use super::*;

const CRASH_ENV: &str = "DELTABOX_TREEDB_CRASH_CHILD_DB";
const LOCK_ENV: &str = "DELTABOX_TREEDB_LOCK_CHILD_DB";

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tree.redb");
    (dir, path)
}

fn tree(db: &TreeDb) -> TreeRecord {
    let t = TreeRecord {
        id: TreeId::new(),
        created_ms: unix_ms_now(),
        rootfs: None,
    };
    db.put_tree(&t).unwrap();
    t
}

/// root ─┬─ a ─── c
///       └─ b
fn small_tree(db: &TreeDb) -> (TreeRecord, SandboxRecord, [NodeRecord; 4]) {
    let t = tree(db);
    let sb = sandbox(t.id, None);
    db.put_sandbox(&sb).unwrap();
    let root = node(t.id, sb.id, None, 1);
    let a = node(t.id, sb.id, Some(root.id), 2);
    let b = node(t.id, sb.id, Some(root.id), 3);
    let c = node(t.id, sb.id, Some(a.id), 4);
    for n in [&root, &a, &b, &c] {
        db.put_node(n).unwrap();
    }
    (t, sb, [root, a, b, c])
}

fn ids(nodes: &[NodeRecord]) -> Vec<NodeId> {
    nodes.iter().map(|n| n.id).collect()
}

/// Kills (by its pid, SIGKILL) and reaps a child even if the test fails.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child's stdout, line by line, from a reader thread, so a hung child fails the
/// test after `LINE_TIMEOUT` instead of hanging it.
fn lines_of(child: &mut ChildGuard) -> impl Iterator<Item = String> + use<> {
    let out = child.0.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line.expect("read child stdout")).is_err() {
                break;
            }
        }
    });
    std::iter::from_fn(move || match rx.recv_timeout(LINE_TIMEOUT) {
        Ok(line) => Some(line),
        Err(mpsc::RecvTimeoutError::Disconnected) => None,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("child silent for {LINE_TIMEOUT:?}"),
    })
}

const LINE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the `#[ignore]`d test `test` of this binary as a child, `env` naming the db.
/// Its harness prints `test NAME ... ` without a newline before the test runs, so the
/// child roles print an empty line first.
fn spawn_role(test: &str, env: &str, db: &Path) -> ChildGuard {
    let exe = std::env::current_exe().expect("current_exe");
    let child = Command::new(exe)
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(env, db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the test binary as a child");
    ChildGuard(child)
}

#[test]
fn db_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<TreeDb>();
}

#[test]
fn threads_share_one_handle() {
    let (_dir, path) = tmp();
    let db = std::sync::Arc::new(TreeDb::open(&path).unwrap());
    let (t, sb, nodes) = small_tree(&db);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let db = db.clone();
            let root = nodes[0].id;
            std::thread::spawn(move || {
                for i in 0..25 {
                    let n = node(t.id, sb.id, Some(root), 100 + w * 25 + i);
                    db.put_node(&n).unwrap();
                    assert_eq!(db.node(&n.id).unwrap(), Some(n));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(db.children(&nodes[0].id).unwrap().len(), 2 + 100);
    assert_eq!(db.nodes(&t.id).unwrap().len(), 4 + 100);
}

#[test]
fn records_round_trip_through_the_db_and_survive_reopen() {
    let (_dir, path) = tmp();
    let db = TreeDb::open(&path).unwrap();
    let (t, mut sb, nodes) = small_tree(&db);
    sb.head = Some(nodes[3].id);
    db.put_sandbox(&sb).unwrap();
    assert_eq!(db.trees().unwrap(), vec![t.clone()]);
    assert_eq!(db.sandbox(&sb.id).unwrap(), Some(sb.clone()));
    assert_eq!(db.sandbox(&SandboxId::new()).unwrap(), None);
    for n in &nodes {
        assert_eq!(db.node(&n.id).unwrap().as_ref(), Some(n));
    }
    drop(db);

    let db = TreeDb::open(&path).unwrap();
    assert_eq!(db.trees().unwrap(), vec![t.clone()]);
    assert_eq!(db.sandboxes().unwrap(), vec![sb]);
    assert_eq!(db.nodes(&t.id).unwrap(), nodes.to_vec());
    assert_eq!(db.children(&nodes[0].id).unwrap(), nodes[1..3].to_vec());
    db.delete_tree(&t.id).unwrap();
    assert!(db.trees().unwrap().is_empty());
}

#[test]
fn second_handle_in_this_process_is_refused() {
    let (_dir, path) = tmp();
    let _db = TreeDb::open(&path).unwrap();
    let e = TreeDb::open(&path).unwrap_err();
    assert!(matches!(e, TreeDbError::Locked { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("locked"),
        "{msg}"
    );
}

#[test]
fn second_process_is_refused_until_the_first_dies() {
    let (_dir, path) = tmp();
    let mut child = spawn_role("tree::tests::lock_child", LOCK_ENV, &path);
    let mut lines = lines_of(&mut child);
    assert!(
        lines.any(|l| l == "open"),
        "child exited before opening the db"
    );
    let e = TreeDb::open(&path).unwrap_err();
    assert!(matches!(e, TreeDbError::Locked { .. }), "{e}");
    // SIGKILL releases the lock: the kernel drops the flock with the last fd.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    TreeDb::open(&path).unwrap();
}

#[test]
#[ignore = "child role of second_process_is_refused_until_the_first_dies"]
fn lock_child() {
    let Some(path) = std::env::var_os(LOCK_ENV) else {
        eprintln!("{LOCK_ENV} unset: nothing to do outside its parent test");
        return;
    };
    let _db = TreeDb::open(Path::new(&path)).unwrap();
    println!();
    println!("open");
    // Hold the database until the parent closes our stdin or kills us.
    let mut sink = String::new();
    let _ = std::io::stdin().read_line(&mut sink);
}

#[test]
fn garbage_file_is_reported_as_corrupt() {
    let (_dir, path) = tmp();
    std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
    let e = TreeDb::open(&path).unwrap_err();
    assert!(matches!(e, TreeDbError::Corrupt { .. }), "{e:?}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
}

#[test]
fn other_schema_and_newer_records_are_refused() {
    let (_dir, path) = tmp();
    let db = TreeDb::open(&path).unwrap();
    let (_, _, nodes) = small_tree(&db);
    drop(db);
    {
        let raw = redb::Database::create(&path).unwrap();
        let txn = raw.begin_write().unwrap();
        {
            let mut t = txn
                .open_table(redb::TableDefinition::<&str, &str>::new("nodes"))
                .unwrap();
            t.insert(
                nodes[1].id.to_string().as_str(),
                r#"{"version":9,"record":{}}"#,
            )
            .unwrap();
        }
        txn.commit().unwrap();
    }
    let db = TreeDb::open(&path).unwrap();
    let e = db.node(&nodes[1].id).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&nodes[1].id.to_string()) && msg.contains("version 9"),
        "{msg}"
    );
    assert_eq!(db.node(&nodes[0].id).unwrap().as_ref(), Some(&nodes[0]));
    drop(db);
    {
        let raw = redb::Database::create(&path).unwrap();
        let txn = raw.begin_write().unwrap();
        {
            let mut t = txn
                .open_table(redb::TableDefinition::<&str, u32>::new("meta"))
                .unwrap();
            t.insert("schema", 99).unwrap();
        }
        txn.commit().unwrap();
    }
    let e = TreeDb::open(&path).unwrap_err();
    assert!(matches!(e, TreeDbError::Schema { found: 99, .. }), "{e}");
}

#[test]
fn a_failing_op_mid_batch_writes_nothing() {
    let (_dir, path) = tmp();
    let db = TreeDb::open(&path).unwrap();
    let (t, sb, nodes) = small_tree(&db);
    let fresh = node(t.id, sb.id, Some(nodes[3].id), 10);
    let mut moved_sb = sb.clone();
    moved_sb.head = Some(fresh.id);
    let orphan = node(t.id, sb.id, Some(NodeId::new()), 11);
    let other_tree = TreeRecord {
        id: TreeId::new(),
        created_ms: 5,
        rootfs: Some("/srv/r".into()),
    };
    let ops = [
        Op::PutNode(fresh.clone()),
        Op::PutSandbox(moved_sb),
        Op::PutTree(other_tree),
        Op::DeleteNode(nodes[2].id),
        Op::PutNode(orphan.clone()), // its parent does not exist
        Op::DeleteSandbox(sb.id),
    ];
    let e = db.commit(&ops).unwrap_err();
    assert!(
        matches!(e, TreeDbError::UnknownParent { node, .. } if node == orphan.id),
        "{e}"
    );
    drop(db);
    let db = TreeDb::open(&path).unwrap();
    assert_eq!(db.node(&fresh.id).unwrap(), None);
    assert_eq!(db.sandbox(&sb.id).unwrap(), Some(sb));
    assert_eq!(db.trees().unwrap(), vec![t.clone()]);
    assert_eq!(db.nodes(&t.id).unwrap(), nodes.to_vec());
    assert_eq!(db.children(&nodes[3].id).unwrap(), vec![]);
}

#[test]
fn a_batch_checks_its_end_state_in_either_order() {
    let (_dir, path) = tmp();
    let db = TreeDb::open(&path).unwrap();
    let (t, mut sb, nodes) = small_tree(&db);
    let n = node(t.id, sb.id, Some(nodes[3].id), 10);
    let child = node(t.id, sb.id, Some(n.id), 11);
    sb.head = Some(child.id);
    // The sandbox's head and the child come before the nodes they name.
    db.commit(&[
        Op::PutSandbox(sb.clone()),
        Op::PutNode(child.clone()),
        Op::PutNode(n.clone()),
    ])
    .unwrap();
    assert_eq!(db.sandbox(&sb.id).unwrap().unwrap().head, Some(child.id));
    assert_eq!(
        ids(&db.subtree(&nodes[3].id).unwrap()),
        vec![nodes[3].id, n.id, child.id]
    );
}

#[test]
fn invalid_records_are_refused_with_their_ids() {
    let (_dir, path) = tmp();
    let db = TreeDb::open(&path).unwrap();
    let (t, sb, nodes) = small_tree(&db);
    let t2 = tree(&db);
    let n2 = node(t2.id, sb.id, None, 20);
    db.put_node(&n2).unwrap();

    let mut n = node(t.id, sb.id, None, 30);
    n.parent = Some(n.id);
    let e = db.put_node(&n).unwrap_err();
    assert!(matches!(e, TreeDbError::SelfParent { .. }), "{e}");

    let mut n = node(t.id, sb.id, Some(nodes[0].id), 30);
    n.checkpoint_ms = f64::NAN;
    assert!(matches!(
        db.put_node(&n).unwrap_err(),
        TreeDbError::NotFinite { .. }
    ));

    let n = node(t.id, sb.id, Some(n2.id), 30);
    let e = db.put_node(&n).unwrap_err();
    assert!(matches!(e, TreeDbError::ParentInOtherTree { .. }), "{e}");
    assert!(e.to_string().contains(&n2.id.to_string()), "{e}");

    let mut moved = nodes[3].clone();
    moved.parent = Some(nodes[2].id);
    let e = db.put_node(&moved).unwrap_err();
    assert!(matches!(e, TreeDbError::NodeMoved { .. }), "{e}");
    // The same node with a new label and no template is an allowed update.
    let mut updated = nodes[3].clone();
    updated.label = Some("renamed".into());
    updated.sessions[0].template = None;
    db.put_node(&updated).unwrap();
    assert_eq!(db.node(&updated.id).unwrap(), Some(updated));

    let mut s = sb.clone();
    s.head = Some(NodeId::new());
    assert!(matches!(
        db.put_sandbox(&s).unwrap_err(),
        TreeDbError::UnknownHead { .. }
    ));
    s.head = Some(n2.id);
    let e = db.put_sandbox(&s).unwrap_err();
    assert!(matches!(e, TreeDbError::HeadInOtherTree { .. }), "{e}");
    assert_eq!(db.sandbox(&sb.id).unwrap(), Some(sb));
}

#[test]
fn prefixes_resolve_uniquely_or_say_why_not() {
    let (_dir, path) = tmp();
    let db = TreeDb::open(&path).unwrap();
    let (_, sb, nodes) = small_tree(&db);
    let sb2 = sandbox(sb.tree, None);
    db.put_sandbox(&sb2).unwrap();

    for n in &nodes {
        assert_eq!(db.resolve_node(&n.id.short()).unwrap(), n.id);
        assert_eq!(db.resolve_node(&n.id.to_string()).unwrap(), n.id);
        assert_eq!(
            db.resolve_node(&n.id.to_string().to_uppercase()).unwrap(),
            n.id
        );
    }
    assert_eq!(db.resolve_sandbox(&sb2.id.short()).unwrap(), sb2.id);
    assert_eq!(db.resolve_sandbox(&sb.id.to_string()[..30]).unwrap(), sb.id);

    // Ids made close in time share their leading (time) digits.
    let all: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
    let common = (0..36)
        .take_while(|&i| all.iter().all(|s| s.as_bytes()[i] == all[0].as_bytes()[i]))
        .count();
    assert!(common >= 1, "{all:?}");
    match db.resolve_node(&all[0][..common]).unwrap_err() {
        TreeDbError::Ambiguous {
            kind, candidates, ..
        } => {
            assert_eq!(kind, "node");
            assert_eq!(candidates.len(), 4);
            assert!(candidates.contains(&nodes[2].id.to_string()));
        }
        e => panic!("expected ambiguous, got {e}"),
    }
    // A whole id in its simple form (no hyphens) is a whole id too.
    let simple: String = nodes[1].id.to_string().replace('-', "");
    assert_eq!(db.resolve_node(&simple).unwrap(), nodes[1].id);
    // A whole node id is not a sandbox's.
    let e = db.resolve_sandbox(&nodes[1].id.to_string()).unwrap_err();
    assert!(matches!(e, TreeDbError::UnknownId { .. }), "{e}");
    let unknown = NodeId::new().to_string();
    let e = db.resolve_node(&unknown).unwrap_err();
    assert!(
        matches!(e, TreeDbError::UnknownId { kind: "node", .. }),
        "{e}"
    );
    let e = db.resolve_sandbox("sb-1").unwrap_err();
    assert!(matches!(e, TreeDbError::BadPrefix { .. }), "{e}");
    assert!(e.to_string().contains("\"sb-1\""), "{e}");
}

/// A whole id is looked up, not matched against every key: with thousands of nodes
/// (a tree search) the scan a prefix needs costs milliseconds per call.
#[test]
fn a_whole_id_resolves_by_lookup_among_thousands_of_nodes() {
    let (_dir, path) = tmp();
    let db = TreeDb::open(&path).unwrap();
    let t = tree(&db);
    let sb = sandbox(t.id, None);
    let mut parent = None;
    let mut ops = vec![Op::PutSandbox(sb.clone())];
    let mut made = Vec::new();
    for i in 0..3000 {
        let n = node(t.id, sb.id, parent, i);
        parent = Some(n.id);
        made.push(n.id);
        ops.push(Op::PutNode(n));
    }
    db.commit(&ops).unwrap();
    let timed = |f: &dyn Fn(&NodeId) -> NodeId| {
        let start = std::time::Instant::now();
        for id in made.iter().step_by(30) {
            assert_eq!(f(id), *id);
        }
        start.elapsed() / 100
    };
    let whole = timed(&|id| db.resolve_node(&id.to_string()).unwrap());
    let prefix = timed(&|id| db.resolve_node(&id.to_string()[..35]).unwrap());
    eprintln!("resolve_node among 3000 nodes: whole id {whole:?}, 35-character prefix {prefix:?}");
}

#[test]
fn children_subtree_and_nodes_follow_the_tree() {
    let (_dir, path) = tmp();
    let db = TreeDb::open(&path).unwrap();
    let (t, sb, [root, a, b, c]) = small_tree(&db);
    let other = tree(&db);
    db.put_node(&node(other.id, sb.id, None, 0)).unwrap();

    assert_eq!(ids(&db.children(&root.id).unwrap()), vec![a.id, b.id]);
    assert_eq!(ids(&db.children(&a.id).unwrap()), vec![c.id]);
    assert!(db.children(&c.id).unwrap().is_empty());
    assert_eq!(
        ids(&db.subtree(&root.id).unwrap()),
        vec![root.id, a.id, c.id, b.id]
    );
    assert_eq!(ids(&db.subtree(&a.id).unwrap()), vec![a.id, c.id]);
    assert!(db.subtree(&NodeId::new()).unwrap().is_empty());
    assert_eq!(
        ids(&db.nodes(&t.id).unwrap()),
        vec![root.id, a.id, b.id, c.id]
    );
    assert_eq!(db.nodes(&other.id).unwrap().len(), 1);
}

#[test]
fn delete_nodes_keeps_indexes_consistent() {
    let (_dir, path) = tmp();
    let db = TreeDb::open(&path).unwrap();
    let (t, sb, [root, a, b, c]) = small_tree(&db);
    db.delete_nodes(&[a.id, b.id, NodeId::new()]).unwrap();

    assert_eq!(db.node(&a.id).unwrap(), None);
    assert!(db.children(&root.id).unwrap().is_empty());
    assert!(db.children(&a.id).unwrap().is_empty());
    assert_eq!(ids(&db.nodes(&t.id).unwrap()), vec![root.id, c.id]);
    assert_eq!(ids(&db.subtree(&root.id).unwrap()), vec![root.id]);
    // c is an orphan now; updating it must not bring back an index entry for a.
    let mut c2 = c.clone();
    c2.bytes = 1;
    db.put_node(&c2).unwrap();
    assert!(db.children(&a.id).unwrap().is_empty());
    // A node cannot be hung under a deleted one.
    let e = db.put_node(&node(t.id, sb.id, Some(a.id), 9)).unwrap_err();
    assert!(matches!(e, TreeDbError::UnknownParent { .. }), "{e}");
    let e = db.resolve_node(&a.id.short()).unwrap_err();
    assert!(matches!(e, TreeDbError::UnknownId { .. }), "{e}");
    db.delete_sandbox(&sb.id).unwrap();
    assert!(db.sandboxes().unwrap().is_empty());
}

#[test]
fn acknowledged_nodes_survive_sigkill_of_the_writer() {
    let (_dir, path) = tmp();
    let mut child = spawn_role("tree::tests::crash_child", CRASH_ENV, &path);
    let mut tree_id = None;
    let mut acked = Vec::new();
    for line in lines_of(&mut child) {
        if let Some(t) = line.strip_prefix("tree ") {
            tree_id = Some(t.parse::<TreeId>().unwrap());
        } else if let Some(n) = line.strip_prefix("committed ") {
            acked.push(n.parse::<NodeId>().unwrap());
            if acked.len() == 200 {
                break;
            }
        }
    }
    assert_eq!(acked.len(), 200, "child stopped early");
    // SIGKILL while it is (very likely) in the middle of its next commit.
    child.0.kill().unwrap();
    child.0.wait().unwrap();

    let db = TreeDb::open(&path).unwrap();
    let tree_id = tree_id.expect("child reported its tree");
    let stored = ids(&db.nodes(&tree_id).unwrap());
    assert!(
        stored.len() >= acked.len(),
        "{} < {}",
        stored.len(),
        acked.len()
    );
    assert_eq!(
        &stored[..acked.len()],
        &acked[..],
        "acknowledged nodes, in order"
    );
    let sb = &db.sandboxes().unwrap()[0];
    let head = sb.head.expect("head");
    assert!(stored.contains(&head));
    // The chain is whole: each node's parent is the one before it.
    for w in stored.windows(2) {
        assert_eq!(db.node(&w[1]).unwrap().unwrap().parent, Some(w[0]));
    }
}

#[test]
#[ignore = "child role of acknowledged_nodes_survive_sigkill_of_the_writer"]
fn crash_child() {
    let Some(path) = std::env::var_os(CRASH_ENV) else {
        eprintln!("{CRASH_ENV} unset: nothing to do outside its parent test");
        return;
    };
    let db = TreeDb::open(Path::new(&path)).unwrap();
    let t = tree(&db);
    let mut sb = sandbox(t.id, None);
    db.put_sandbox(&sb).unwrap();
    println!();
    println!("tree {}", t.id);
    let mut parent = None;
    for i in 0.. {
        let n = node(t.id, sb.id, parent, i);
        sb.head = Some(n.id);
        // The node and the sandbox's new head in one transaction, as a checkpoint does.
        db.commit(&[Op::PutNode(n.clone()), Op::PutSandbox(sb.clone())])
            .unwrap();
        println!("committed {}", n.id);
        parent = Some(n.id);
    }
}
