use std::collections::BTreeMap;

use super::*;
use crate::conformance::pjdfstest::{Run as PjdRun, Status, Summary};

fn pjd(cases: &[(&str, Status)]) -> PjdRun {
    let cases: BTreeMap<String, Status> = cases
        .iter()
        .map(|(name, status)| ((*name).to_owned(), status.clone()))
        .collect();
    let count = |f: fn(&Status) -> bool| cases.values().filter(|s| f(s)).count();
    PjdRun {
        summary: Summary {
            failed: count(|s| matches!(s, Status::Failed(_))),
            skipped: count(|s| matches!(s, Status::Skipped(_))),
            passed: count(Status::is_pass),
            expected_failures: 0,
            total: cases.len(),
        },
        cases,
        duration: Duration::from_millis(2100),
    }
}

fn ext4() -> PjdRun {
    pjd(&[
        ("chmod::ok", Status::Passed),
        ("link::ok", Status::Passed),
        ("rename::ctime", Status::Passed),
        ("unlink::erofs", Status::Skipped("no remount".to_owned())),
    ])
}

fn facts() -> Facts {
    Facts {
        date: "2026-11-22 10:00 UTC".to_owned(),
        kernel: "6.18.44".to_owned(),
        cpu: "AMD EPYC, 2 CPUs".to_owned(),
        memory: "24 GiB".to_owned(),
        root_fs: "ext4 on /dev/vda".to_owned(),
        commit: "f1c0585".to_owned(),
    }
}

fn report(targets: Vec<TargetReport>) -> Report {
    Report {
        command: "cargo xtask conformance".to_owned(),
        facts: facts(),
        versions: vec!["pjdfstest v0.2.2".to_owned(), "fsx v0.3.2".to_owned()],
        targets,
    }
}

fn fsx_ok(checkpoints: Option<fsx::Checkpoints>) -> fsx::Run {
    fsx::Run {
        ops: 100_000,
        seed: 1,
        duration: Duration::from_secs(20),
        failure: None,
        checkpoints,
    }
}

#[test]
fn regressions_are_ext4_passes_that_do_not_pass() {
    let deltafs = pjd(&[
        ("chmod::ok", Status::Passed),
        ("link::ok", Status::Failed("EXDEV".to_owned())),
        ("unlink::erofs", Status::Skipped("no remount".to_owned())),
    ]);
    assert_eq!(
        regressions(&ext4(), &deltafs),
        vec![
            Regression {
                name: "link::ok".to_owned(),
                status: "failed".to_owned(),
                detail: "EXDEV".to_owned()
            },
            Regression {
                name: "rename::ctime".to_owned(),
                status: "missing".to_owned(),
                detail: String::new()
            },
        ]
    );
    assert!(regressions(&ext4(), &ext4()).is_empty());
}

#[test]
fn deltafs_regressions_fail_the_verdict_and_overlayfs_ones_do_not() {
    let overlay = pjd(&[
        ("chmod::ok", Status::Passed),
        ("link::ok", Status::Passed),
        ("rename::ctime", Status::Failed("ctime".to_owned())),
    ]);
    let passing = report(vec![
        TargetReport {
            target: Target::Ext4,
            pjdfstest: Outcome::Ran(ext4()),
            fsx: Some(Outcome::Ran(fsx_ok(None))),
        },
        TargetReport {
            target: Target::Overlayfs,
            pjdfstest: Outcome::Ran(overlay),
            fsx: None,
        },
        TargetReport {
            target: Target::DeltaFs,
            pjdfstest: Outcome::Ran(ext4()),
            fsx: Some(Outcome::Ran(fsx_ok(Some(fsx::Checkpoints {
                interval: Duration::from_millis(100),
                freezes: vec![Duration::from_micros(300), Duration::from_micros(100)],
                switches: vec![Duration::from_micros(900)],
            })))),
        },
    ]);
    passing.verdict().unwrap();
    let text = passing.text();
    assert!(text.contains("pass on ext4, not on overlayfs:\n  rename::ctime (failed) ctime"));
    assert!(text.contains("2 (every 100 ms)"), "{text}");
    assert!(text.contains("0.30 ms / 0.30 ms"), "{text}");

    let mut failing = passing;
    failing.targets[2].pjdfstest = Outcome::Ran(pjd(&[
        ("chmod::ok", Status::Passed),
        ("link::ok", Status::Failed("EXDEV".to_owned())),
        ("rename::ctime", Status::Passed),
    ]));
    let err = failing.verdict().unwrap_err().to_string();
    assert_eq!(
        err,
        "1 pjdfstest cases pass on ext4 and not on deltafs: link::ok"
    );
    let md = failing.markdown();
    assert!(
        md.contains("### deltafs\n\n- `link::ok` failed: EXDEV\n"),
        "{md}"
    );
    assert!(md.contains("### overlayfs, for comparison (1 cases)"));
}

