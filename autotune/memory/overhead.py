"""What a GPU holds for a run beyond llama.cpp's own buffers: a fixed part learned from real runs on that GPU, and
the peak of ggml's CUDA memory pool, priced from the run's settings.

Beside the model, KV, compute and output buffers the engine logs, a CUDA device holds the process's CUDA context
(code of the kernels that ran, the local memory they reserve), cuBLAS's workspace, and ggml's memory pool. The
pool is priced from what ggml-cuda allocates there (``pool``); the rest is learned. The engine reports each run's
peak per GPU (the child's own use where NVML accounts per process); the memory layer turns it into an
observation: that peak less the GPU's logged buffers and its priced pool. An allowance is kept per engine build,
GPU model, driver and kind of model (a mixture of experts runs other kernels: its fixed part measured 70-110 MiB
more on the H200), as the largest of the last ``KEEP`` observations: it covers the peaks seen lately, and one run
polluted by another process leaves it after ``KEEP`` more. Unseen, ``DEFAULT`` stands, learned on an H200 from
held-out-checked runs (bench/overhead_holdout.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..facts.catalog import cache_dir, read_json, write_json
from ..facts.gguf_model import EXPERTS, ModelFacts
from ..vocabulary.settings import Settings

MIB = 2**20
# Observations an allowance remembers: the largest of them is the allowance.
KEEP = 8
# Before any run on a GPU: the largest fixed part of the learning runs on an H200 (CUDA 13.0, driver 580; 1b and 8b
# shapes for dense models, qwen3-30b-a3b for experts), rounded up to 16 MiB. Runs of other shapes check it
# (bench/overhead_results.md); nothing it checks taught it.
DEFAULT = {"dense": 640 * MIB, "moe": 704 * MIB}
# llama.cpp pads the cells a micro-batch attends to (n_kv) to a multiple of this (llama_kv_cache::get_n_kv).
KV_PAD = 256
# MMQ quantizes a micro-batch's activations as block_q8_1_mmq: 144 bytes per 128 values, rows padded to 512.
Q8_1_MMQ = 144 / 128
ROW_PAD = 512


class Workload(Protocol):
    """The part of a run's workload (``engine.Workload``, frozen: read-only here) that sets its pool."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def depth(self) -> int: ...


class Run(Protocol):
    """What learning reads from a finished run (an ``engine.Measurement``)."""

    ok: bool
    settings: Settings
    buffers: dict[str, Any]
    gpu_peaks: list[Any]  # engine.base.GpuPeak: device, name, driver, peak, source


def kind(facts: ModelFacts) -> str:
    """Which default and which allowance a model's runs use: a mixture of experts runs its own kernels."""
    return "moe" if facts.n_expert else "dense"


def pool(facts: ModelFacts, s: Settings, kv_cells: int | None = None, ubatch: int | None = None) -> int:
    """The peak of ggml's CUDA pool on a GPU holding layers, in bytes: the largest of what one operation there
    borrows (each returns it before the next). Read from ggml-cuda: a quantized matmul (MMQ) quantizes its
    micro-batch's activations (the widest input: the FFN's, times the experts each token uses); without flash
    attention, KQ runs in cuBLAS at F32 (K converted to f32) and KQV in f16 (the softmaxed KQ converted to f16, the
    result in f16), each over the ``kv_cells`` attended (default: the whole context, as a conversation fills it).
    ``ubatch``: tokens in the micro-batch (default: ``n_ubatch``)."""
    if s.n_gpu_layers <= 0:
        return 0
    ub = min(s.n_ubatch, s.n_batch) if ubatch is None else ubatch
    n_kv = _pad(s.n_ctx) if kv_cells is None else kv_cells
    parts = [_matmul_pool(facts, ub)]
    if not s.flash_attn:
        kq = 4 * facts.head_dim_k * max(facts.n_head_kv, default=0) * n_kv
        kqv = 2 * n_kv * ub * facts.n_head + 2 * facts.head_dim_v * ub * facts.n_head
        parts += [kq, kqv]
    return max(parts)


