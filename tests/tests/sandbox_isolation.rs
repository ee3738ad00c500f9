//! Isolation of sandboxes on the real kernel: no network but loopback, no host home
//! directories, pids and memory limits that stop a fork bomb and a memory hog inside
//! the sandbox while another tree keeps working, no mounting (no CAP_SYS_ADMIN), and of
//! the host's sysfs only the transparent huge page settings, read-only.
//! Needs root, cgroup v2 (and the v1 limit hierarchies on this host), FUSE, the store.

use std::fs;

use deltabox_controller::sandbox::runtime::{ExitStatus, Limits};
use deltabox_tests::tree::Tree;

#[test]
fn only_loopback_network() {
    let mut tree = Tree::new("iso-net");
    tree.add("a", &Limits::default());
    let script = "import socket\n\
        print(sorted(n for _, n in socket.if_nameindex()))\n\
        for addr in (('1.1.1.1', 53), ('10.0.2.2', 80), ('192.168.0.1', 80)):\n\
        \x20   s = socket.socket(); s.settimeout(2)\n\
        \x20   try:\n\
        \x20       s.connect(addr); print('connected', addr)\n\
        \x20   except OSError as e:\n\
        \x20       print('refused', e.errno)\n\
        srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)\n\
        c = socket.create_connection(srv.getsockname(), timeout=2)\n\
        conn, _ = srv.accept(); c.sendall(b'ping'); print(conn.recv(4).decode())\n";
    let (st, out, err) = tree.run("a", &["python3", "-c", script]);
    assert_eq!(st, ExitStatus::Code(0), "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "['lo']", "interfaces: {out}");
    assert_eq!(
        &lines[1..4],
        ["refused 101"; 3],
        "non-loopback connects: {out}"
    );
    assert_eq!(lines[4], "ping", "loopback server + client: {out}");
}

#[test]
fn host_homes_are_not_visible() {
    let mut tree = Tree::new("iso-home");
    tree.add("a", &Limits::default());
    let home_entries: Vec<String> = fs::read_dir("/home")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut script = String::from("ls -A /root /home; test -e /work && echo WORK; ");
    for name in &home_entries {
        script.push_str(&format!("test -e /home/{name} && echo LEAK-{name}; "));
    }
    script.push_str("true");
    let (st, out, err) = tree.run("a", &["sh", "-c", &script]);
    assert_eq!(st, ExitStatus::Code(0), "{err}");
    assert_eq!(out, "/home:\n\n/root:\n", "host homes show through: {out}");
}

#[test]
fn sys_shows_only_the_huge_page_settings_read_only() {
    let mut tree = Tree::new("iso-sys");
    tree.add("a", &Limits::default());
    let thp = "/sys/kernel/mm/transparent_hugepage";
    let host_mode = fs::read_to_string(format!("{thp}/enabled")).expect("host THP settings");
    let script = format!(
        "find /sys -maxdepth 3 -type d | sort; cat {thp}/enabled; \
         echo never > {thp}/enabled && echo WROTE; touch /sys/x && echo TOUCHED; true"
    );
    let (st, out, err) = tree.run("a", &["sh", "-c", &script]);
    assert_eq!(st, ExitStatus::Code(0), "{err}");
    assert_eq!(
        out,
        format!("/sys\n/sys/kernel\n/sys/kernel/mm\n{thp}\n{host_mode}"),
        "the sandbox's /sys: {out}"
    );
    assert_eq!(err.matches("Read-only file system").count(), 2, "{err}");
    assert_eq!(
        fs::read_to_string(format!("{thp}/enabled")).unwrap(),
        host_mode,
        "the sandbox changed the host's THP mode"
    );
}

#[test]
fn cannot_mount_without_cap_sys_admin() {
    let mut tree = Tree::new("iso-mount");
    tree.add("a", &Limits::default());
    let (st, out, err) = tree.run("a", &["mount", "-t", "tmpfs", "none", "/mnt"]);
    assert_ne!(st, ExitStatus::Code(0), "mount succeeded: {out}");
    assert!(
        err.to_lowercase().contains("permission denied") || err.contains("must be superuser"),
        "{err}"
    );
    let (_, out, _) = tree.run("a", &["grep", "CapEff", "/proc/self/status"]);
    let caps = u64::from_str_radix(out.split_whitespace().nth(1).unwrap(), 16).unwrap();
    assert_eq!(caps & (1 << 21), 0, "CAP_SYS_ADMIN kept: {caps:x}");
    assert_eq!(caps & (1 << 19), 0, "CAP_SYS_PTRACE kept: {caps:x}");
}

#[test]
fn fork_bomb_and_memory_hog_are_stopped_inside() {
    let mut tree = Tree::new("iso-limits");
    tree.add(
        "a",
        &Limits {
            memory_bytes: Some(64 << 20),
            cpus: Some(1.0),
            pids: Some(64),
        },
    );
    let mut other = Tree::new("iso-other");
    other.add("b", &Limits::default());

    // Fork bomb: python forks sleepers (stdio closed, so the output ends when python
    // does) until fork fails; pids.max stops it below 64.
    let bomb = "import os, time\n\
        n = 0\n\
        while n < 1000:\n\
        \x20   try:\n\
        \x20       pid = os.fork()\n\
        \x20   except OSError as e:\n\
        \x20       print('stopped', n, e.errno); break\n\
        \x20   if pid == 0:\n\
        \x20       os.closerange(0, 3); time.sleep(60); os._exit(0)\n\
        \x20   n += 1\n";
    let (st, out, err) = tree.run("a", &["python3", "-c", bomb]);
    assert_eq!(st, ExitStatus::Code(0), "{out}\n{err}");
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        words.first(),
        Some(&"stopped"),
        "fork bomb was not stopped: {out}"
    );
    let forked: u32 = words[1].parse().unwrap();
    assert!(
        forked < 64 && forked > 10,
        "forked {forked} with pids.max 64"
    );
    assert_eq!(words[2], "11", "fork failed with EAGAIN");
    // Meanwhile another tree works, and so does this test process.
    assert_eq!(other.run("b", &["echo", "alive"]).1, "alive\n");
    tree.rt().kill_work("a").expect("kill the sleepers");

    // Memory hog: 512 MiB written under a 64 MiB limit without swap: OOM-killed.
    let (st, out, err) = tree.run(
        "a",
        &[
            "python3",
            "-c",
            "b = bytearray(b'x') * (512 << 20); print(len(b))",
        ],
    );
    assert_eq!(
        st,
        ExitStatus::Signal(9),
        "memory hog not OOM-killed: {out}\n{err}"
    );
    assert_eq!(other.run("b", &["echo", "alive"]).1, "alive\n");
    // The sandbox itself still works after its OOM kill.
    assert_eq!(tree.run("a", &["echo", "still"]).1, "still\n");
}

#[test]
fn cpu_quota_caps_a_busy_loop() {
    let mut tree = Tree::new("iso-cpu");
    tree.add(
        "a",
        &Limits {
            cpus: Some(0.2),
            ..Limits::default()
        },
    );
    // Two spinning processes for 1.5 s of wall time: without the quota they would use
    // up to 3 s of CPU on this 2-vCPU machine; with 0.2 CPU about 0.3 s.
    let script = "import os, time\n\
        pid = os.fork()\n\
        end = time.monotonic() + 1.5\n\
        while time.monotonic() < end:\n\
        \x20   pass\n\
        if pid == 0:\n\
        \x20   os._exit(0)\n\
        os.waitpid(pid, 0)\n\
        t = os.times()\n\
        print(t.user + t.system + t.children_user + t.children_system)\n";
    let (st, out, err) = tree.run("a", &["python3", "-c", script]);
    assert_eq!(st, ExitStatus::Code(0), "{out}\n{err}");
    let cpu: f64 = out.trim().parse().expect("cpu seconds");
    assert!(cpu < 0.6, "{cpu} s of CPU in 1.5 s with cpus = 0.2");
    assert!(cpu > 0.05, "{cpu} s of CPU: did it run at all?");
}
