"""Fixtures: a real ``deltaboxd`` for the tests marked ``daemon``.

The session-scoped :func:`daemon` fixture starts ``deltaboxd serve`` (path from
``$DELTABOXD``, else ``target/debug/deltaboxd`` under the repository) as root with its
own socket, metrics port, pin directory, data directory (under
``/var/lib/deltabox/store``, the xfs mount), run directory (under ``/run``) and
sandbox cgroup (under ``/sys/fs/cgroup/unified``), waits for ``/v1/status``, and at
the end stops it by pid (SIGTERM, then SIGKILL) and removes what it made — cgroups
(killed first), mounts left under its run directory, its directories — whatever the
tests did. ``$DELTABOXD_ARGS`` adds arguments to ``serve``.

A test marked ``daemon`` fails (never skips) when the daemon cannot be started; run
``pytest -m "not daemon"`` for the unit tests alone.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import deltabox

REPO = Path(__file__).resolve().parents[3]
STORE_ROOT = Path("/var/lib/deltabox/store")
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
BPF_ROOT = Path("/sys/fs/bpf")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


@dataclass
class Daemon:
    """A running ``deltaboxd`` and where it keeps its things."""

    pid: int
    socket: str
    data_dir: Path
    run_dir: Path
    cgroup: Path
    pin_dir: Path
    log: Path
    #: The v1 hierarchies' mirrors of ``cgroup`` where the daemon puts limits that
    #: cgroup2 lacks controllers for (docs/sandbox-runtime.md, "Cgroups").
    v1_cgroups: list[Path] = field(default_factory=list)

    def log_tail(self, lines: int = 40) -> str:
        """The end of its stderr, for failure messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as err:
            return f"(no log: {err})"


def deltaboxd_path() -> Path:
    """``$DELTABOXD`` or the debug build under the repository."""
    return Path(os.environ.get("DELTABOXD") or REPO / "target" / "debug" / "deltaboxd")


def _require(condition: bool, message: str) -> None:
    if not condition:
        pytest.fail(message, pytrace=False)


def _remove_cgroup_tree(path: Path, before_retry: Callable[[Path], None] | None = None) -> None:
    """Removes a cgroup and its children, deepest first, each retried for up to 10 s in
    all while the kernel lets its processes exit (``before_retry`` is called on a
    cgroup that is not empty yet)."""
    if not path.is_dir():
        return
    subdirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    deadline = time.monotonic() + 10
    for d in [*subdirs, path]:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                if before_retry is not None:
                    before_retry(d)
                time.sleep(0.05)


def _kill(cgroup: Path) -> None:
    """Kills every process under a cgroup2 cgroup (one that is gone is fine)."""
    with contextlib.suppress(OSError):
        (cgroup / "cgroup.kill").write_text("1")


def _kill_cgroup(path: Path) -> None:
    """Kills every process under a cgroup, then removes it and its children."""
    if path.is_dir():
        _kill(path)
    _remove_cgroup_tree(path, before_retry=_kill)


def _v1_mirrors(pid: int, cgroup: Path) -> list[Path]:
    """Where a daemon with this pid would mirror ``cgroup`` in the v1 limit hierarchies:
    ``/sys/fs/cgroup/<hierarchy>/<its own v1 cgroup>/<cgroup relative to cgroup2>``."""
    mirrors = []
    rel = cgroup.relative_to(CGROUP_ROOT)
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, own = line.split(":", 2)
        if set(controllers.split(",")) & {"memory", "cpu", "pids"}:
            mount = Path("/sys/fs/cgroup") / controllers
            if mount.is_dir():
                mirrors.append(mount / own.lstrip("/") / rel)
    return mirrors


def _remove_v1(path: Path) -> None:
    """Removes a v1 cgroup subtree bottom-up (its processes are gone once the v2
    cgroups were killed)."""
    _remove_cgroup_tree(path)


