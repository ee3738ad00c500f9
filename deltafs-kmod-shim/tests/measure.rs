//! Measurements behind the figures in `docs/deltafs.md`, printed, not asserted (timing
//! on a shared 2-vCPU machine is noisy). Run as root:
//!
//! ```text
//! cargo test -p deltafs --release --test measure -- --ignored --nocapture --test-threads 1
//! ```

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::Fixture;
use deltafs::FreezeOpts;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn settle() {
    // Let the kernel's RELEASEs of the files just closed reach the daemon.
    std::thread::sleep(Duration::from_millis(50));
}

/// Freeze and switch on a 10 000-file tree with 100 files changed per round.
#[test]
#[ignore = "measurement; run explicitly"]
fn freeze_and_switch_on_10k_files_100_changed() {
    require_root!();
    let fx = Fixture::new();
    let (view, m) = fx.live();
    for d in 0..100 {
        fs::create_dir(m.join(format!("d{d}"))).unwrap();
        for f in 0..100 {
            fs::write(m.join(format!("d{d}/f{f}")), b"0123456789").unwrap();
        }
    }
    settle();
    let base = view.freeze(&FreezeOpts::default()).unwrap();
    println!(
        "initial freeze of 10 000 new files: {:?}, {} metadata bytes",
        base.elapsed,
        fx.store().flush().unwrap()
    );
    let (mut freezes, mut switches, mut bytes, mut empty) = (vec![], vec![], vec![], vec![]);
    let mut by_pids = vec![];
    for round in 0..21 {
        for i in 0..100 {
            fs::write(
                m.join(format!("d{i}/f{}", round % 100)),
                format!("round {round}"),
            )
            .unwrap();
        }
        settle();
        // Same work, the caller naming the (no) processes that may map files: no probes.
        let pids = FreezeOpts {
            mapped: deltafs::MappedFiles::Pids(vec![]),
        };
        by_pids.push(view.freeze(&pids).unwrap().elapsed);
        view.switch(base.id).unwrap();
        for i in 0..100 {
            fs::write(
                m.join(format!("d{i}/f{}", round % 100)),
                format!("round {round}"),
            )
            .unwrap();
        }
        settle();
        fx.store().flush().unwrap();
        let report = view.freeze(&FreezeOpts::default()).unwrap();
        if round < 3 {
            println!("  round {round}: {report:?}");
        }
        freezes.push(report.elapsed);
        bytes.push(fx.store().flush().unwrap());
        let report = view.freeze(&FreezeOpts::default()).unwrap();
        empty.push((report.elapsed, fx.store().flush().unwrap()));
        let report = view.switch(base.id).unwrap();
        assert!(report.candidates >= 100, "{report:?}");
        switches.push(report.elapsed);
    }
    bytes.sort();
    println!(
        "freeze with 100 changed files: median {:?} (min {:?}, max {:?}), metadata bytes median {}",
        median(freezes.clone()),
        freezes.iter().min().unwrap(),
        freezes.iter().max().unwrap(),
        bytes[bytes.len() / 2]
    );
    println!(
        "same freeze, lease probes skipped (MappedFiles::Pids(vec![])): median {:?}",
        median(by_pids)
    );
    println!(
        "freeze with nothing changed: median {:?}, {} metadata bytes",
        median(empty.iter().map(|e| e.0).collect()),
        empty[0].1
    );
    println!(
        "switch back over 100 changed files: median {:?} (min {:?}, max {:?})",
        median(switches.clone()),
        switches.iter().min().unwrap(),
        switches.iter().max().unwrap()
    );
    view.unmount().unwrap();
}

/// Cold lookups (fresh mount, nothing in the kernel's caches) of 1 000 files when the
/// state is 1 layer deep and when it is 1 000 layers deep.
#[test]
#[ignore = "measurement; run explicitly"]
fn lookup_at_depth_1_and_1000() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("build", None);
    let m = view.mountpoint().to_owned();
    fs::create_dir(m.join("flat")).unwrap();
    fs::create_dir(m.join("deep")).unwrap();
    for i in 0..1000 {
        fs::write(m.join(format!("flat/f{i}")), b"x").unwrap();
    }
    let shallow = view.freeze(&FreezeOpts::default()).unwrap().id;
    for i in 0..1000 {
        fs::write(m.join(format!("deep/f{i}")), b"x").unwrap();
        settle_short();
        view.freeze(&FreezeOpts::default()).unwrap();
    }
    let deep = view.parent().unwrap();
    view.unmount().unwrap();
    let time = |from, dir: &str| {
        let mut runs = Vec::new();
        for run in 0..5 {
            let v = fx.mount(&format!("{dir}{run}"), Some(from));
            let start = Instant::now();
            for i in 0..1000 {
                fs::metadata(v.mountpoint().join(format!("{dir}/f{i}"))).unwrap();
            }
            runs.push(start.elapsed());
            v.unmount().unwrap();
        }
        median(runs)
    };
    let t1 = time(shallow, "flat");
    let t1000 = time(deep, "deep");
    println!(
        "1 000 cold stats: depth 1 {t1:?}, depth 1 000 {t1000:?}, ratio {:.2}",
        t1000.as_secs_f64() / t1.as_secs_f64()
    );
}

