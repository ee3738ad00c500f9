//! The Python SDK's gate (`sdk/python/`): a virtualenv under `target/sdk-venv`, made
//! once and reused, with the package installed editable with its `test` extra
//! (reinstalled only when `pyproject.toml` changes), then ruff (lint and format) and
//! `mypy --strict` on the package, its tests and examples, then pytest — the unit tests and
//! the tests marked `daemon`, which start their own `deltaboxd` from the binaries
//! given — and the examples in their short mode (run by the suite itself).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::util::{output, run_cmd, step, target_dir, workspace_root};

/// The Python that makes the virtualenv (`$DELTABOX_PYTHON`, else `python3` on `PATH`).
fn host_python() -> String {
    std::env::var("DELTABOX_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// The SDK's directory in the workspace.
fn sdk_dir() -> PathBuf {
    workspace_root().join("sdk").join("python")
}

/// Makes `venv` unless it already has a Python; installs the SDK unless the stamp says
/// this `pyproject.toml` is installed already.
fn ensure_venv(venv: &Path) -> Result<PathBuf> {
    let python = venv.join("bin").join("python");
    if !python.exists() {
        let host = host_python();
        let version = output(
            Command::new(&host).args(["-c", "import sys; print(sys.version_info >= (3, 10))"]),
        )
        .with_context(|| format!("cannot run {host} (set DELTABOX_PYTHON to a Python 3.10+)"))?;
        if version.trim() != "True" {
            bail!("{host} is older than 3.10, which the SDK needs (set DELTABOX_PYTHON)");
        }
        step(format!("creating the SDK's virtualenv {}", venv.display()));
        run_cmd(Command::new(&host).args(["-m", "venv"]).arg(venv))?;
    }
    let pyproject = sdk_dir().join("pyproject.toml");
    let wanted = fs::read_to_string(&pyproject)
        .with_context(|| format!("cannot read {}", pyproject.display()))?;
    let stamp = venv.join(".deltabox-sdk-installed");
    let installed = fs::read_to_string(&stamp).unwrap_or_default();
    if installed != wanted {
        step("installing the Python SDK (editable, with its test extra)");
        run_cmd(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "--upgrade", "pip"])
                .current_dir(sdk_dir()),
        )?;
        run_cmd(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "--editable", ".[test]"])
                .current_dir(sdk_dir()),
        )?;
        fs::write(&stamp, wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    }
    Ok(python)
}

/// Runs the Python SDK's tests against the binaries in `bin_dir` (`target/debug`):
/// `deltaboxd` for the daemon the fixture starts, `deltabox` for the CLI. Needs root
/// (the daemon tests) and the network to PyPI the first time (httpx, pytest).
pub fn test(bin_dir: &Path) -> Result<()> {
    let deltaboxd = bin_dir.join("deltaboxd");
    if !deltaboxd.exists() {
        bail!(
            "{} is not built: build the workspace first",
            deltaboxd.display()
        );
    }
    let venv = target_dir()?.join("sdk-venv");
    let python = ensure_venv(&venv)?;
    step("ruff and mypy --strict on sdk/python");
    for gate in [
        &["-m", "ruff", "check", "."][..],
        &["-m", "ruff", "format", "--check", "."],
        &["-m", "mypy"],
    ] {
        run_cmd(Command::new(&python).args(gate).current_dir(sdk_dir()))?;
    }
    step("pytest sdk/python (unit tests, real-daemon tests, examples --short)");
    run_cmd(
        Command::new(&python)
            .args([
                "-m",
                "pytest",
                "-ra",
                "--strict-markers",
                "-p",
                "no:cacheprovider",
            ])
            .arg("tests")
            .current_dir(sdk_dir())
            .env("DELTABOXD", &deltaboxd)
            .env("DELTABOX_CLI", bin_dir.join("deltabox"))
            .env("PYTHONDONTWRITEBYTECODE", "1"),
    )
}
