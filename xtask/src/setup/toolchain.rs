//! The eBPF toolchain: the nightly's `rust-src` and `llvm-tools` components, and
//! `bpf-linker` built against the nightly's own libLLVM (DESIGN.md, "Building eBPF in Rust
//! here": no prebuilt bpf-linker and no Debian LLVM matches the nightly's LLVM).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::{Check, Failure, Outcome};
use crate::util::{output, raw_output, run_cmd, step};

/// The nightly components the eBPF build needs: `rust-src` for `-Z build-std=core`,
/// `llvm-tools` for the LLVM utilities aya's tooling uses.
const COMPONENTS: &[&str] = &["rust-src", "llvm-tools"];

const NIGHTLY_FIX: &str = "install rustup (https://rustup.rs), then `rustup toolchain install \
                           nightly --component rust-src,llvm-tools`";

/// Name of the file, in cargo's home, that records what bpf-linker was built against.
const STAMP_FILE: &str = "deltabox-bpf-linker.stamp";

pub fn ensure_components() -> Check {
    ensure_components_inner().map_err(|err| Failure::from_error(&err, NIGHTLY_FIX))
}

fn ensure_components_inner() -> Result<Outcome> {
    which::which("rustup").context("rustup is not on PATH")?;
    let mut installed = Vec::new();
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|line| line.starts_with("nightly-")) {
        step("rustup toolchain install nightly (a few minutes)");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        installed.push("nightly toolchain".to_owned());
    }
    let host = nightly_field("host")?;
    let list = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    let missing: Vec<&str> = COMPONENTS
        .iter()
        .copied()
        .filter(|component| !component_installed(&list, component, &host))
        .collect();
    if !missing.is_empty() {
        step(format!(
            "rustup component add {} --toolchain nightly",
            missing.join(" ")
        ));
        let mut add = Command::new("rustup");
        add.args(["component", "add"])
            .args(&missing)
            .args(["--toolchain", "nightly"]);
        run_cmd(&mut add)?;
        installed.extend(missing.iter().map(|c| (*c).to_owned()));
    }
    let version = output(Command::new("rustc").args(["+nightly", "--version"]))?;
    if installed.is_empty() {
        Ok(Outcome::Ok(format!(
            "{} on {}",
            COMPONENTS.join(", "),
            version.trim()
        )))
    } else {
        Ok(Outcome::Installed(format!(
            "{} on {}",
            installed.join(", "),
            version.trim()
        )))
    }
}

/// Whether `rustup component list --installed` output lists `component` (target-specific
/// components carry the host triple; `llvm-tools` was once `llvm-tools-preview`).
fn component_installed(list: &str, component: &str, host: &str) -> bool {
    list.lines().map(str::trim).any(|line| {
        line == component
            || line == format!("{component}-{host}")
            || line == format!("{component}-preview-{host}")
    })
}

/// A field of `rustc +nightly -vV` (`host`, `commit-hash`, `release`).
fn nightly_field(field: &str) -> Result<String> {
    let verbose = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    verbose
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(": "))
        .map(str::to_owned)
        .with_context(|| format!("`rustc +nightly -vV` prints no {field}"))
}

/// The nightly's libLLVM, as found in `$SYSROOT/lib`.
#[derive(Debug, PartialEq, Eq)]
struct LibLlvm {
    /// LLVM major version, from the file name.
    major: u32,
    /// `libLLVM-22-rust-1.97.0-nightly.so`.
    file_name: String,
}

impl LibLlvm {
    /// Parses `libLLVM-<N>-rust-<rust version>.so`.
    fn parse(file_name: &str) -> Option<Self> {
        let rest = file_name.strip_prefix("libLLVM-")?.strip_suffix(".so")?;
        let (major, tail) = rest.split_once('-')?;
        let major = major.parse().ok()?;
        tail.starts_with("rust-").then(|| Self {
            major,
            file_name: file_name.to_owned(),
        })
    }

    /// The one libLLVM in `lib_dir` (the newest major if there were several).
    fn find(lib_dir: &Path) -> Result<Self> {
        let entries =
            fs::read_dir(lib_dir).with_context(|| format!("cannot list {}", lib_dir.display()))?;
        let mut found: Vec<Self> = entries
            .filter_map(|entry| Self::parse(entry.ok()?.file_name().to_str()?))
            .collect();
        found.sort_by(|a, b| (a.major, &a.file_name).cmp(&(b.major, &b.file_name)));
        found.pop().with_context(|| {
            format!(
                "no libLLVM-<N>-rust-*.so in the nightly's {}",
                lib_dir.display()
            )
        })
    }

    /// The cargo feature of bpf-linker that selects this LLVM.
    fn feature(&self) -> String {
        format!("llvm-{}", self.major)
    }

