"""The bundled engine: llama.cpp through llama-cpp-python's bindings, driven by our own calls (``native``).

This is the parent side (the tuner): build facts, engine defaults, and requests to a child process for everything
that creates a model or a context (dry run, real load, timed run, K/V divergence), read back as JSON. The child
side is ``child`` and ``native``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..facts.probe import BuildInfo
from ..vocabulary.errors import EngineDied, ModelError
from ..vocabulary.settings import Settings
from . import history as history_cache
from . import process
from .base import BufferReport, Measurement, OnRep, Workload

name = "llama-cpp-python"


@lru_cache(maxsize=1)
def build_info() -> BuildInfo:
    """What the installed engine was compiled for (reads the library, loads no model)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    can_offload = bool(llama_cpp.llama_supports_gpu_offload())
    lowered = info.lower()
    backend = "cpu"
    for candidate in ("cuda", "metal", "vulkan", "hip", "sycl"):
        if f"{candidate} :" in lowered or f"{candidate} =" in lowered or f"{candidate}:" in lowered:
            backend = candidate
            break
    if backend == "cpu" and can_offload:
        backend = "gpu"
    features = tuple(sorted({m.group(1) for m in re.finditer(r"(\w+) = 1", info)}))
    return BuildInfo(llama_cpp.__version__, backend, can_offload, features, info.strip())


@lru_cache(maxsize=1)
def build_key() -> str:
    """Identity of the installed engine build: version, compiled features, and the native libraries' sizes and
    times (a rebuild with other ``CMAKE_ARGS`` changes them). Verdicts about what the engine does on this
    machine are remembered under it."""
    import llama_cpp

    info = build_info()
    libs = sorted(Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib").glob("*"))
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in libs)
    return hashlib.sha256(f"{info.version}|{info.system_info}|{stamp}".encode()).hexdigest()[:12]


def defaults(n_ctx: int) -> Settings:
    """What llama-cpp-python does when the user sets nothing but the context: the baseline to beat (the knob
    table's defaults are its own)."""
    return Settings(n_ctx=n_ctx)


# ---------------------------------------------------------------------------------------------
# Dry run: the engine's no-allocation load, the ground truth for the memory model.


def dry_run(model_path: str, settings: list[Settings], timeout: float = 300) -> list[BufferReport | str]:
    """The engine's own accounting for each settings, from one child process: a BufferReport, or the engine's
    error line where it refused that context. ModelError when the engine cannot load the model at all,
    EngineDied when the child dies (some CPUs abort inside the dry run)."""
    if not settings:
        return []
    request = {"mode": "dry-run", "model": model_path, "settings": [s.to_dict() for s in settings]}
    result = answer(request, timeout, "the engine's dry run failed")
    out: list[BufferReport | str] = []
    for item in result["reports"]:
        if item.get("load"):
            raise ModelError(f"{model_path}: the engine refuses this model: {item['error']}")
        if "error" in item:
            out.append(item["error"])
        else:
            out.append(BufferReport(**item))
    return out


# ---------------------------------------------------------------------------------------------
# Real load: the weight buffers the dry run cannot see (CPU_Mapped, CPU_REPACK, AMX, ...).


def loaded_buffers(model_path: str, settings: Settings = Settings(), timeout: float = 300) -> dict[str, int]:
    """Model buffer sizes from a real engine load with ``settings`` (placement, mmap, extra buffer types), in a
    child process. It maps the file and repacks for real, so keep it to models that fit this machine."""
    request = {"mode": "load", "model": model_path, "settings": settings.to_dict()}
    result = answer(request, timeout, "the engine could not load the model")
    return {k: int(v) for k, v in result["buffers"].items()}


def answer(request: dict[str, Any], timeout: float, failed: str) -> dict[str, Any]:
    """The child's result for a request that must succeed; EngineDied ("<model>: <failed>: why") when the child
    died or hung, ModelError when it answered with an error (it could not read the model)."""
    done = process.spawn(request, timeout)
    if done.timed_out:
        raise EngineDied(f"{request['model']}: {failed}: no answer in {timeout:.0f} s")
    if done.result is None:
        raise EngineDied(f"{request['model']}: {failed}: {done.failure()}")
    if "error" in done.result:
        raise ModelError(f"{request['model']}: {failed}: {done.result['error']}")
    return done.result


# ---------------------------------------------------------------------------------------------
# Timed runs, measured like llama-bench: load, warm up, then per repetition reset, prefill a fixed prompt
# of P tokens and generate G tokens greedily. Every raw sample is kept.


