//! The sandbox runtime on the real kernel: a tree's init in new namespaces, sandboxes
//! on real DeltaFS views of the default base, spawning, the anchor paths DeltaCR uses,
//! reaping, and a clean shutdown. Needs root, cgroup v2, FUSE and the xfs store mount.

use std::{
    fs,
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use deltabox_controller::sandbox::{
    rootfs,
    runtime::{ExitStatus, Limits, RuntimeError, TreeRuntime},
};
use deltabox_tests::tree::{Tree, request, run_in};
use deltabox_tests::{require_root, unique, wait_until};

/// The capability mask of Docker's default set.
fn docker_caps_mask() -> u64 {
    [0u32, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31]
        .iter()
        .fold(0, |m, b| m | (1u64 << b))
}

#[test]
fn spawn_round_trips_stdio_exit_cwd_caps_and_cgroup() {
    let mut tree = Tree::new("rt-spawn");
    tree.add("a", &Limits::default());
    let (status, out, err) = run_in(
        tree.rt(),
        "a",
        &[
            "sh",
            "-c",
            "echo $$; pwd; id -u; hostname; cat /proc/self/status; cat /proc/self/cgroup; echo oops >&2; exit 3",
        ],
        "/tmp",
    );
    assert_eq!(status, ExitStatus::Code(3), "stdout: {out}\nstderr: {err}");
    assert_eq!(err, "oops\n");
    let mut lines = out.lines();
    let pid: i32 = lines.next().expect("pid line").parse().expect("pid");
    assert!(pid > 1 && pid < 100, "ns pid {pid} is not small");
    assert_eq!(lines.next(), Some("/tmp"), "cwd");
    assert_eq!(lines.next(), Some("0"), "uid");
    assert_eq!(lines.next(), Some("deltabox"), "hostname");
    let cap_eff = out
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line");
    let cap_eff = u64::from_str_radix(cap_eff.trim(), 16).expect("hex caps");
    assert_eq!(cap_eff, docker_caps_mask(), "effective caps {cap_eff:x}");
    let cap_bnd = out
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .expect("CapBnd line");
    assert_eq!(
        u64::from_str_radix(cap_bnd.trim(), 16).unwrap(),
        docker_caps_mask()
    );
    let v2 = out
        .lines()
        .find(|l| l.starts_with("0::"))
        .expect("cgroup v2 line");
    assert!(v2.ends_with("/sb-a/work"), "runs in {v2}");

    // A long command: host pid, ns pid, work cgroup, kill_work.
    let sp = tree
        .rt()
        .spawn("a", &request(&["sleep", "30"], "/"))
        .expect("spawn sleep");
    assert_eq!(TreeRuntime::ns_pid_of(sp.host_pid), Some(sp.ns_pid));
    let procs = fs::read_to_string(tree.rt().work_cgroup("a").join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == sp.host_pid.to_string()),
        "host pid {} not in work/ ({procs})",
        sp.host_pid
    );
    tree.rt().freeze_work("a").expect("freeze");
    tree.rt().thaw_work("a").expect("thaw");
    tree.rt().kill_work("a").expect("kill work");
    assert_eq!(
        tree.rt()
            .wait_exit(sp.ns_pid, Some(Duration::from_secs(5)))
            .unwrap(),
        Some(ExitStatus::Signal(9))
    );

    // Clear errors.
    let e = tree
        .rt()
        .spawn("a", &request(&["/usr/bin/deltabox-no-such-tool"], "/"))
        .expect_err("missing binary");
    assert!(
        e.to_string()
            .contains("no such file: /usr/bin/deltabox-no-such-tool in sandbox a"),
        "{e}"
    );
    let e = tree
        .rt()
        .spawn("a", &request(&["deltabox-no-such-tool"], "/"))
        .expect_err("missing binary in PATH");
    assert!(e.to_string().contains("no such file"), "{e}");
    let e = tree
        .rt()
        .spawn("a", &request(&["true"], "/no/such/dir"))
        .expect_err("bad cwd");
    assert!(e.to_string().contains("/no/such/dir"), "{e}");
    let e = tree
        .rt()
        .spawn("nope", &request(&["true"], "/"))
        .expect_err("unknown sandbox");
    assert!(matches!(e, RuntimeError::UnknownSandbox { .. }), "{e}");
    assert!(e.to_string().contains("unknown sandbox nope"), "{e}");
    // The tree still works after the errors.
    assert_eq!(tree.run("a", &["true"]).0, ExitStatus::Code(0));
}

