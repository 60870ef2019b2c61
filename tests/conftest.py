"""Shared fixtures: the real demo model (fetched once from the package index) and small synthetic ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from autotune import catalog, synth


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test run's own autotune cache (child processes inherit it): fact pickles and engine self-check
    verdicts land there, so tests neither read the user's nor leave theirs behind. Catalog models and llama.cpp's
    reference tools are read from (and, the first time, fetched or built into) the user's cache, shared
    through links."""
    import os

    cache = tmp_path_factory.mktemp("cache")
    for shared in ("models", "llama.cpp"):
        target = catalog.cache_dir() / shared
        target.mkdir(parents=True, exist_ok=True)
        (cache / shared).symlink_to(target, target_is_directory=True)
    os.environ["AUTOTUNE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return catalog.fetch(catalog.DEMO_MODEL)


@pytest.fixture(scope="session")
def tiny_model(demo_model, tmp_path_factory) -> Path:
    """A 2-layer random-weight llama model the engine really runs (SmolLM2's tokenizer); head dim 32, so
    quantized K/V caches (32-element blocks) work on it."""
    shape = synth.Shape(n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=128)
    return synth.write_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", demo_model, shape)



def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> Any:
    """Run ``code`` in a fresh Python process and return the JSON its last stdout line holds. Tests that need
    the engine in Python run it here: a native crash then fails one test instead of killing the suite."""
    import os

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"child exited {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster of Debian's server on loopback, for the session; yields a URL prefix
    (``postgresql://autotune@127.0.0.1:PORT/``) to which a test appends its own database name. Skips, saying
    why, only where no server can be found (``.ci/run`` installs Debian's postgresql package)."""
    import glob
    import os
    import shutil
    import socket

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not bins:
        pytest.skip("no PostgreSQL server (Debian's postgresql package could not be installed)")
    import tempfile

    bindir = Path(bins[-1]).parent
    data = Path(tempfile.mkdtemp(prefix="autotune-pg-")) / "data"  # not under pytest's root-only directory
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as Debian's postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data.parent, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "autotune", "-A", "trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(data.parent / "log"),
                    "-o", f"-p {port} -k {data.parent} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://autotune@127.0.0.1:{port}/"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data.parent, ignore_errors=True)


@pytest.fixture
def pg_url(postgres: str, request: pytest.FixtureRequest) -> str:
    """A fresh database on the session's PostgreSQL server, named after the test."""
    import psycopg

    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    with psycopg.connect(postgres + "postgres", autocommit=True) as con:
        con.execute(f"DROP DATABASE IF EXISTS {name}")
        con.execute(f"CREATE DATABASE {name}")
    return postgres + name
