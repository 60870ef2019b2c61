"""A test run stopped by SIGTERM (what ``timeout`` or a CI time limit sends) leaves nothing running: a real pytest
run, in a child, holding a server started by ``servers.start`` from a fixture, a PostgreSQL cluster (where the
server is installed) and an orphan in a session of its own, is sent SIGTERM mid-test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

INNER = '''
import json, os, signal, subprocess, sys
from pathlib import Path

import pytest
import servers

OUT = Path(os.environ["LEFTOVER_OUT"])


@pytest.fixture
def server():
    proc = servers.start([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    servers.stop(proc)
    (OUT / "torn down").write_text("yes")


def test_holds_servers(server):
    pids = {"server": server.pid}
    if sys.platform.startswith("linux"):  # where pytest can be the subreaper of what its children leave
        # what a killed autotune leaves of the llama-server it started: an orphan in a session of its own
        pids["orphan"] = int(subprocess.run(
            [sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
             "'import time; time.sleep(600)'], start_new_session=True, stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL).pid)"],
            capture_output=True, text=True, check=True).stdout)
    bindir = servers.pg_bindir()
    if bindir is not None:
        cluster = servers.start_postgres(bindir)
        pids["postgres"] = cluster.pid
        (OUT / "pg root").write_text(str(cluster.root))
    (OUT / "pids.json").write_text(json.dumps(pids))
    signal.pause()  # until the SIGTERM
'''


def marked(mark: str) -> list[psutil.Process]:
    """Processes still running (not zombies) whose environment carries ``mark``."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("LEFTOVER_MARK") == mark:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_a_run_stopped_by_sigterm_leaves_nothing_running(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER)
    out = tmp_path / "out"
    out.mkdir()
    mark = uuid.uuid4().hex
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "LEFTOVER_OUT": str(out), "LEFTOVER_MARK": mark,
           "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    inner = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "servers", "-p", "no:cacheprovider",
                              "test_inner.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "pids.json").exists() and inner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # polling for the inner test to be holding its servers
        if not (out / "pids.json").exists():
            inner.kill()
            raise AssertionError(f"the inner run never held its servers: {inner.communicate()[0][-3000:]}")
        pids = json.loads((out / "pids.json").read_text())
        assert all(psutil.pid_exists(pid) for pid in pids.values())
        inner.send_signal(signal.SIGTERM)  # to pytest alone, not its group: the servers get nothing from us
        log, _ = inner.communicate(timeout=120)
    finally:
        if inner.poll() is None:
            inner.kill()
    assert inner.returncode == -signal.SIGTERM, log
    assert "stopped by SIGTERM" in log
    assert (out / "torn down").exists(), log  # the fixture's finalizer ran
    assert not marked(mark), [p.cmdline() for p in marked(mark)]
    for name, pid in pids.items():
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"{name} ({pid}) still runs"
        except psutil.NoSuchProcess:
            pass
    if "postgres" in pids:
        assert not Path((out / "pg root").read_text()).exists()