#[test]
fn stdin_pipe_reaches_the_command() {
    let mut tree = Tree::new("rt-stdin");
    tree.add("a", &Limits::default());
    let mut req = request(&["cat"], "/");
    req.stdin = true;
    let mut sp = tree.rt().spawn("a", &req).expect("spawn cat");
    {
        use std::io::Write as _;
        let mut stdin = sp.stdin.take().expect("stdin pipe");
        stdin.write_all(b"hello through the pipe\n").unwrap();
    }
    let mut out = String::new();
    sp.stdout.read_to_string(&mut out).unwrap();
    assert_eq!(out, "hello through the pipe\n");
    assert_eq!(
        tree.rt()
            .wait_exit(sp.ns_pid, Some(Duration::from_secs(10)))
            .unwrap(),
        Some(ExitStatus::Code(0))
    );
}

#[test]
fn files_land_in_the_view_and_host_stays_untouched() {
    let mut tree = Tree::new("rt-files");
    let mountpoint = tree.add("a", &Limits::default());
    let host_probe = Path::new("/usr/bin/deltabox-runtime-test-probe");
    assert!(!host_probe.exists(), "leftover {}", host_probe.display());
    let (status, out, err) = tree.run(
        "a",
        &[
            "sh",
            "-c",
            "echo hi > /workspace/x && echo evil > /usr/bin/deltabox-runtime-test-probe && \
             echo ROOT; ls -A /root; echo HOME; ls -A /home; echo SHADOW; cat /etc/shadow; echo END",
        ],
    );
    assert_eq!(status, ExitStatus::Code(0), "{out}\n{err}");
    assert_eq!(
        fs::read_to_string(mountpoint.join("workspace/x")).unwrap(),
        "hi\n"
    );
    assert_eq!(
        fs::read_to_string(mountpoint.join("usr/bin/deltabox-runtime-test-probe")).unwrap(),
        "evil\n"
    );
    assert!(
        !host_probe.exists(),
        "a sandbox write reached the host's /usr"
    );
    assert_eq!(
        out, "ROOT\nHOME\nSHADOW\nEND\n",
        "host homes or secrets show through"
    );
    // The host really has what is hidden, so the check above means something.
    assert!(fs::read_dir("/root").unwrap().next().is_some());
    assert!(fs::metadata("/etc/shadow").unwrap().len() > 0);
}