def _unmount_under(root: Path) -> None:
    """Lazily unmounts every mount at or below ``root``, deepest first."""
    prefix = str(root)
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _status_ok(socket: str) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=socket), timeout=5) as http:
            return http.get("http://deltaboxd/v1/status").status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def running_daemon(*, sandboxes: bool = True) -> Iterator[Daemon]:
    """Starts a ``deltaboxd`` (``sandboxes=False``: with ``--no-sandboxes``), waits
    until it answers, and stops it and removes everything it made on exit."""
    binary = deltaboxd_path()
    _require(os.geteuid() == 0, "the daemon tests need root (deltaboxd makes namespaces, mounts, cgroups)")
    _require(
        binary.is_file(),
        f"{binary} is not built: run `cargo build -p deltabox-controller` or set DELTABOXD",
    )
    helptext = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True).stdout
    _require(
        "--data-dir" in helptext and "--sandbox-cgroup" in helptext,
        f"{binary} has no sandbox support (`serve --help` lists no --data-dir / --sandbox-cgroup)",
    )
    _require(STORE_ROOT.is_dir(), f"{STORE_ROOT} (the xfs store mount) does not exist")
    tag = f"sdk-{uuid.uuid4().hex[:12]}"
    top = Path("/run") / f"deltabox-{tag}"
    d = Daemon(
        pid=0,
        socket=str(top / "api.sock"),
        data_dir=STORE_ROOT / tag,
        run_dir=top / "run",
        cgroup=CGROUP_ROOT / f"deltabox-{tag}",
        pin_dir=BPF_ROOT / f"deltabox-{tag}",
        log=Path("/tmp") / f"deltaboxd-{tag}.log",
    )
    top.mkdir(parents=True)
    d.data_dir.mkdir(parents=True)
    argv = [
        str(binary),
        "serve",
        "--socket",
        d.socket,
        "--metrics-addr",
        "127.0.0.1:0",
        "--pin-dir",
        str(d.pin_dir),
        "--unload-on-exit",
        "--data-dir",
        str(d.data_dir),
        "--run-dir",
        str(d.run_dir),
        "--sandbox-cgroup",
        str(d.cgroup),
        *([] if sandboxes else ["--no-sandboxes"]),
        *shlex.split(os.environ.get("DELTABOXD_ARGS", "")),
    ]
    with open(d.log, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    d.pid = proc.pid
    try:
        d.v1_cgroups = _v1_mirrors(proc.pid, d.cgroup)
        deadline = time.monotonic() + START_TIMEOUT
        while not _status_ok(d.socket):
            if proc.poll() is not None:
                pytest.fail(f"deltaboxd exited at start ({proc.returncode}):\n{d.log_tail()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(
                    f"deltaboxd did not answer within {START_TIMEOUT} s:\n{d.log_tail()}", pytrace=False
                )
            time.sleep(0.05)
        yield d
    finally:
        _stop(proc)
        _kill_cgroup(d.cgroup)
        for mirror in d.v1_cgroups:
            _remove_v1(mirror)
        _unmount_under(top)
        _unmount_under(d.data_dir)
        shutil.rmtree(top, ignore_errors=True)
        shutil.rmtree(d.data_dir, ignore_errors=True)
        shutil.rmtree(d.pin_dir, ignore_errors=True)
        if proc.returncode not in (0, None):
            print(f"deltaboxd exited {proc.returncode}; log {d.log}:\n{d.log_tail()}")
        else:
            d.log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """A ``deltaboxd`` for the whole session, stopped and cleaned up even on failure."""
    with running_daemon() as d:
        yield d


@pytest.fixture
def client(daemon: Daemon) -> Iterator[deltabox.Client]:
    """A client of the session's daemon; removes the sandboxes a test leaves behind, so
    tests do not depend on each other's order."""
    with deltabox.Client(daemon.socket, timeout=120) as client:
        yield client
        alive = daemon_alive(daemon)
        assert alive, f"deltaboxd (pid {daemon.pid}) died during the test:\n{daemon.log_tail()}"
        for sb in client.sandboxes():
            with contextlib.suppress(deltabox.UnknownSandbox):
                sb.remove()


def daemon_alive(daemon: Daemon) -> bool:
    """The daemon process still exists (and is not a zombie)."""
    try:
        with open(f"/proc/{daemon.pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def socket_env(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> str:
    """Points ``$DELTABOX_SOCKET`` (the default client, the examples) at the daemon."""
    monkeypatch.setenv("DELTABOX_SOCKET", daemon.socket)
    return daemon.socket