    /// The name to link with: `-l dylib=LLVM-22-rust-1.97.0-nightly`.
    fn dylib(&self) -> &str {
        &self.file_name["lib".len()..self.file_name.len() - ".so".len()]
    }
}

/// What bpf-linker must have been built against, written to the stamp file after a build.
fn stamp_text(llvm: &LibLlvm, rustc_commit: &str) -> String {
    format!(
        "# written by `cargo xtask setup`: what bpf-linker was built against\n\
         rustc-nightly-commit={rustc_commit}\nlibllvm={}\nfeatures={},no-llvm-linking\n",
        llvm.file_name,
        llvm.feature()
    )
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

pub fn ensure_bpf_linker() -> Check {
    if which::which("bpf-linker").is_err()
        && let Ok(home) = cargo_home()
        && home.join("bin/bpf-linker").exists()
    {
        let bin = home.join("bin");
        return Err(Failure::new(
            format!(
                "{}/bpf-linker exists but {} is not on PATH",
                bin.display(),
                bin.display()
            ),
            format!("add {} to PATH (`. {}/env`)", bin.display(), home.display()),
        ));
    }
    ensure_bpf_linker_inner().map_err(|err| {
        Failure::from_error(
            &err,
            "see the cargo output above; the build needs network access to crates.io, the \
             nightly toolchain and a C compiler (gcc)",
        )
    })
}

fn ensure_bpf_linker_inner() -> Result<Outcome> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = LibLlvm::find(&lib_dir)?;
    let commit = nightly_field("commit-hash")?;
    let stamp_path = cargo_home()?.join(STAMP_FILE);
    let stamp = stamp_text(&llvm, &commit);

    let reason = match installed_linker(&lib_dir, &llvm)? {
        Ok(version) => match fs::read_to_string(&stamp_path) {
            Ok(recorded) if recorded == stamp => {
                return Ok(Outcome::Ok(format!("{version}, links {}", llvm.file_name)));
            }
            Ok(_) => format!(
                "it was built for another nightly (see {})",
                stamp_path.display()
            ),
            Err(_) => {
                // Built by hand against this nightly's libLLVM: adopt it.
                write_stamp(&stamp_path, &stamp)?;
                return Ok(Outcome::Ok(format!(
                    "{version}, links {} (recorded in {})",
                    llvm.file_name,
                    stamp_path.display()
                )));
            }
        },
        Err(reason) => reason,
    };

    let features = format!("{},no-llvm-linking", llvm.feature());
    step(format!(
        "building bpf-linker against {} with --features {features}, because {reason} (about a \
         minute)",
        llvm.file_name
    ));
    let lib = lib_dir
        .to_str()
        .context("the nightly's sysroot is not UTF-8")?;
    // DESIGN.md's RUSTFLAGS, passed as CARGO_ENCODED_RUSTFLAGS (0x1f-separated) so that a
    // sysroot path with spaces stays one argument.
    let rustflags = [
        "-L".to_owned(),
        lib.to_owned(),
        "-l".to_owned(),
        format!("dylib={}", llvm.dylib()),
        "-C".to_owned(),
        format!("link-arg=-Wl,-rpath,{lib}"),
    ]
    .join("\x1f");
    let mut install = Command::new("cargo");
    install
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
        ])
        .args(["--features", &features])
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTFLAGS")
        // Set by an outer cargo; they would pin the stable compiler under `+nightly`.
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN");
    run_cmd(&mut install)?;
    match installed_linker(&lib_dir, &llvm)? {
        Ok(version) => {
            write_stamp(&stamp_path, &stamp)?;
            Ok(Outcome::Installed(format!(
                "{version}, links {}",
                llvm.file_name
            )))
        }
        Err(reason) => bail!("bpf-linker was built but {reason}"),
    }
}

fn write_stamp(path: &Path, stamp: &str) -> Result<()> {
    fs::write(path, stamp).with_context(|| format!("cannot write {}", path.display()))
}

/// `Ok(version)` when an installed bpf-linker runs and links the libLLVM in `lib_dir`;
/// `Err(reason)` otherwise, saying why it must be (re)built.
fn installed_linker(lib_dir: &Path, llvm: &LibLlvm) -> Result<Result<String, String>> {
    let Ok(binary) = which::which("bpf-linker") else {
        return Ok(Err("it is not installed".to_owned()));
    };
    let version = raw_output(Command::new(&binary).arg("--version"))?;
    if !version.status.success() {
        return Ok(Err(format!(
            "`{} --version` fails: {}",
            binary.display(),
            String::from_utf8_lossy(&version.stderr).trim()
        )));
    }
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let ldd = output(Command::new("ldd").arg(&binary))?;
    let Some((name, path)) = linked_libllvm(&ldd) else {
        return Ok(Err("it does not link a libLLVM dynamically".to_owned()));
    };
    let Some(path) = path else {
        return Ok(Err(format!("it links {name}, which is gone")));
    };
    let dir = path.parent().and_then(|dir| dir.canonicalize().ok());
    if dir != lib_dir.canonicalize().ok() {
        return Ok(Err(format!(
            "it links {}, not the nightly's {}",
            path.display(),
            llvm.file_name
        )));
    }
    Ok(Ok(version))
}

