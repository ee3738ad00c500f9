//! pjdfstest (the Rust rewrite of the POSIX file system test suite): its configuration
//! file, one run in a directory, and the parsing of its output into per-case results.
//!
//! Output (colours off with `NO_COLOR`): one line per case, `<name> <status>`, the status
//! being `ok`, `FAILED`, `skipped`, `failed as expected` or `PASSED UNEXPECTEDLY`; the
//! reasons of a skip and the panic message of a failure follow on lines indented with a
//! tab; then `Summary: F failed, S skipped, P passed, E expected failures, T total`.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::unistd::{Group, User};

use crate::util::{display, output_with_timeout};

/// The Linux features of `pjdfstest -l` that ext4 has: enabling them runs the cases that
/// need them (with only `posix_fallocate`, ext4 passes 356 and skips 42; with all four it
/// passes 383 and skips 15).
const FEATURES: &[&str] = &["posix_fallocate", "rename_ctime", "utime_now", "utimensat"];

/// Longer than the timestamp granularity of every target (pjdfstest sleeps this long
/// between two changes whose timestamps must differ).
const NAPTIME: &str = "0.02";

/// How long one whole run may take (about 3 s on ext4 here).
const TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// One case's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Passed,
    /// With the panic message.
    Failed(String),
    /// With the reasons.
    Skipped(String),
    ExpectedFailure,
    UnexpectedPass,
}

impl Status {
    pub fn is_pass(&self) -> bool {
        matches!(self, Status::Passed)
    }

    pub fn word(&self) -> &'static str {
        match self {
            Status::Passed => "passed",
            Status::Failed(_) => "failed",
            Status::Skipped(_) => "skipped",
            Status::ExpectedFailure => "failed as expected",
            Status::UnexpectedPass => "passed unexpectedly",
        }
    }

    /// The failure message or skip reasons.
    pub fn detail(&self) -> &str {
        match self {
            Status::Failed(detail) | Status::Skipped(detail) => detail,
            _ => "",
        }
    }
}

/// pjdfstest's own summary line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub failed: usize,
    pub skipped: usize,
    pub passed: usize,
    pub expected_failures: usize,
    pub total: usize,
}

/// One run: every case by name, and the summary.
#[derive(Clone, Debug)]
pub struct Run {
    pub cases: BTreeMap<String, Status>,
    pub summary: Summary,
    pub duration: Duration,
}

/// The two existing (user, group) pairs pjdfstest switches to: `nobody` with `nogroup` (or
/// `nobody`), and `daemon` with `daemon`.
fn dummy_users() -> Result<[(String, String); 2]> {
    let exists = |user: &str| User::from_name(user).ok().flatten().is_some();
    let group_exists = |group: &str| Group::from_name(group).ok().flatten().is_some();
    let nobody_group = ["nogroup", "nobody"]
        .into_iter()
        .find(|group| group_exists(group))
        .context("neither group nogroup nor group nobody exists (pjdfstest needs one)")?;
    for user in ["nobody", "daemon"] {
        if !exists(user) {
            bail!("user {user} does not exist (pjdfstest switches to it)");
        }
    }
    if !group_exists("daemon") {
        bail!("group daemon does not exist (pjdfstest switches to it)");
    }
    Ok([
        ("nobody".to_owned(), nobody_group.to_owned()),
        ("daemon".to_owned(), "daemon".to_owned()),
    ])
}

/// The configuration file's text.
pub fn config_text() -> Result<String> {
    let users = dummy_users()?;
    let features: String = FEATURES
        .iter()
        .map(|feature| format!("{feature} = {{}}\n"))
        .collect();
    Ok(format!(
        "# written by `cargo xtask conformance`\n[features]\n{features}\n[settings]\n\
         naptime = {NAPTIME}\nallow_remount = false\n\n[dummy_auth]\n\
         entries = [[\"{}\", \"{}\"], [\"{}\", \"{}\"]]\n",
        users[0].0, users[0].1, users[1].0, users[1].1
    ))
}

