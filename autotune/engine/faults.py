"""Faults injected into engine child processes, for tests of machines and failures we cannot produce on demand.

Two seams, both read from the environment the child inherits: ``AUTOTUNE_FAULT`` fails a run after loading
(abort, segfault, out-of-memory kill, hang, garbage output, error exit), and ``AUTOTUNE_FAKE_AMX_CRASH=1``
crashes every multi-token batch on a model loaded with extra buffer types on, as llama-cpp-python 0.3.36's
AMX kernel does on Sapphire Rapids Xeons. ``instrument`` also marks each engine stage for crash reports.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from typing import Any

from .base import FAKE_AMX_CRASH, mark

FAULT_KINDS = ("abort", "segfault", "oom", "hang", "garbage", "exit")


def instrument() -> None:
    """Wrap the engine's load, context and decode calls (in a child process only): each new stage is marked, and with
    ``AUTOTUNE_FAKE_AMX_CRASH=1`` multi-token batches crash on models loaded with extra buffers on."""
    import llama_cpp
    import llama_cpp.llama_cpp as C

    fake = os.environ.get(FAKE_AMX_CRASH) == "1"
    with_extra: set[int] = set()
    last = [""]
    real_load, real_decode, real_context = C.llama_model_load_from_file, C.llama_decode, C.llama_init_from_model

    def load(path: bytes, params: Any) -> Any:
        last[0] = ""
        mark("loading the model" + (" (extra buffer types on)" if params.use_extra_bufts else ""))
        model = real_load(path, params)
        if model and params.use_extra_bufts:
            with_extra.add(model)
        return model

    def context(model: Any, params: Any) -> Any:
        last[0] = ""
        mark(f"creating a context of {params.n_ctx} tokens")
        return real_context(model, params)

    def decode(ctx: Any, batch: Any) -> int:
        n = batch.n_tokens
        stage = "a one-token decode step" if n == 1 else f"a batch of {n} tokens"
        if stage != last[0]:
            mark(stage)
            last[0] = stage
        if fake and n > 1 and C.llama_get_model(ctx) in with_extra:
            sys.stderr.write(f"autotune fault injection ({FAKE_AMX_CRASH}): ggml_backend_amx_mul_mat, {n} tokens\n")
            sys.stderr.flush()
            ctypes.string_at(0)
        return real_decode(ctx, batch)

    for module in (C, llama_cpp):
        module.llama_model_load_from_file = load
        module.llama_init_from_model = context
        module.llama_decode = decode


def after_load(index: int) -> None:
    """``AUTOTUNE_FAULT=abort|segfault|oom|hang|garbage|exit`` (a comma list cycles through kinds) makes the
    child fail that way after loading; with ``AUTOTUNE_FAULT_EVERY=N`` only every N-th run fails (indexes
    N-1, 2N-1, ...)."""
    kinds = [k for k in os.environ.get("AUTOTUNE_FAULT", "").split(",") if k]
    if not kinds:
        return
    every = int(os.environ.get("AUTOTUNE_FAULT_EVERY", "1"))
    if index % every != every - 1:
        return
    kind = kinds[(index // every) % len(kinds)]
    sys.stderr.write(f"autotune fault injection: {kind}\n")
    sys.stderr.flush()
    if kind == "abort":
        os.abort()
    elif kind == "segfault":
        import ctypes

        ctypes.string_at(0)
    elif kind == "oom":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        time.sleep(10**6)
    elif kind == "garbage":
        print("\x00\x1b[31m#@!garbage", flush=True)
        os._exit(0)
    elif kind == "exit":
        sys.stderr.write("llama_model_load: error loading model: injected failure\n")
        os._exit(3)


