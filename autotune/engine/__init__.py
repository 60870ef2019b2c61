"""The engines autotune measures with, behind one protocol (``base.Engine``); the only package that imports
``llama_cpp``. llama-cpp-python (``bundled``) is the default and always prices memory; the package's own
functions (``measure``, ``defaults``, ``dry_run``, ...) are its. ``make`` turns ``--engine`` into an engine
object (the bundled one, or the user's own llama-bench or llama-server, ``external``) that the CLI hands to the
drivers; nothing here remembers which one is in use.

Everything that creates a model or a context runs in a child process (``process``: the engine's library loaded
first) and answers in JSON, so a native crash ends one run, never the tuner.

The package also owns the load generator for llama-server (``loadgen``) and llama.cpp's own tools built from the
vendored source (``reference``). May import the vocabulary, the facts and the memory model.
"""

import contextlib

from . import bundled, external
from .base import (
    FAKE_AMX_CRASH,
    BufferReport,
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
    defaults,
    divergence,
    dry_run,
    loaded_buffers,
    measure,
    name,
)


def make(spec: str | None) -> Engine:
    """The engine ``--engine`` names: None or "bundled" (llama-cpp-python), "llama-bench:PATH" or
    "llama-server:PATH". SettingsError for anything else. The CLI makes it once and hands it down."""
    if spec in (None, "bundled"):
        return bundled
    return external.Tool(*external.parse(spec))


def llama_server(path: str | None = None, quiet: bool = True) -> external.Tool:
    """The user's llama-server as an engine, or the reference build of the bundled engine's own llama.cpp
    (built once, cached): what the serving study and the speculation stage run."""
    if path:
        return external.Tool(*external.parse(f"llama-server:{path}"))
    from . import reference

    return external.Tool("llama-server", reference.tool("llama-server", quiet=quiet))


def study_key(engine: Engine) -> str:
    """What a study's name carries for the engine measuring: nothing for the bundled one (the names studies had
    before other engines existed), else its kind and build key."""
    return f"{engine.kind}{engine.build_key()}" if isinstance(engine, external.Tool) else ""


def kept_loaded(engine: Engine, every_load: bool = False) -> contextlib.AbstractContextManager[None]:
    """Within the block, runs that load layers onto a GPU share one model load per load settings
    (``bundled.kept_loaded``); an external engine starts its own binary per run anyway."""
    if engine is bundled:
        return bundled.kept_loaded(every_load)
    return contextlib.nullcontext()


__all__ = [
    "FAKE_AMX_CRASH",
    "BufferReport",
    "Engine",
    "Measurement",
    "OnRep",
    "Workload",
    "build_info",
    "build_key",
    "bundled",
    "child_failure",
    "crash_context",
    "defaults",
    "divergence",
    "dry_run",
    "external",
    "kept_loaded",
    "llama_cpp_defaults",
    "llama_server",
    "loaded_buffers",
    "make",
    "measure",
    "name",
    "prompt_text",
    "study_key",
]