fn settle_short() {
    std::thread::sleep(Duration::from_millis(1));
}

/// Sequential write and read of 512 MiB through passthrough, and reading a frozen file
/// (daemon-served), next to the store's filesystem itself.
#[test]
#[ignore = "measurement; run explicitly"]
fn sequential_io() {
    require_root!();
    const SIZE: usize = 512 << 20;
    let fx = Fixture::new();
    let view = fx.mount("live", None);
    let chunk = vec![0x5au8; 1 << 20];
    let rate = |d: Duration| SIZE as f64 / (1 << 20) as f64 / d.as_secs_f64();
    let write = |path: &std::path::Path| {
        let start = Instant::now();
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        for _ in 0..SIZE / chunk.len() {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
        start.elapsed()
    };
    let read = |path: &std::path::Path| {
        drop_caches();
        let start = Instant::now();
        let mut f = File::open(path).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, SIZE);
        start.elapsed()
    };
    let raw = fx.store_dir().join("raw.bin");
    let (w_raw, r_raw) = (write(&raw), read(&raw));
    let file = view.mountpoint().join("data.bin");
    let (w_pt, r_pt) = (write(&file), read(&file));
    settle();
    view.freeze(&FreezeOpts::default()).unwrap();
    let r_frozen = read(&file);
    fs::remove_file(&raw).unwrap();
    println!(
        "{} MiB sequential: store fs write {:.0} MiB/s read {:.0}; DeltaFS passthrough write \
         {:.0} ({:.2}x) read {:.0} ({:.2}x); frozen file (daemon-served) read {:.0} ({:.2}x)",
        SIZE >> 20,
        rate(w_raw),
        rate(r_raw),
        rate(w_pt),
        w_raw.as_secs_f64() / w_pt.as_secs_f64(),
        rate(r_pt),
        r_raw.as_secs_f64() / r_pt.as_secs_f64(),
        rate(r_frozen),
        r_raw.as_secs_f64() / r_frozen.as_secs_f64(),
    );
    view.unmount().unwrap();
}

fn drop_caches() {
    nix::unistd::sync();
    let _ = fs::write("/proc/sys/vm/drop_caches", b"3");
}

/// The metadata-heavy steps of `cargo xtask bench fs` on their own: `tar -x` of a tree
/// (`DELTAFS_MEASURE_TREE`, default the CPython standard library the bench uses, else
/// `/usr/include`), then `find -exec stat` over it, on the store's filesystem directly
/// and on a DeltaFS view (store on that filesystem), with the FUSE requests per file
/// that reached the daemon for each step (`Store::stats`).
#[test]
#[ignore = "measurement; run explicitly"]
fn untar_and_find_round_trips() {
    require_root!();
    let tree = std::env::var_os("DELTAFS_MEASURE_TREE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let out = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
                ])
                .output()
                .ok()?;
            let path = std::path::PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
            path.is_dir().then_some(path)
        })
        .unwrap_or_else(|| "/usr/include".into());
    let fx = Fixture::new();
    let run = |cmd: &mut std::process::Command| {
        let start = Instant::now();
        let status = cmd.stdout(std::process::Stdio::null()).status().unwrap();
        assert!(status.success(), "{cmd:?} failed");
        start.elapsed()
    };
    let tarball = fx.store_dir().join("tree.tar");
    let parent = tree.parent().unwrap();
    let top = tree.file_name().unwrap();
    run(std::process::Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("--exclude=site-packages")
        .arg("-C")
        .arg(parent)
        .arg(top));
    let files = String::from_utf8(
        std::process::Command::new("tar")
            .arg("-tf")
            .arg(&tarball)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .lines()
    .count();
    let steps = |dir: &std::path::Path| {
        nix::unistd::sync();
        let untar = run(std::process::Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir));
        let after_untar = fx.store().stats();
        nix::unistd::sync();
        let find = run(std::process::Command::new("find").arg(dir).args([
            "-exec",
            "stat",
            "--format=%s",
            "{}",
            "+",
        ]));
        (untar, find, after_untar, fx.store().stats())
    };
    let raw = fx.store_dir().join("raw");
    fs::create_dir(&raw).unwrap();
    let (raw_untar, raw_find, ..) = steps(&raw);
    let view = fx.mount("live", None);
    let before = fx.store().stats();
    let (untar, find, after_untar, after_find) = steps(view.mountpoint());
    let per_file = |from: &deltafs::StatsSnapshot, to: &deltafs::StatsSnapshot| {
        let mut total = 0;
        let kinds: Vec<String> = to
            .ops
            .iter()
            .zip(&from.ops)
            .filter(|(t, f)| t.count > f.count)
            .map(|(t, f)| {
                total += t.count - f.count;
                format!(
                    "{} {:.2}",
                    t.kind.as_str(),
                    (t.count - f.count) as f64 / files as f64
                )
            })
            .collect();
        format!("{:.2} ({})", total as f64 / files as f64, kinds.join(", "))
    };
    println!(
        "{files} entries of {}: untar: store fs {raw_untar:?}, DeltaFS {untar:?} ({:.2}x), \
         requests per entry {}; find + stat: store fs {raw_find:?}, DeltaFS {find:?} \
         ({:.2}x), requests per entry {}",
        tree.display(),
        untar.as_secs_f64() / raw_untar.as_secs_f64(),
        per_file(&before, &after_untar),
        find.as_secs_f64() / raw_find.as_secs_f64(),
        per_file(&after_untar, &after_find),
    );
    view.unmount().unwrap();
}