#[test]
fn targets_not_run_do_not_fail_and_are_said_not_run() {
    let why = "not available yet: no deltafs binary".to_owned();
    let r = report(vec![
        TargetReport {
            target: Target::Ext4,
            pjdfstest: Outcome::Ran(ext4()),
            fsx: None,
        },
        TargetReport {
            target: Target::DeltaFs,
            pjdfstest: Outcome::NotRun(why.clone()),
            fsx: Some(Outcome::NotRun(why.clone())),
        },
    ]);
    r.verdict().unwrap();
    assert_eq!(r.not_run(), vec![format!("deltafs: {why}")]);
    let text = r.text();
    assert!(
        text.contains("deltafs not run: not available yet"),
        "{text}"
    );
    let md = r.markdown();
    assert!(md.contains("| deltafs | not run: not available yet: no deltafs binary |"));
    assert!(md.contains("None known: pjdfstest did not run on DeltaFS"));
    assert!(!md.contains("None: every case"));
}

#[test]
fn a_case_only_skipped_on_deltafs_is_listed_but_does_not_fail() {
    let deltafs = pjd(&[
        ("chmod::ok", Status::Passed),
        ("link::ok", Status::Passed),
        (
            "rename::ctime",
            Status::Skipped("LINK_MAX unknown".to_owned()),
        ),
    ]);
    let r = report(vec![
        TargetReport {
            target: Target::Ext4,
            pjdfstest: Outcome::Ran(ext4()),
            fsx: None,
        },
        TargetReport {
            target: Target::DeltaFsDeep,
            pjdfstest: Outcome::Ran(deltafs),
            fsx: None,
        },
    ]);
    r.verdict().unwrap();
    assert!(r.text().contains(" 0 (+1 skipped)"), "{}", r.text());
    let md = r.markdown();
    assert!(md.contains("### deltafs-deep\n\n- `rename::ctime` skipped: LINK_MAX unknown\n"));
}

#[test]
fn errors_and_fsx_failures_fail_the_verdict() {
    let mut failed_fsx = fsx_ok(None);
    failed_fsx.failure = Some("miscompare: offset= 0x10".to_owned());
    let r = report(vec![
        TargetReport {
            target: Target::Ext4,
            pjdfstest: Outcome::Ran(ext4()),
            fsx: Some(Outcome::Ran(fsx_ok(None))),
        },
        TargetReport {
            target: Target::DeltaFs,
            pjdfstest: Outcome::Error("deltafs closed its stdout during mount".to_owned()),
            fsx: Some(Outcome::Ran(failed_fsx)),
        },
    ]);
    assert!(r.text().contains("FAILED (see below)"));
    assert!(
        r.text()
            .contains("fsx failed on deltafs: miscompare: offset= 0x10")
    );
    assert!(
        r.markdown()
            .contains("\nfsx failed on deltafs: miscompare: offset= 0x10\n")
    );
    assert_eq!(
        r.verdict().unwrap_err().to_string(),
        "pjdfstest on deltafs did not finish: deltafs closed its stdout during mount; fsx \
         failed on deltafs: miscompare: offset= 0x10"
    );
    let no_baseline = report(vec![TargetReport {
        target: Target::Ext4,
        pjdfstest: Outcome::Error("timeout".to_owned()),
        fsx: None,
    }]);
    assert!(no_baseline.verdict().is_err());
}
