"""What a GPU holds for a run beyond llama.cpp's own buffers: a part learned from real runs on that GPU, and the
peak of ggml's CUDA memory pool, priced from the run's settings.

Beside the model, KV, compute and output buffers the engine logs, a CUDA device holds the process's CUDA
context and cuBLAS workspace (fixed for a GPU, driver and build) and ggml's memory pool, whose peak depends on
the settings: without flash attention the attention's KQ matrix passes through the pool as f16 (twice, for the
two products), and a mixture of experts gathers each expert's tokens there. None of it is in the engine's log or
its dry run. Every engine run on a GPU records its peak memory (NVML); that peak less the run's logged GPU buffers
and its priced pool is an observation of the fixed part, and the estimate adds the largest observation for this
GPU and build (kept in the cache like the self-check's verdicts; ``DEFAULT`` before any run there) plus the pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .catalog import cache_dir, read_json, write_json
from .gguf_model import EXPERTS, ModelFacts
from .settings import Settings

MIB = 2**20
# Before a GPU has been measured: on an H200 (CUDA 13.0, driver 580) the fixed part (a run's peak less its logged
# buffers and its priced pool) was at most 639 MiB over 13 runs of six shapes (bench/gpu_check.py).
DEFAULT = 640 * MIB


def pool(facts: ModelFacts, s: Settings) -> int:
    """The peak of ggml's CUDA pool on a GPU holding attention layers, in bytes: without flash attention the
    KQ product of a micro-batch against the whole context, as f16, for each of the two attention products (the
    full context: the pool grows as a conversation fills it); with experts, each expert's gathered tokens (f32
    activations in and out, and their quantized copy)."""
    if s.n_gpu_layers <= 0:
        return 0
    n = 0 if s.flash_attn else 4 * s.n_ctx * s.n_ubatch * facts.n_head
    experts = [t for t in facts.tensors if EXPERTS.search(t.name)]
    if experts and facts.n_expert_used:
        hidden = max(min(t.shape[:2]) for t in experts)  # ggml order: (n_embd, n_ff) or (n_ff, n_embd), experts
        n += 3 * s.n_ubatch * facts.n_expert_used * (facts.n_embd + hidden) * 4
    return n


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


def observe(build_key: str, gpus: tuple[str, ...], peak: int, buffers: dict[str, Any], priced: int) -> int | None:
    """Record one run's fixed overhead (its peak GPU memory less its GPU buffers and its ``priced`` pool, per GPU
    holding any); returns it. None (nothing recorded) where the run held nothing on a GPU."""
    held = on_gpus(buffers)
    if not gpus or held <= 0 or peak <= held:
        return None
    per_gpu = (peak - held) // len(gpus) - priced
    data = _read()
    entry = data.setdefault(key(build_key, gpus), {"max": 0, "n": 0, "seen": []})
    entry["max"] = max(entry["max"], per_gpu)
    entry["n"] += 1
    entry["seen"] = (entry["seen"] + [per_gpu])[-32:]
    _write(data)
    return per_gpu


def allowance(build_key: str, gpus: tuple[str, ...]) -> tuple[int, bool]:
    """(bytes per GPU, learned): the largest fixed overhead measured on these GPUs with this build, else
    DEFAULT; an estimate adds ``pool`` to it."""
    entry = _read().get(key(build_key, gpus))
    if entry and entry.get("n"):
        return int(entry["max"]), True
    return DEFAULT, False


def _read() -> dict[str, Any]:
    return read_json(path())


def _write(data: dict[str, Any]) -> None:
    write_json(path(), data)  # an unwritable cache only means the default next time
