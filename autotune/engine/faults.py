"""Faults injected into engine child processes, for tests of machines and failures we cannot produce on demand.

The seams are read from the environment the child inherits, once, when it starts (``from_env``); a real run
has no ``Injected`` and never passes through here. ``AUTOTUNE_FAULT`` fails a run after loading (abort,
segfault, out-of-memory kill, hang, garbage output, error exit); ``AUTOTUNE_FAKE_AMX_CRASH=1`` crashes every
multi-token batch on a model loaded with extra buffer types on, as llama-cpp-python 0.3.36's AMX kernel does on
Sapphire Rapids Xeons; ``AUTOTUNE_FAKE_TOOLCHAIN_MISMATCH=1`` crashes a model load when libstdc++ came into the
process before libllama. The engine code calls ``before_load``, ``before_batch`` and ``after_load`` where it
loads, decodes or has loaded (``native``, ``child``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass

from .base import FAKE_AMX_CRASH
from .libs import loaded_libraries, runtime_first

# Test seam for a machine we may not have: a model load crashes when the system libstdc++ came into the process
# before libllama, as on a CUDA build made by a GCC whose libstdc++ is not the system's (README, Troubleshooting).
FAKE_TOOLCHAIN_MISMATCH = "AUTOTUNE_FAKE_TOOLCHAIN_MISMATCH"

FAULT_KINDS = ("abort", "segfault", "oom", "hang", "garbage", "exit")


@dataclass(frozen=True)
class Injected:
    """The faults this child was asked to inject."""

    kinds: tuple[str, ...]  # AUTOTUNE_FAULT, cycled through
    every: int  # AUTOTUNE_FAULT_EVERY: only runs N-1, 2N-1, ... fail
    fake_amx: bool
    fake_toolchain: bool = False

    def before_load(self) -> None:
        """The fake toolchain mismatch: a SIGSEGV in the load when libstdc++ was loaded before libllama."""
        if self.fake_toolchain and runtime_first(loaded_libraries()):
            sys.stderr.write(
                f"autotune fault injection ({FAKE_TOOLCHAIN_MISMATCH}): std::regex in the vocabulary load, "
                "libstdc++ loaded before libllama\n"
            )
            sys.stderr.flush()
            ctypes.string_at(0)

    def before_batch(self, n_tokens: int, extra_bufts: bool) -> None:
        """The fake AMX crash: a SIGSEGV on a batch of two or more tokens, with extra buffer types on."""
        if self.fake_amx and n_tokens > 1 and extra_bufts:
            sys.stderr.write(
                f"autotune fault injection ({FAKE_AMX_CRASH}): ggml_backend_amx_mul_mat, {n_tokens} tokens\n"
            )
            sys.stderr.flush()
            ctypes.string_at(0)

    def after_load(self, index: int) -> None:
        """Fail run ``index`` the way ``AUTOTUNE_FAULT`` says, if it is one of the failing ones."""
        if not self.kinds or index % self.every != self.every - 1:
            return
        kind = self.kinds[(index // self.every) % len(self.kinds)]
        sys.stderr.write(f"autotune fault injection: {kind}\n")
        sys.stderr.flush()
        if kind == "abort":
            os.abort()
        elif kind == "segfault":
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


def from_env() -> Injected | None:
    """The faults the environment asks for, or None (a real run)."""
    kinds = tuple(k for k in os.environ.get("AUTOTUNE_FAULT", "").split(",") if k)
    fake_amx = os.environ.get(FAKE_AMX_CRASH) == "1"
    fake_toolchain = os.environ.get(FAKE_TOOLCHAIN_MISMATCH) == "1"
    if not (kinds or fake_amx or fake_toolchain):
        return None
    return Injected(kinds, int(os.environ.get("AUTOTUNE_FAULT_EVERY", "1")), fake_amx, fake_toolchain)