class _Kept:
    """The child that keeps a model loaded for the runs of a ``kept_loaded`` block."""

    def __init__(self, every_load: bool) -> None:
        self.every_load = every_load
        self.worker = process.Worker()
        self.load: tuple[Any, ...] | None = None  # the load settings of the model the child holds

    def ask(self, request: dict[str, Any], settings: Settings, timeout: float, on_rep: OnRep | None) -> process.Spawned:
        """A run with other load settings gets a fresh child: in this one the old model would still fill the GPU
        when the run's peak starts to count (the child frees it only once the new request arrives)."""
        if self.load is not None and self.load != settings.load_key():
            self.worker.close()
        self.load = settings.load_key()
        return self.worker.ask(request, timeout, watch_vram=True, on_rep=on_rep)

    def serves(self, settings: Settings) -> bool:
        """Runs that load layers onto a GPU share the child (a load copies the weights there: seconds to
        minutes); on the host a load maps the file in a fraction of a second, and each run gets a fresh child."""
        return self.every_load or _on_gpu(settings)


def _on_gpu(settings: Settings) -> bool:
    return settings.n_gpu_layers > 0 and build_info().can_offload


_kept: _Kept | None = None


@contextlib.contextmanager
def kept_loaded(every_load: bool = False) -> Iterator[None]:
    """Within the block, runs that load layers onto a GPU (every run with ``every_load``) go to one child that
    keeps its last model loaded: runs whose load settings (``Settings.load_key``) match the one before share
    that load, and each gets a context of its own. A run that fails ends the child; the next starts another."""
    global _kept
    before, _kept = _kept, _Kept(every_load)
    try:
        yield
    finally:
        _kept.worker.close()
        _kept = before


def measure(
    model_path: str,
    settings: Settings,
    workload: Workload = Workload(),
    timeout: float = 300.0,
    index: int = 0,
    on_rep: OnRep | None = None,
) -> Measurement:
    """Measure ``settings`` on ``model_path`` in a child process (a fresh one, or the one ``kept_loaded`` keeps).
    Never raises for engine faults: a crash, abort, out-of-memory kill or hang becomes a failed Measurement with
    a specific reason. ``on_rep`` may stop the run after any repetition: the Measurement then holds the
    repetitions that ran."""
    # A saved history is loaded faster than the host evaluates it, not than a GPU does (a GPU evaluates thousands
    # of tokens in a fraction of a second; the file of their cache takes longer to write and read).
    history = None if _on_gpu(settings) else history_cache.shared_dir()
    request = {
        "mode": "measure",
        "model": model_path,
        "settings": settings.to_dict(),
        "workload": workload.__dict__,
        "index": index,
        "history_dir": history,
    }
    if _kept is not None and _kept.serves(settings):
        done = _kept.ask(request, settings, timeout, on_rep)
    else:
        done = process.spawn(request, timeout, watch_vram=True, on_rep=on_rep)
    if done.stopped:
        return Measurement(
            settings,
            True,
            prefill_tps=[r["prefill"] for r in done.reps],
            decode_tps=[r["decode"] for r in done.reps],
            ttft_s=[r["ttft"] for r in done.reps],
            wall_s=done.wall_s,
            peak_vram=done.peak_vram,
            gpu_peaks=done.gpu_peaks,
            stopped=True,
        )
    if done.timed_out:
        return Measurement(settings, False, f"timeout: no result after {timeout:.0f} s (killed)", wall_s=done.wall_s)
    if done.result is None:
        return Measurement(settings, False, done.failure(), wall_s=done.wall_s)
    if not done.result.get("ok"):
        return Measurement(settings, False, done.result.get("error") or "the engine failed", wall_s=done.wall_s)
    m = Measurement.from_dict({**done.result["measurement"], "settings": settings.to_dict()})
    m.wall_s = done.wall_s
    m.peak_vram, m.gpu_peaks = done.peak_vram, done.gpu_peaks  # the memory layer learns from them (overhead.learn)
    return m


def divergence(
    model_path: str, pairs: list[tuple[str, str]], base: Settings, n_tokens: int = 256, timeout: float = 600.0
) -> dict[str, dict[str, Any]]:
    """How far each quantized (K, V) cache pair moves the model's next-token distributions from an f16
    cache on the fixed text: top-1 agreement and mean KL(f16 || quantized), keyed "k/v". A pair the engine
    refuses, or every pair when the child dies, is reported with an error."""
    request = {
        "mode": "divergence",
        "model": model_path,
        "settings": base.to_dict(),
        "pairs": [list(p) for p in pairs],
        "tokens": n_tokens,
    }
    done = process.spawn(request, timeout)
    if done.result is None or not done.result.get("ok"):
        reason = (done.result or {}).get("error") or (
            f"timeout after {timeout:.0f} s" if done.timed_out else done.failure()
        )
        return {f"{k}/{v}": {"error": reason} for k, v in pairs}
    return done.result["divergence"]