#[test]
fn two_sandboxes_see_their_own_files_and_the_anchor_paths_cross() {
    let mut tree = Tree::new("rt-two");
    tree.add("a", &Limits::default());
    tree.add("b", &Limits::default());
    let (st, _, err) = tree.run("b", &["sh", "-c", "echo b > /workspace/only-b"]);
    assert_eq!(st, ExitStatus::Code(0), "{err}");
    let (st, _, err) = tree.run("a", &["sh", "-c", "echo a > /workspace/only-a"]);
    assert_eq!(st, ExitStatus::Code(0), "{err}");
    assert_eq!(tree.run("a", &["ls", "/workspace"]).1, "only-a\n");
    assert_eq!(tree.run("b", &["ls", "/workspace"]).1, "only-b\n");

    let rt = tree.rt();
    let anchor_b = rt.anchor_ns_pid("b").expect("anchor of b");
    assert_eq!(
        rt.chroot_path("b"),
        Some(format!("/proc/{anchor_b}/root").into())
    );
    let root_b = rt.chroot_path("b").unwrap();
    let work_b = rt.work_cgroup_in_ns("b").unwrap();
    let templates = rt.templates_cgroup_in_ns("b").unwrap();
    assert_eq!(work_b, PathBuf::from(format!("/proc/{anchor_b}/fd/3/work")));
    assert_eq!(templates, PathBuf::from(format!("/proc/{anchor_b}/fd/4")));
    let script = format!(
        "import os\n\
         print(sorted(os.listdir('{root}/workspace')))\n\
         for p in ('{work}', '{tpl}'):\n    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)\n    print(os.fstat(fd).st_ino)\n",
        root = root_b.display(),
        work = work_b.display(),
        tpl = templates.display(),
    );
    let (st, out, err) = tree.run("a", &["python3", "-c", &script]);
    assert_eq!(st, ExitStatus::Code(0), "{out}\n{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("['only-b']"));
    let ino = |p: PathBuf| fs::metadata(p).unwrap().ino().to_string();
    assert_eq!(
        lines.next(),
        Some(ino(rt.work_cgroup("b")).as_str()),
        "work cgroup of b"
    );
    assert_eq!(
        lines.next(),
        Some(ino(rt.templates_cgroup()).as_str()),
        "templates cgroup"
    );
}

#[test]
fn init_reaps_orphans() {
    let mut tree = Tree::new("rt-orphans");
    tree.add("a", &Limits::default());
    let (st, _, _) = tree.run("a", &["sh", "-c", "sleep 0.2 & exit 0"]);
    assert_eq!(st, ExitStatus::Code(0));
    // The orphaned `sleep 0.2` is init's child until it exits and init reaps it.
    let init = tree.rt().init_pid();
    let read_children = || {
        fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let reaped = wait_until(Duration::from_secs(10), || read_children().len() == 1);
    let children = read_children();
    assert!(
        reaped,
        "init's children 10 s after the orphan's exit: {children:?} (only the anchor expected)"
    );
    let state = fs::read_to_string(format!("/proc/{}/stat", children[0])).unwrap();
    assert!(!state.contains(") Z "), "zombie: {state}");
}

#[test]
fn shutdown_leaves_no_process_cgroup_or_mount() {
    let mut tree = Tree::new("rt-shutdown");
    tree.add("a", &Limits::default());
    let sp = tree
        .rt()
        .spawn("a", &request(&["sleep", "100"], "/"))
        .expect("spawn");
    let init = tree.rt().init_pid();
    let cgroup = tree.rt().sandbox_cgroup("a").parent().unwrap().to_owned();
    let run_dir = tree
        .rt()
        .view_mountpoint("a")
        .ancestors()
        .nth(3)
        .unwrap()
        .to_owned();
    // The daemon's order: remove the sandbox, unmount its view, shut down.
    tree.rt().remove_sandbox("a").expect("remove sandbox");
    let (_, view) = tree.views.pop().unwrap();
    view.unmount().expect("unmount view");
    tree.rt.take().unwrap().shutdown().expect("shutdown");
    assert!(
        !Path::new(&format!("/proc/{}", sp.host_pid)).exists(),
        "command survived"
    );
    assert!(
        !Path::new(&format!("/proc/{init}")).exists(),
        "init survived"
    );
    assert!(!cgroup.exists(), "{} left", cgroup.display());
    assert!(!run_dir.exists(), "{} left", run_dir.display());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let prefix = run_dir.to_string_lossy().into_owned();
    assert!(!mounts.contains(&prefix), "mounts left under {prefix}");
}

#[test]
fn default_base_is_idempotent_read_only_and_masks_secrets() {
    require_root();
    let scratch = std::env::temp_dir().join(unique("rt-base"));
    let mounts_under = |dir: &Path| {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(4)
                    .is_some_and(|p| Path::new(p).starts_with(dir))
            })
            .count()
    };
    struct Release(PathBuf, PathBuf);
    impl Drop for Release {
        fn drop(&mut self) {
            if rootfs::release_default_base(&self.0).is_ok() {
                let _ = fs::remove_dir_all(&self.1);
            }
        }
    }
    let base = rootfs::ensure_default_base(&scratch.join("base")).expect("first build");
    let _guard = Release(base.clone(), scratch.clone());
    let mounts = mounts_under(&base);
    assert!(mounts >= 2, "usr and etc binds expected, {mounts} mounts");
    assert_eq!(
        rootfs::ensure_default_base(&base).expect("second call"),
        base
    );
    assert_eq!(mounts_under(&base), mounts, "second call mounted again");
    let e = fs::write(base.join("usr/deltabox-probe"), b"x").expect_err("usr is read-only");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert_eq!(
        fs::metadata(base.join("etc/shadow")).unwrap().len(),
        0,
        "shadow masked"
    );
    assert!(fs::read_dir(base.join("root")).unwrap().next().is_none());
    assert!(
        fs::read_dir(base.join("workspace"))
            .unwrap()
            .next()
            .is_none()
    );
    rootfs::check_rootfs(&base).expect("the default base is a valid rootfs");

    let e = rootfs::check_rootfs(&scratch.join("missing")).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let file = scratch.join("file");
    fs::write(&file, b"").unwrap();
    let e = rootfs::check_rootfs(&file).unwrap_err();
    assert!(e.to_string().contains("is not a directory"), "{e}");
    let empty = scratch.join("empty");
    fs::create_dir_all(&empty).unwrap();
    let e = rootfs::check_rootfs(&empty).unwrap_err();
    assert!(e.to_string().contains("no executable /bin/sh"), "{e}");

    rootfs::release_default_base(&base).expect("release");
    assert_eq!(mounts_under(&base), 0, "mounts left after release");
}

