"""The engines autotune measures with, behind one protocol (``base.Engine``); the only package that imports
``llama_cpp``. llama-cpp-python (``bundled``) is the default and always prices memory; ``use`` makes the
user's own llama-bench or llama-server (``external``) the one ``measure`` and ``defaults`` run on.

Everything that creates a model or a context runs in a child process (``process``: the engine's library loaded
first) and answers in JSON, so a native crash ends one run, never the tuner.

The package also owns the load generator for llama-server (``loadgen``) and llama.cpp's own tools built from the
vendored source (``reference``). May import the vocabulary, the facts and the memory model.
"""

import contextlib
from typing import Iterator

from ..vocabulary.settings import Settings
from . import bundled
from .base import (
    FAKE_AMX_CRASH,
    BufferReport,
    BuildInfo,
    Engine,
    Measurement,
    OnRep,
    Workload,
    child_failure,
    crash_context,
    llama_cpp_defaults,
    prompt_text,
)
from .bundled import (
    build_info,
    build_key,
    divergence,
    dry_run,
    loaded_buffers,
    name,
)

_current: Engine = bundled  # type: ignore[assignment]


def use(spec: str | None) -> Engine:
    """Measure with ``spec`` from now on: None or "bundled" (llama-cpp-python), "llama-bench:PATH" or
    "llama-server:PATH". SettingsError for anything else."""
    from . import external

    global _current
    if spec in (None, "bundled"):
        _current = bundled  # type: ignore[assignment]
    else:
        _current = external.Tool(*external.parse(spec))
    return _current


def current() -> Engine:
    return _current


@contextlib.contextmanager
def using(spec: str | None) -> Iterator[Engine]:
    """``use(spec)`` for the duration of a block, then back to the engine before it."""
    before = _current
    try:
        yield use(spec)
    finally:
        _restore(before)


def _restore(engine: Engine) -> None:
    global _current
    _current = engine


def measure(model_path: str, settings: Settings, workload: Workload = Workload(), timeout: float = 300.0,
            index: int = 0, on_rep: OnRep | None = None) -> Measurement:
    """A measured run on the current engine (a fresh process; never raises for engine faults); ``on_rep``
    may stop it after a repetition (``base.OnRep``)."""
    return _current.measure(model_path, settings, workload, timeout, index, on_rep)


def kept_loaded(every_load: bool = False) -> contextlib.AbstractContextManager[None]:
    """Within the block, runs that load layers onto a GPU share one model load per load settings
    (``bundled.kept_loaded``); an external engine starts its own binary per run anyway."""
    if _current is bundled:
        return bundled.kept_loaded(every_load)
    return contextlib.nullcontext()


def defaults(n_ctx: int) -> Settings:
    """What the current engine does when the user sets nothing but the context: the baseline to beat."""
    return _current.defaults(n_ctx)

__all__ = ["FAKE_AMX_CRASH", "BufferReport", "BuildInfo", "Engine", "Measurement", "OnRep", "Workload", "build_info",
           "build_key", "bundled", "child_failure", "crash_context", "current", "defaults", "divergence", "dry_run",
           "kept_loaded", "llama_cpp_defaults",
           "loaded_buffers", "measure", "name", "prompt_text", "use", "using"]
