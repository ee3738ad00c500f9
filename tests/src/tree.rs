//! A sandbox tree for the runtime tests: a [`TreeRuntime`] with its own DeltaFS store,
//! default base and views, undone in order when dropped, even when the test failed.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use deltabox_controller::sandbox::{
    manager::leftovers,
    rootfs,
    runtime::{ExitStatus, Limits, SpawnRequest, TreeConfig, TreeRuntime},
};

use crate::{cgroup::cgroup2_root, daemon::binary, require_root, unique};

/// One tree with its store, default base and views; dropping it undoes everything in
/// order (sandboxes, views, tree, base, directories) even when the test failed.
pub struct Tree {
    /// The runtime (taken by tests that detach or shut it down themselves).
    pub rt: Option<TreeRuntime>,
    /// Its configuration.
    pub cfg: TreeConfig,
    /// The sandboxes' views.
    pub views: Vec<(String, deltafs::View)>,
    store: Option<deltafs::Store>,
    base: PathBuf,
    scratch: PathBuf,
    store_dir: PathBuf,
}

impl Tree {
    /// Starts a tree named after `test`, with a store and a default base of its own.
    pub fn new(test: &str) -> Self {
        require_root();
        let name = unique(test);
        let scratch = std::env::temp_dir().join(&name);
        let store_dir = Path::new("/var/lib/deltabox/store").join(&name);
        let cfg = TreeConfig {
            id: name.clone(),
            run_dir: Path::new("/run/deltabox-tests").join(&name),
            cgroup: cgroup2_root().join("deltabox-tests").join(&name),
            init_binary: binary("deltabox-init"),
        };
        let mut tree = Self {
            rt: None,
            cfg: cfg.clone(),
            views: Vec::new(),
            store: None,
            base: scratch.join("base"),
            scratch,
            store_dir,
        };
        tree.base = rootfs::ensure_default_base(&tree.base).expect("default base");
        tree.store = Some(deltafs::Store::open(&tree.store_dir).expect("open deltafs store"));
        tree.rt = Some(TreeRuntime::start(cfg).expect("start tree runtime"));
        tree
    }

    /// The runtime.
    pub fn rt(&self) -> &TreeRuntime {
        self.rt.as_ref().expect("runtime")
    }

    /// A sandbox on a fresh DeltaFS view of the default base.
    pub fn add(&mut self, sandbox: &str, limits: &Limits) -> PathBuf {
        let mountpoint = self
            .rt()
            .prepare_sandbox(sandbox, limits)
            .expect("prepare sandbox");
        let view = self
            .store
            .as_ref()
            .expect("store")
            .mount(&self.base, &mountpoint, None)
            .expect("mount view");
        self.views.push((sandbox.to_owned(), view));
        self.rt().add_sandbox(sandbox).expect("add sandbox");
        mountpoint
    }

    /// Runs `argv` in `sandbox` and returns its exit, stdout and stderr.
    pub fn run(&self, sandbox: &str, argv: &[&str]) -> (ExitStatus, String, String) {
        run_in(self.rt(), sandbox, argv, "/")
    }
}

/// A spawn request for `argv` in `cwd` with a minimal environment.
pub fn request(argv: &[&str], cwd: &str) -> SpawnRequest {
    SpawnRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![
            (
                "PATH".into(),
                "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
            ),
            ("HOME".into(), "/root".into()),
        ],
        cwd: cwd.into(),
        stdin: false,
    }
}

/// Runs `argv` in `sandbox` of `rt` and returns its exit, stdout and stderr.
pub fn run_in(
    rt: &TreeRuntime,
    sandbox: &str,
    argv: &[&str],
    cwd: &str,
) -> (ExitStatus, String, String) {
    let mut sp = rt.spawn(sandbox, &request(argv, cwd)).expect("spawn");
    let mut err_pipe = sp.stderr;
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    sp.stdout.read_to_string(&mut out).expect("read stdout");
    let err = err.join().expect("stderr reader");
    let status = rt
        .wait_exit(sp.ns_pid, Some(Duration::from_secs(60)))
        .expect("wait exit")
        .expect("exit within 60 s");
    (status, out, err)
}

impl Drop for Tree {
    fn drop(&mut self) {
        if let Some(rt) = &self.rt {
            for (sandbox, _) in &self.views {
                let _ = rt.remove_sandbox(sandbox);
            }
        }
        // Detached, as the daemon does: a process left (the test's "template") keeps
        // the view busy until the tree's shutdown below kills it.
        for (_, view) in self.views.drain(..) {
            let _ = view.detach();
        }
        if let Some(rt) = self.rt.take() {
            let _ = rt.shutdown();
        }
        // A shutdown that failed (or a test that took the runtime) leaves the tree's
        // processes and cgroups: clean them up as after a dead daemon, and then with
        // the test guard's longer wait, which reports what it cannot remove.
        if self.cfg.cgroup.exists() {
            if let Err(e) = leftovers::clean(&self.cfg.run_dir, &self.cfg.cgroup) {
                eprintln!("cleaning up tree {}: {e}", self.cfg.id);
            }
            crate::cgroup::remove_tree(&self.cfg.cgroup);
        }
        self.store.take();
        if rootfs::release_default_base(&self.base).is_ok() {
            let _ = fs::remove_dir_all(&self.scratch);
        }
        let _ = fs::remove_dir_all(&self.store_dir);
    }
}