#[test]
fn a_template_outlives_its_sandbox() {
    let mut tree = Tree::new("rt-template");
    tree.add("a", &Limits::default());
    let sp = tree
        .rt()
        .spawn("a", &request(&["sleep", "100"], "/"))
        .expect("spawn");
    // DeltaCR moves a template into the tree's templates/ cgroup; it keeps the sandbox's
    // v1 limit cgroups (if any) and must not stop the sandbox's removal.
    fs::write(
        tree.rt().templates_cgroup().join("cgroup.procs"),
        sp.host_pid.to_string(),
    )
    .expect("move to templates/");
    tree.rt()
        .remove_sandbox("a")
        .expect("remove sandbox with a template left");
    assert!(!tree.rt().sandbox_cgroup("a").exists(), "sb-a left");
    for dir in tree.rt().limit_cgroups("a") {
        assert!(!dir.exists(), "{} left", dir.display());
    }
    let stat = fs::read_to_string(format!("/proc/{}/stat", sp.host_pid)).expect("template alive");
    assert!(!stat.contains(") Z "), "template died: {stat}");
}

#[test]
fn concurrent_spawns_from_many_threads() {
    let mut tree = Tree::new("rt-concurrent");
    tree.add("a", &Limits::default());
    let rt = tree.rt();
    thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                s.spawn(move || {
                    for j in 0..5 {
                        let word = format!("t{i}-{j}");
                        let (st, out, _) = run_in(rt, "a", &["echo", &word], "/");
                        assert_eq!(st, ExitStatus::Code(0));
                        assert_eq!(out, format!("{word}\n"));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("spawning thread");
        }
    });
}

#[test]
fn a_restarted_daemon_adopts_the_tree() {
    let mut tree = Tree::new("rt-adopt");
    tree.add("a", &Limits::default());
    let init = tree.rt().init_pid();
    let anchor = tree.rt().anchor_ns_pid("a");
    let sp = tree
        .rt()
        .spawn("a", &request(&["sh", "-c", "sleep 0.5; exit 7"], "/"))
        .expect("spawn");
    // The daemon goes away; the command exits while nobody is connected.
    tree.rt.take().unwrap().detach();
    // Init reaps it (its /proc entry goes) with no daemon attached.
    assert!(
        wait_until(Duration::from_secs(10), || !Path::new(&format!(
            "/proc/{}",
            sp.host_pid
        ))
        .exists()),
        "pid {} not reaped 10 s after its exit was due",
        sp.host_pid
    );
    assert!(
        Path::new(&format!("/proc/{init}")).exists(),
        "init died with the daemon"
    );
    let rt = TreeRuntime::adopt(tree.cfg.clone()).expect("adopt");
    tree.rt = Some(rt);
    let rt = tree.rt();
    assert_eq!(rt.init_pid(), init);
    assert_eq!(rt.anchor_ns_pid("a"), anchor);
    assert_eq!(
        rt.wait_exit(sp.ns_pid, Some(Duration::from_secs(5)))
            .unwrap(),
        Some(ExitStatus::Code(7)),
        "the exit reaped while detached is delivered"
    );
    let (st, out, _) = tree.run("a", &["echo", "again"]);
    assert_eq!((st, out.as_str()), (ExitStatus::Code(0), "again\n"));
}
