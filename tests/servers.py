"""Processes the tests start that outlive one call (a llama-server, a PostgreSQL cluster): each in a process
group of its own, registered here, and stopped with the run however it ends.

A pytest plugin (conftest.py loads it; a pytest run started by a test loads it with ``-p servers``). A SIGTERM
(what ``timeout`` or a CI time limit sends) would end pytest at once, finalizers unrun, leaving every server
that lives in a group of its own behind. The handler installed here stops the registered servers, then every
process still descended from the run (pytest is their subreaper on Linux, so even one orphaned by a killed
``autotune`` keeps pytest as an ancestor), lets pytest tear its fixtures down, and at the very end dies of the
signal it was sent.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_stops: dict[int, Callable[[], None]] = {}  # what stops each live server, by its process id
_caught: int | None = None  # the signal that is ending the run
_previous: dict[int, Any] = {}


def start(argv: list[str], **popen: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv)`` in a session (and process group) of its own, stopped with the run."""
    proc = subprocess.Popen(argv, start_new_session=True, **popen)
    _stops[proc.pid] = lambda: stop(proc)
    return proc


def stop(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """End ``proc``'s process group: SIGTERM, SIGKILL after ``grace`` seconds; then it is no longer registered."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # a timed wait never blocks on the lock an interrupted wait holds (the signal handler calls this)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _stops.pop(proc.pid, None)


def stop_all() -> list[str]:
    """Stop every registered server, then every process still descended from this one; what the second step
    found (name and pid), which a run that ends normally should not have left."""
    for pid, stop_one in list(_stops.items()):
        try:
            stop_one()
        except Exception as e:  # one that fails to stop must not keep the others running
            sys.stderr.write(f"could not stop test server {pid}: {e}\n")
        _stops.pop(pid, None)
    left = psutil.Process().children(recursive=True)
    found = [d for d in map(_described, left) if d]
    for sig in ("terminate", "kill"):
        for p in left:
            try:
                getattr(p, sig)()
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(left, timeout=5)
        if not left:
            break
    return found


def _described(p: psutil.Process) -> str | None:
    """Name and pid of a process still running; None for one gone or a zombie."""
    try:
        return f"{p.name()} ({p.pid})" if p.status() != psutil.STATUS_ZOMBIE else None
    except psutil.NoSuchProcess:
        return None


@dataclass
class Cluster:
    """A throwaway PostgreSQL cluster on loopback (Debian's server), registered like any server."""

    url: str  # postgresql://autotune@127.0.0.1:PORT/ ; a test appends a database name
    root: Path  # its data directory, log and socket
    pid: int  # the postmaster

    def stop(self) -> None:
        """Immediate shutdown (SIGQUIT to the postmaster, what ``pg_ctl stop -m immediate`` sends), then its files."""
        try:
            postmaster = psutil.Process(self.pid)
            postmaster.send_signal(signal.SIGQUIT)
            try:
                postmaster.wait(timeout=10)
            except psutil.TimeoutExpired:
                postmaster.kill()
        except psutil.NoSuchProcess:
            pass
        _stops.pop(self.pid, None)
        shutil.rmtree(self.root, ignore_errors=True)


def pg_bindir() -> Path | None:
    """The newest Debian PostgreSQL server's binaries, or None where none is installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def start_postgres(bindir: Path) -> Cluster:
    """initdb and start a cluster on a free loopback port, as Debian's postgres user when run as root (the server
    refuses root); RuntimeError where that is impossible."""
    root = Path(tempfile.mkdtemp(prefix="autotune-pg-"))  # not under pytest's root-only directory
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise RuntimeError("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "autotune", "-A", "trust"],
                       check=True, capture_output=True)
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
                        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    cluster = Cluster(f"postgresql://autotune@127.0.0.1:{port}/", root,
                      int((data / "postmaster.pid").read_text().split()[0]))
    _stops[cluster.pid] = cluster.stop
    return cluster


def _on_signal(signum: int, frame: object) -> None:
    global _caught
    first = _caught is None
    _caught = signum
    stop_all()  # at once: a SIGKILL may follow the SIGTERM before pytest has torn anything down
    if not first:  # a second signal while tearing down: end now
        _die()
    pytest.exit(f"stopped by {signal.Signals(signum).name}: test servers stopped, tearing down",
                returncode=128 + signum)


def _die() -> None:
    assert _caught is not None
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(_caught, signal.SIG_DFL)
    os.kill(os.getpid(), _caught)


def pytest_configure(config: pytest.Config) -> None:
    if sys.platform.startswith("linux"):  # PR_SET_CHILD_SUBREAPER: orphaned descendants stay ours to stop
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    for sig in SIGNALS:
        _previous[sig] = signal.signal(sig, _on_signal)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """After every finalizer: whatever is still running goes; a run ended by a signal then dies of it."""
    left = stop_all()
    if left and _caught is None:
        sys.stderr.write(f"\nstopped what the tests left running: {', '.join(left)}\n")
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    if _caught is not None:
        _die()