/// The libLLVM line of `ldd` output: its soname and the path it resolves to (`None` when
/// "not found").
fn linked_libllvm(ldd: &str) -> Option<(String, Option<PathBuf>)> {
    ldd.lines().find_map(|line| {
        let (name, resolved) = line.trim().split_once(" => ")?;
        if !name.starts_with("libLLVM") {
            return None;
        }
        let path = resolved.split(" (").next()?.trim();
        let path = (path != "not found").then(|| PathBuf::from(path));
        Some((name.to_owned(), path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_nightly_libllvm_name() {
        let llvm = LibLlvm::parse("libLLVM-22-rust-1.97.0-nightly.so").unwrap();
        assert_eq!(llvm.major, 22);
        assert_eq!(llvm.feature(), "llvm-22");
        assert_eq!(llvm.dylib(), "LLVM-22-rust-1.97.0-nightly");
        assert_eq!(
            LibLlvm::parse("libLLVM-19-rust-1.84.0-nightly.so").map(|l| l.feature()),
            Some("llvm-19".to_owned())
        );
    }

    #[test]
    fn ignores_other_files_in_the_sysroot() {
        for name in [
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "librustc_driver-b5a965480ee51f9a.so",
            "libLLVM-22.so",
            "libLLVM-x-rust-1.97.0.so",
            "libLLVM-22-rust-1.97.0-nightly.so.1",
        ] {
            assert_eq!(LibLlvm::parse(name), None, "{name}");
        }
    }

    #[test]
    fn finds_the_newest_libllvm_in_a_directory() {
        let dir = std::env::temp_dir().join(format!("xtask-llvm-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for name in [
            "libLLVM-21-rust-1.90.0-nightly.so",
            "libLLVM-22-rust-1.97.0-nightly.so",
        ] {
            fs::write(dir.join(name), "").unwrap();
        }
        fs::write(dir.join("libLLVM.so.22.1-rust-1.97.0-nightly"), "").unwrap();
        let found = LibLlvm::find(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            found.unwrap().file_name,
            "libLLVM-22-rust-1.97.0-nightly.so"
        );
    }

    #[test]
    fn reads_the_libllvm_line_of_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007f787519e000)\n\
            \tlibLLVM.so.22.1-rust-1.97.0-nightly => /root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x00007f786a600000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f786a41e000)\n";
        let (name, path) = linked_libllvm(ldd).unwrap();
        assert_eq!(name, "libLLVM.so.22.1-rust-1.97.0-nightly");
        assert_eq!(
            path.unwrap(),
            Path::new(
                "/root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu/lib/libLLVM.so.22.1-rust-1.97.0-nightly"
            )
        );
        let gone = "\tlibLLVM.so.21.1-rust-1.90.0-nightly => not found\n";
        assert_eq!(
            linked_libllvm(gone),
            Some(("libLLVM.so.21.1-rust-1.90.0-nightly".to_owned(), None))
        );
        assert_eq!(
            linked_libllvm("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n"),
            None
        );
    }

    #[test]
    fn recognises_installed_components() {
        let list =
            "cargo-x86_64-unknown-linux-gnu\nllvm-tools-x86_64-unknown-linux-gnu\nrust-src\n";
        let host = "x86_64-unknown-linux-gnu";
        assert!(component_installed(list, "rust-src", host));
        assert!(component_installed(list, "llvm-tools", host));
        assert!(!component_installed(list, "rustfmt", host));
        assert!(component_installed(
            "llvm-tools-preview-x86_64-unknown-linux-gnu\n",
            "llvm-tools",
            host
        ));
        assert!(!component_installed("rust-src-extra\n", "rust-src", host));
    }

    #[test]
    fn the_stamp_names_what_the_linker_was_built_against() {
        let llvm = LibLlvm::parse("libLLVM-22-rust-1.97.0-nightly.so").unwrap();
        let stamp = stamp_text(&llvm, "e50aa6fba");
        assert!(stamp.contains("rustc-nightly-commit=e50aa6fba\n"));
        assert!(stamp.contains("libllvm=libLLVM-22-rust-1.97.0-nightly.so\n"));
        assert!(stamp.contains("features=llvm-22,no-llvm-linking\n"));
    }
}
