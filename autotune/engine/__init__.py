"""The engines autotune measures with, behind one protocol (``base.Engine``); the only package that imports
``llama_cpp``. For now the engine is llama-cpp-python (``bundled``), and its functions are the package's.

Everything that creates a model or a context runs in a child process (``python -m autotune.engine``) and
answers in JSON, so a native crash ends one run, never the tuner.
"""

from .base import (
                   FAKE_AMX_CRASH,
                   BufferReport,
                   BuildInfo,
                   Engine,
                   Measurement,
                   Workload,
                   child_failure,
                   crash_context,
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

__all__ = ["FAKE_AMX_CRASH", "BufferReport", "BuildInfo", "Engine", "Measurement", "Workload", "build_info",
           "build_key", "child_failure", "crash_context", "defaults", "divergence", "dry_run", "loaded_buffers",
           "measure", "name", "prompt_text"]