/// What the freeze's write-back of daemon-served files costs: freezes with one file kept
/// live (so cloned) each time, opened for writing (1) passthrough, (2) daemon-served
/// (copied up under an open reader) and mapped, nothing dirty, (3) the same with one page
/// dirtied through the mapping before each freeze. (2) and (3) call `syncfs` on the mount.
#[test]
#[ignore = "measurement; run explicitly"]
fn freeze_with_a_daemon_served_mapping() {
    use std::os::unix::fs::FileExt;
    require_root!();
    let fx = Fixture::new();
    let (view, m) = fx.live();
    let rounds = |label: &str, dirty: &mut dyn FnMut(usize)| {
        let mut times = Vec::new();
        for round in 0..21 {
            dirty(round);
            times.push(view.freeze(&FreezeOpts::default()).unwrap().elapsed);
        }
        let max = times.iter().max().copied().unwrap();
        println!("{label}: median {:?}, max {max:?}", median(times));
    };

    let plain = common::create_rw(&m.join("plain"));
    plain.write_all_at(&[1u8; 4096], 0).unwrap();
    rounds("passthrough writer open", &mut |_| {});
    drop(plain);

    let (reader, writer) = common::daemon_served(&view, &m.join("shared"), &[0u8; 4096]);
    let mut map = common::mmap::SharedMap::new(&writer, 4096);
    rounds("daemon-served writer, mapped, clean", &mut |_| {});
    rounds("daemon-served writer, one dirty page", &mut |round| {
        map.write(0, &[round as u8; 8])
    });
    drop((map, writer, reader));
    view.unmount().unwrap();
}

/// A 1-byte write into a frozen 1 GiB file (real data, no holes) on each kind of store:
/// the xfs store (reflink), a plain ext4 store with chunk-granular copy-up (the default),
/// and the same plain store copying whole files (the behaviour before chunking). Prints
/// the time of `open(O_WRONLY)` + `pwrite` of 1 byte + `close`, the bytes the copy-up
/// stats count, and how much the store's filesystem grew.
#[test]
#[ignore = "measurement; run explicitly"]
fn one_byte_write_into_a_frozen_gib_per_store_kind() {
    require_root!();
    use std::os::unix::fs::FileExt;
    let whole = deltafs::ChunkPolicy {
        min_size: u64::MAX,
        ..deltafs::ChunkPolicy::default()
    };
    let kinds: [(&str, Option<deltafs::ChunkPolicy>); 3] = [
        ("xfs, reflink", None),
        ("ext4, chunked", Some(deltafs::ChunkPolicy::default())),
        ("ext4, whole copy", Some(whole)),
    ];
    for (name, plain) in kinds {
        let fx = match plain {
            Some(policy) => Fixture::plain(policy),
            None => Fixture::new(),
        };
        if plain.is_none() && !fx.store().reflink() {
            println!("{name}: no reflink store here, skipped");
            continue;
        }
        let (view, m) = fx.live();
        let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut f = File::create(m.join("gib")).unwrap();
        for _ in 0..1024 {
            f.write_all(&block).unwrap();
        }
        drop(f);
        settle();
        while view.freeze(&FreezeOpts::default()).unwrap().kept_live > 0 {
            settle();
        }
        fx.store().flush().unwrap();
        nix::unistd::sync();
        // Free space of the store's filesystem (st_blocks counts reflinked extents in
        // every file that shares them).
        let used = || {
            let st = nix::sys::statvfs::statvfs(fx.store_dir()).unwrap();
            (st.blocks() - st.blocks_free()) * st.fragment_size()
        };
        let (before, disk) = (fx.store().stats(), used());
        let start = Instant::now();
        let f = OpenOptions::new().write(true).open(m.join("gib")).unwrap();
        f.write_all_at(b"!", 700_000_001).unwrap();
        drop(f);
        let elapsed = start.elapsed();
        nix::unistd::sync();
        let after = fx.store().stats();
        println!(
            "{name}: 1-byte write into a frozen 1 GiB file: {elapsed:?}, copy-up bytes {}, \
             store's filesystem grew {} KiB",
            after.copy_up_bytes - before.copy_up_bytes,
            used().saturating_sub(disk) >> 10
        );
        view.unmount().unwrap();
    }
}