def _matmul_pool(facts: ModelFacts, ub: int) -> int:
    """MMQ's quantized copy of a micro-batch's activations (ggml_cuda_mul_mat_q); expert matmuls copy each token
    once per expert used. Experts not quantized go through cuBLAS, gathering f32 rows in and out."""
    experts = [t for t in facts.tensors if EXPERTS.search(t.name) and t.name.endswith(".weight")]  # not biases
    dense_width = -(-max(facts.n_embd, facts.n_ff) // ROW_PAD) * ROW_PAD
    n = int(ub * dense_width * Q8_1_MMQ)
    if experts and facts.n_expert_used:
        hidden = max(min(t.shape[:2]) for t in experts)  # ggml order: (n_embd, n_ff) or (n_ff, n_embd), experts
        rows = ub * facts.n_expert_used
        if all(t.type.startswith(("Q", "IQ", "MXFP", "NVFP")) for t in experts):
            n = max(n, int(rows * (-(-max(facts.n_embd, hidden) // ROW_PAD) * ROW_PAD) * Q8_1_MMQ))
        else:
            n = max(n, rows * (facts.n_embd + hidden) * 4 + rows * max(facts.n_embd, hidden) * 2)
    return n


def path() -> Path:
    return cache_dir() / "gpu-overhead.json"


def key(build_key: str, gpu: str, driver: str, model_kind: str) -> str:
    """One allowance per engine build, GPU model, driver version and kind of model."""
    return f"{build_key}|{gpu}|{driver or '?'}|{model_kind}"


def by_device(buffers: dict[str, Any]) -> dict[str, int]:
    """A run's logged buffers (``BufferReport.to_dict()``) that live on GPUs, in bytes per device (CUDA0 ...):
    every buffer not named after the host (CPU, CPU_Mapped, CPU_REPACK, AMX, CUDA_Host ...)."""
    out: dict[str, int] = {}
    for part in ("model", "kv", "compute", "output"):
        for name, n in (buffers.get(part) or {}).items():
            if not (name.startswith("CPU") or name.endswith("_Host") or name == "AMX"):
                out[name] = out.get(name, 0) + int(n)
    return out


def on_gpus(buffers: dict[str, Any]) -> int:
    """Bytes of a run's logged buffers on all GPUs together."""
    return sum(by_device(buffers).values())


def observe(
    build_key: str, gpu: str, driver: str, model_kind: str, peak: int, held: int, priced: int, source: str = "process"
) -> int | None:
    """Record one GPU's fixed overhead in one run: its ``peak`` less the buffers it ``held`` and its ``priced``
    pool; returns it. None (nothing recorded) where that GPU held no logged buffer."""
    if held <= 0 or peak <= held:
        return None
    fixed = peak - held - priced
    data = _read()
    entry = data.setdefault(key(build_key, gpu, driver, model_kind), {"seen": [], "n": 0})
    entry["seen"] = (entry["seen"] + [{"fixed": fixed, "source": source}])[-KEEP:]
    entry["n"] += 1
    _write(data)
    return fixed


def learn(build_key: str, facts: ModelFacts, run: Run, workload: Workload) -> dict[str, int]:
    """Learn from a finished run the fixed overhead of each GPU that held any of its buffers; the observations
    per device (CUDA0 ...). The run's pool is priced as it really was: at the micro-batch that borrowed the most
    (``cells_of``), not at a full context it never reached."""
    if not run.ok or not run.gpu_peaks:
        return {}
    held = by_device(run.buffers)
    priced = pool(facts, run.settings, *cells_of(run.settings, workload.prompt_tokens, workload.depth))
    out = {}
    for g in run.gpu_peaks:
        fixed = observe(build_key, g.name, g.driver, kind(facts), g.peak, held.get(g.device, 0), priced, g.source)
        if fixed is not None:
            out[g.device] = fixed
    return out


def cells_of(s: Settings, prompt_tokens: int, depth: int) -> tuple[int, int]:
    """(cells attended, tokens) of the micro-batch that borrows the most from the pool in a run: the history, then
    the prompt, are evaluated in micro-batches of ``n_ubatch``, each attending the cells filled by then (n_kv, padded
    as llama.cpp pads it, at most the context)."""
    ub, top = max(1, min(s.n_ubatch, s.n_batch)), _pad(s.n_ctx)
    best = (0, 0)
    for start, length in ((0, depth), (depth, prompt_tokens)):
        for begin in range(start, start + length, ub):
            n = min(ub, start + length - begin)
            cells = min(_pad(begin + n), top)
            if cells * n > best[0] * best[1]:
                best = (cells, n)
    return best


def _pad(cells: int) -> int:
    return -(-cells // KV_PAD) * KV_PAD


def allowance(build_key: str, gpu: str, driver: str, model_kind: str) -> tuple[int, bool]:
    """(bytes, learned): the largest of the last ``KEEP`` fixed overheads measured on this GPU model and driver with
    this build for this kind of model, else ``DEFAULT``; an estimate adds ``pool`` to it."""
    seen = _read().get(key(build_key, gpu, driver, model_kind), {}).get("seen") or []
    if seen:
        return max(int(o["fixed"]) for o in seen), True
    return DEFAULT[model_kind], False


def _read() -> dict[str, Any]:
    return read_json(path())


def _write(data: dict[str, Any]) -> None:
    write_json(path(), data)  # an unwritable cache only means the default next time
