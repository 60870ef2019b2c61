"""What a GPU holds for a run beyond llama.cpp's own buffers, learned from real runs on that GPU.

Beside the model, KV, compute and output buffers the engine logs, a CUDA device holds the process's CUDA
context, the cuBLAS workspace and the peak of ggml's memory pool (temporary dequantized weights, converted K/V
for flash attention). None of it is in the engine's log or its dry run, and it depends on the GPU, the driver
and the build, so it is measured: every engine run on a GPU records its peak memory (NVML), and the peak less
that run's logged GPU buffers is an observation. The allowance a memory estimate adds per GPU is the largest
observation for this GPU and engine build, kept in the cache like the self-check's verdicts; before any run on
a GPU it is ``DEFAULT``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .catalog import cache_dir

MIB = 2**20
# Before a GPU has been measured: a CUDA context with cuBLAS and a pool's worth of room (bench/gpu_check.py
# measures the real figure on a GPU).
DEFAULT = 640 * MIB


def path() -> Path:
    return cache_dir() / "gpu-overhead.json"


def key(build_key: str, gpus: tuple[str, ...]) -> str:
    """One allowance per engine build and set of GPU models."""
    return f"{build_key}|{'+'.join(gpus)}"


def on_gpus(buffers: dict[str, Any]) -> int:
    """Bytes of a run's logged buffers (``BufferReport.to_dict()``) that live on GPUs: every buffer not named
    after the host (CPU, CPU_Mapped, CPU_REPACK, AMX, CUDA_Host ...)."""
    total = 0
    for part in ("model", "kv", "compute", "output"):
        for name, n in (buffers.get(part) or {}).items():
            if not (name.startswith("CPU") or name.endswith("_Host") or name == "AMX"):
                total += int(n)
    return total


def observe(build_key: str, gpus: tuple[str, ...], peak: int, buffers: dict[str, Any]) -> int | None:
    """Record one run's overhead (its peak GPU memory less its GPU buffers, per GPU holding any); returns it.
    None (nothing recorded) where the run held nothing on a GPU."""
    held = on_gpus(buffers)
    if not gpus or held <= 0 or peak <= held:
        return None
    per_gpu = (peak - held) // len(gpus)
    data = _read()
    entry = data.setdefault(key(build_key, gpus), {"max": 0, "n": 0, "seen": []})
    entry["max"] = max(entry["max"], per_gpu)
    entry["n"] += 1
    entry["seen"] = (entry["seen"] + [per_gpu])[-32:]
    _write(data)
    return per_gpu


def allowance(build_key: str, gpus: tuple[str, ...]) -> tuple[int, bool]:
    """(bytes per GPU, learned): the largest overhead measured on these GPUs with this build, else DEFAULT."""
    entry = _read().get(key(build_key, gpus))
    if entry and entry.get("n"):
        return int(entry["max"]), True
    return DEFAULT, False


def _read() -> dict[str, Any]:
    try:
        data = json.loads(path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(data: dict[str, Any]) -> None:
    p = path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(p)
    except OSError:
        pass  # an unwritable cache only means the default next time
