"""The conversation history a measurement starts from, evaluated once and reused by later runs.

A measured prompt sits behind ``Workload.depth`` tokens of history: a precondition of the measurement, not
part of it (it is never timed). Evaluating it again in every fresh engine process was a quarter of a
search's time on a small CPU, so the first run with a given cache layout saves its KV cells to a file
(``llama_state_seq_save_file``, as llama-bench keeps its depth prefill between repetitions) and later runs
with that layout load them. Only knobs that cannot change the cache's contents or layout (threads, batch
sizes, mmap, mlock, extra buffers) may differ between the run that saved and the runs that load.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..vocabulary.knobs import BY_NAME
from ..vocabulary.settings import Settings

_dir: str | None = None


def shared_dir() -> str:
    """This process's folder for saved histories, handed to every engine child it starts; removed at exit."""
    global _dir
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="autotune-history-")
        atexit.register(shutil.rmtree, _dir, ignore_errors=True)
    return _dir


def key(model_path: str, settings: Settings, tokens: list[int], engine_version: str) -> str:
    """The file name for ``tokens`` of history under ``settings``: equal only where the cache would be."""
    st = os.stat(model_path)
    fields = {k: v for k, v in settings.to_dict().items() if BY_NAME[k].cache}  # what the cache holds depends on
    blob = json.dumps(
        [os.path.abspath(model_path), st.st_size, st.st_mtime_ns, fields, tokens, engine_version],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32] + ".kv"


def load(ctx: Any, path: Path, tokens: list[int]) -> bool:
    """Put the saved history in the empty cache of ``ctx`` (a ``native.Context``); False (and the cache
    emptied) when there is none or it does not hold exactly ``tokens``: the caller then evaluates them."""
    import llama_cpp

    if not path.exists():
        return False
    out = (llama_cpp.llama_token * len(tokens))()
    count = ctypes.c_size_t(0)
    read = llama_cpp.llama_state_seq_load_file(ctx.ptr, str(path).encode(), 0, out, len(tokens), ctypes.byref(count))
    if not read or count.value != len(tokens) or list(out) != tokens:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx.ptr), True)
        return False
    ctx.input_ids[: len(tokens)] = tokens
    ctx.n_tokens = ctx._cached = len(tokens)
    return True


def save(ctx: Any, path: Path, tokens: list[int]) -> None:
    """Save the history ``ctx`` has just evaluated; another run saving the same file at once is harmless."""
    import llama_cpp

    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    if llama_cpp.llama_state_seq_save_file(ctx.ptr, str(tmp).encode(), 0, array, len(tokens)):
        os.replace(tmp, path)
    else:
        tmp.unlink(missing_ok=True)