/// Runs pjdfstest with `config` in `dir` and parses what it printed; `log` gets the whole
/// output.
pub fn run(config: &Path, dir: &Path, log: &Path) -> Result<Run> {
    let binary =
        which::which("pjdfstest").context("pjdfstest is not on PATH: run `cargo xtask setup`")?;
    let mut cmd = Command::new(binary);
    cmd.arg("-c")
        .arg(config)
        .arg("-p")
        .arg(dir)
        .env("NO_COLOR", "1")
        .env_remove("CLICOLOR_FORCE")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    let start = Instant::now();
    let out = output_with_timeout(&mut cmd, TIMEOUT)?;
    let duration = start.elapsed();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    fs::write(log, &text).with_context(|| format!("cannot write {}", log.display()))?;
    let (cases, summary) = parse(&text).with_context(|| {
        format!(
            "`{}` exited with {} (its output: {})",
            display(&cmd),
            out.status,
            log.display()
        )
    })?;
    Ok(Run {
        cases,
        summary,
        duration,
    })
}

/// Parses a run's output into its cases and summary, and checks that they agree.
pub fn parse(text: &str) -> Result<(BTreeMap<String, Status>, Summary)> {
    let mut cases: BTreeMap<String, Status> = BTreeMap::new();
    let mut last: Option<String> = None;
    let mut summary = None;
    for raw in text.lines() {
        let line = strip_ansi(raw);
        if let Some(detail) = line.strip_prefix('\t') {
            // A skip reason or a failure message of the case above.
            if let Some(Status::Failed(text) | Status::Skipped(text)) =
                last.as_ref().and_then(|name| cases.get_mut(name))
            {
                if !text.is_empty() {
                    text.push_str("; ");
                }
                text.push_str(detail.trim());
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("Summary:") {
            summary = Some(parse_summary(rest)?);
            continue;
        }
        if let Some((name, status)) = parse_case(&line) {
            if cases.insert(name.clone(), status).is_some() {
                bail!("pjdfstest reported case {name} twice");
            }
            last = Some(name);
        } else {
            // Backtraces and anything else: they belong to no case.
            last = None;
        }
    }
    let summary = summary.context("pjdfstest printed no `Summary:` line")?;
    let count = |f: fn(&Status) -> bool| cases.values().filter(|s| f(s)).count();
    let counted = Summary {
        failed: count(|s| matches!(s, Status::Failed(_) | Status::UnexpectedPass)),
        skipped: count(|s| matches!(s, Status::Skipped(_))),
        passed: count(Status::is_pass),
        expected_failures: count(|s| matches!(s, Status::ExpectedFailure)),
        total: cases.len(),
    };
    if counted != summary {
        bail!("pjdfstest's summary {summary:?} does not match its case lines {counted:?}");
    }
    Ok((cases, summary))
}

/// `chmod::errno::eperm   ok` → the name and its status.
fn parse_case(line: &str) -> Option<(String, Status)> {
    let line = line.trim_end();
    let statuses = [
        ("PASSED UNEXPECTEDLY", Status::UnexpectedPass),
        ("failed as expected", Status::ExpectedFailure),
        ("FAILED", Status::Failed(String::new())),
        ("skipped", Status::Skipped(String::new())),
        ("ok", Status::Passed),
    ];
    statuses.iter().find_map(|(word, status)| {
        let name = line.strip_suffix(word)?;
        // The name is padded with spaces up to the status; names have none of their own.
        if !name.ends_with(' ') {
            return None;
        }
        let name = name.trim();
        (!name.is_empty() && !name.contains(char::is_whitespace))
            .then(|| (name.to_owned(), status.clone()))
    })
}

/// ` 0 failed, 42 skipped, 356 passed, 0 expected failures, 398 total`.
fn parse_summary(text: &str) -> Result<Summary> {
    let mut summary = Summary::default();
    for part in text.split(',') {
        let part = part.trim();
        let (number, label) = part
            .split_once(' ')
            .with_context(|| format!("cannot read `{part}` in pjdfstest's summary"))?;
        let number: usize = number
            .parse()
            .with_context(|| format!("cannot read `{part}` in pjdfstest's summary"))?;
        match label {
            "failed" => summary.failed = number,
            "skipped" => summary.skipped = number,
            "passed" => summary.passed = number,
            "expected failures" => summary.expected_failures = number,
            "total" => summary.total = number,
            _ => bail!("unknown count `{part}` in pjdfstest's summary"),
        }
    }
    Ok(summary)
}

/// Removes ANSI colour sequences (`ESC [ … m`), in case colours were forced on.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
chmod::errno::eperm                                                           ok
unlink::erofs_named                                                      skipped
\tRemounts (allow_remount) are not allowed in the configuration file
rename::changed_ctime_success::dir                                       skipped
\trequires features: rename_ctime
utimensat::y2038                                                          FAILED
\tassertion `left == right` failed
\t  left: 0
\t right: 2147483648
Backtrace:
   0: std::backtrace::Backtrace::capture
link::ok                                                                      ok
utimensat::nanoseconds                                              failed as expected
open::trunc                                                  PASSED UNEXPECTEDLY

Summary: 2 failed, 2 skipped, 2 passed, 1 expected failures, 7 total
";

    #[test]
    fn parses_cases_details_and_summary() {
        let (cases, summary) = parse(OUTPUT).unwrap();
        assert_eq!(
            summary,
            Summary {
                failed: 2,
                skipped: 2,
                passed: 2,
                expected_failures: 1,
                total: 7
            }
        );
        assert_eq!(cases["chmod::errno::eperm"], Status::Passed);
        assert_eq!(cases["link::ok"], Status::Passed);
        assert_eq!(
            cases["unlink::erofs_named"],
            Status::Skipped(
                "Remounts (allow_remount) are not allowed in the configuration file".to_owned()
            )
        );
        assert_eq!(
            cases["utimensat::y2038"],
            Status::Failed(
                "assertion `left == right` failed; left: 0; right: 2147483648".to_owned()
            )
        );
        assert_eq!(cases["utimensat::nanoseconds"], Status::ExpectedFailure);
        assert_eq!(cases["open::trunc"], Status::UnexpectedPass);
    }

    #[test]
    fn strips_colours() {
        let coloured = "\u{1b}[34mchmod::errno::eperm\u{1b}[0m                                  \
                        \u{1b}[32mok\u{1b}[0m\n\n\u{1b}[1;32mSummary\u{1b}[0m: 0 failed, 0 \
                        skipped, 1 passed, 0 expected failures, 1 total\n";
        let (cases, summary) = parse(coloured).unwrap();
        assert_eq!(cases["chmod::errno::eperm"], Status::Passed);
        assert_eq!(summary.passed, 1);
    }

    #[test]
    fn a_run_without_summary_or_with_a_wrong_one_is_an_error() {
        let cut = OUTPUT.split("\nSummary").next().unwrap();
        assert!(
            parse(cut)
                .unwrap_err()
                .to_string()
                .contains("no `Summary:`")
        );
        let wrong = OUTPUT.replace("2 passed", "3 passed");
        assert!(
            parse(&wrong)
                .unwrap_err()
                .to_string()
                .contains("does not match")
        );
    }

    #[test]
    fn a_line_that_only_ends_like_a_status_is_no_case() {
        assert_eq!(parse_case("ok"), None);
        assert_eq!(parse_case("   0: something::looks_ok"), None);
        assert_eq!(parse_case("all went ok"), None);
        assert_eq!(
            parse_case("mkdir::ok   ok"),
            Some(("mkdir::ok".to_owned(), Status::Passed))
        );
    }

    #[test]
    fn the_config_names_two_users_and_the_features() {
        let text = config_text().unwrap();
        assert!(text.contains("naptime = 0.02\n"));
        assert!(text.contains("[\"daemon\", \"daemon\"]"));
        assert!(text.contains("[\"nobody\", \"no"));
        for feature in FEATURES {
            assert!(text.contains(&format!("{feature} = {{}}\n")));
        }
    }
}
