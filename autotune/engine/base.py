"""What every engine shares: the measured-run records, the llama.cpp log it reports buffers in, how a dead
engine process is described, and the ``Engine`` protocol an engine implements.

Nothing here imports an engine: the parent process (the tuner) reads this; the engine runs in child
processes that talk JSON (``process.CHILD``: the engine's library first, then ``__main__.main``), so a native crash
takes down only the child.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol, runtime_checkable

import psutil

from ..facts.probe import BuildInfo
from ..vocabulary.settings import Settings

MIB = 2**20
RESULT_MARK = "AUTOTUNE-RESULT "  # the child's one result line on stdout: this mark, then JSON
REP_MARK = "AUTOTUNE-REP "  # a measured run's line per repetition, as it finishes: this mark, then JSON


def llama_cpp_defaults(n_ctx: int) -> Settings:
    """What llama.cpp's own tools (llama-server, llama-cli, llama-bench) do when told nothing but the context:
    their math-thread count (the physical cores) for both thread pools, n_batch 2048, n_ubatch 512, flash
    attention on where the backend has it (auto), mmap, a sliding-window cache of the window's size."""
    threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return Settings(
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=2048,
        n_ubatch=512,
        flash_attn=True,
        swa_full=False,
    )


def prompt_text(kind: str = "prose") -> str:
    """The fixed benchmark text shipped with the package (runs stay comparable across machines)."""
    return (resources.files("autotune") / "prompts" / f"{kind}.txt").read_text()


@dataclass(frozen=True)
class Workload:
    """What one run measures: prompt tokens, generated tokens, repetitions."""

    prompt_tokens: int = 128
    gen_tokens: int = 32
    reps: int = 2
    prompt_kind: str = "prose"
    depth: int = 0  # tokens already in the cache when the prompt arrives (llama-bench's -d)


@dataclass
class GpuPeak:
    """One GPU's peak memory during a run (NVML), and what names that GPU's fixed overhead: the memory layer
    learns from it (``overhead.learn``)."""

    device: str  # the engine's name for it: CUDA0, CUDA1 ... in CUDA_VISIBLE_DEVICES order
    name: str  # the GPU model, as NVML names it
    driver: str  # the driver version
    peak: int  # bytes
    # "process": the engine child's own use (NVML's per-process accounting); "device": the device's use less what
    # was in use before the child started (where NVML cannot see the child: containers, some drivers)
    source: str


@dataclass
class Measurement:
    settings: Settings
    ok: bool
    error: str = ""
    prefill_tps: list[float] = field(default_factory=list)  # one sample per repetition
    decode_tps: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    load_s: float = 0.0
    wall_s: float = 0.0
    peak_rss: int = 0  # bytes, the child's maximum resident set
    base_rss: int = 0  # bytes resident before the model loaded (Python + engine library): not the model's
    peak_vram: int | None = None  # bytes, all GPUs together (``gpu_peaks``), where NVML sees a GPU
    gpu_peaks: list[GpuPeak] = field(default_factory=list)  # per visible GPU
    buffers: dict[str, Any] = field(default_factory=dict)  # the engine's logged buffer sizes
    output_tokens: list[int] = field(default_factory=list)  # greedy output of the last repetition
    depth_fill_s: float = 0.0  # seconds to put the workload's depth of history in the cache (not timed above)
    history_loaded: bool = False  # that history came from an earlier run's saved cache (engine.history)
    stopped: bool = False  # stopped after these repetitions (a pruned trial): no peak memory, no output

    @property
    def decode(self) -> float:
        return statistics.median(self.decode_tps) if self.decode_tps else 0.0

    @property
    def prefill(self) -> float:
        return statistics.median(self.prefill_tps) if self.prefill_tps else 0.0

    @property
    def ttft(self) -> float:
        return statistics.median(self.ttft_s) if self.ttft_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "settings"}
        data["settings"] = self.settings.to_dict()
        data["gpu_peaks"] = [dataclasses.asdict(g) for g in self.gpu_peaks]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        known = {f.name for f in dataclasses.fields(cls)}  # a study stored before a field was retired reads too
        data = {k: v for k, v in data.items() if k in known}
        data["settings"] = Settings.from_dict(data["settings"])
        data["gpu_peaks"] = [GpuPeak(**g) for g in data.get("gpu_peaks") or []]
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# The engine's log: buffer sizes, and the line that explains a failure.


@dataclass
class BufferReport:
    """Buffer sizes the engine logged while loading a model and creating a context, in bytes per buffer name."""

    model: dict[str, int] = field(default_factory=dict)  # e.g. {"CPU": ..., "CPU_REPACK": ..., "CUDA0": ...}
    kv: dict[str, int] = field(default_factory=dict)  # KV buffers per device
    kv_k: int = 0
    kv_v: int = 0
    kv_cells: list[int] = field(default_factory=list)  # one entry per cache (two for SWA models)
    kv_caches: list[list[int]] = field(default_factory=list)  # [cells, K (or R) bytes, V (or S) bytes] per cache
    compute: dict[str, int] = field(default_factory=dict)
    output: dict[str, int] = field(default_factory=dict)
    weights_total: int = 0  # llama_model_size: all weight bytes wherever they live

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


_MODEL_BUF = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
_KV_BUF = re.compile(r"llama_kv_cache\w*:\s+(\S+) KV buffer size =\s+([\d.]+) MiB")
# a KV cache ("K (f16): .. MiB, V (f16): .. MiB") or a recurrent state ("R (f32): .., S (f32): ..")
_KV_SIZE = re.compile(
    r"size =\s+[\d.]+ MiB \(\s*(\d+) cells.*[KR] \(\w+\):\s+([\d.]+) MiB, [VS] \(\w+\):\s+([\d.]+) MiB"
)
_COMPUTE = re.compile(r"^\w+:\s+(\S+) compute buffer size =\s+([\d.]+) MiB")
_OUTPUT = re.compile(r"llama_context:\s+(\S+)\s+output buffer size =\s+([\d.]+) MiB")


def parse_buffers(lines: list[str]) -> BufferReport:
    """Read the engine's buffer-size log lines into bytes (the log prints MiB with two decimals)."""
    report = BufferReport()

    def add(target: dict[str, int], name: str, mib: str) -> None:
        target[name] = target.get(name, 0) + round(float(mib) * MIB)

    for line in lines:
        if m := _MODEL_BUF.search(line):
            add(report.model, m.group(1), m.group(2))
        elif m := _KV_BUF.search(line):
            add(report.kv, m.group(1), m.group(2))
        elif m := _KV_SIZE.search(line):
            cache = [int(m.group(1)), round(float(m.group(2)) * MIB), round(float(m.group(3)) * MIB)]
            report.kv_cells.append(cache[0])
            report.kv_k += cache[1]
            report.kv_v += cache[2]
            report.kv_caches.append(cache)
        elif m := _COMPUTE.search(line):
            add(report.compute, m.group(1), m.group(2))
        elif m := _OUTPUT.search(line):
            add(report.output, m.group(1), m.group(2))
    return report


def last_error(lines: list[str]) -> str:
    """The most telling engine line for a failure: the last line saying "error" (it carries the cause,
    e.g. an unknown architecture), else the last one saying fail/abort/invalid, else the last line."""
    for pattern in (r"\berror\b", r"fail|abort|exception|invalid|unknown"):
        for line in reversed(lines):
            if re.search(pattern, line, re.I):
                return line.strip()
    return lines[-1].strip() if lines else ""


# ---------------------------------------------------------------------------------------------
# A dead child, described for a person.

STAGE_MARK = "autotune-stage: "
# Test seam for a machine we may not have: multi-token batches crash (SIGSEGV) on models loaded with extra
# buffer types on, as the AMX kernel of llama-cpp-python 0.3.36 does on Sapphire Rapids Xeons.
FAKE_AMX_CRASH = "AUTOTUNE_FAKE_AMX_CRASH"


PHASE_MARK = "autotune-phase: "


def mark(stage: str, phase: bool = False) -> None:
    """Tell the parent which stage the engine is in: if the process dies, its last mark names the stage.
    A phase (e.g. "the f16 reference cache") is the larger task that stages happen in."""
    sys.stderr.write(f"{PHASE_MARK if phase else STAGE_MARK}{stage}\n")
    sys.stderr.flush()


_SIGNALS = {
    signal.SIGKILL: "killed by SIGKILL (the out-of-memory killer, most likely)",
    signal.SIGSEGV: "crashed with SIGSEGV (segmentation fault)",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGBUS: "crashed with SIGBUS",
    signal.SIGILL: "crashed with SIGILL (an instruction this CPU lacks)",
}


def child_failure(returncode: int, stderr: str) -> str:
    """One line for an engine child that exited badly: how it died, then where (``crash_context``) or, for
    an ordinary exit, the engine's error line."""
    if returncode < 0:
        sig = signal.Signals(-returncode)
        what = _SIGNALS.get(sig, f"killed by {sig.name}")
        where = crash_context(stderr)
        return what + (f" {where}" if where.startswith("during") else f"; {where}" if where else "")
    lines = [ln for ln in stderr.splitlines() if not ln.startswith((STAGE_MARK, PHASE_MARK))]
    tail = last_error(lines[-40:])
    return f"exit code {returncode}" + (f": {tail}" if tail else "")


_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s+([\d.]+) MiB")


def crash_context(stderr: str) -> str:
    """Where a dead engine process was, for a person: the stage it last marked, the model buffers it had
    (the load log names an AMX or CPU_REPACK buffer) and the engine's last error line, if any."""
    lines = stderr.splitlines()
    stages = [ln[len(STAGE_MARK) :] for ln in lines if ln.startswith(STAGE_MARK)]
    phases = [ln[len(PHASE_MARK) :] for ln in lines if ln.startswith(PHASE_MARK)]
    engine_lines = [ln for ln in lines if not ln.startswith((STAGE_MARK, PHASE_MARK))]
    parts = [f"during {stages[-1]}" + (f" ({phases[-1]})" if phases else "")] if stages else []
    buffers = [f"{m.group(1)} {float(m.group(2)):,.1f} MiB" for ln in engine_lines if (m := _BUFFER_LINE.search(ln))]
    if buffers:
        parts.append("model buffers " + ", ".join(buffers))
    errors = [ln.strip() for ln in engine_lines if re.search(r"\berror\b|GGML_ASSERT|fault injection", ln, re.I)]
    if errors:
        parts.append(f"engine: {errors[-1]}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------


# Told each repetition of a measured run as it ends (decode, prefill tok/s and ttft seconds of that one):
# returning False stops the run there. Engines that measure all repetitions at once never call it.
OnRep = Callable[[dict[str, float]], bool]


@runtime_checkable
class Engine(Protocol):
    """What autotune needs from an engine. ``autotune.engine.bundled`` (llama-cpp-python) is the first; every
    call that creates a model or a context runs in a child process."""

    @property
    def name(self) -> str: ...

    def build_info(self) -> BuildInfo: ...

    def build_key(self) -> str: ...

    def defaults(self, n_ctx: int) -> Settings: ...

    def dry_run(self, model_path: str, settings: list[Settings], timeout: float = 300) -> list[BufferReport | str]: ...

    def loaded_buffers(self, model_path: str, settings: Settings, timeout: float = 300) -> dict[str, int]: ...

    def measure(
        self,
        model_path: str,
        settings: Settings,
        workload: Workload,
        timeout: float = 300.0,
        index: int = 0,
        on_rep: OnRep | None = None,
    ) -> Measurement: ...

    def divergence(
        self, model_path: str, pairs: list[tuple[str, str]], base: Settings, n_tokens: int = 256, timeout: float = 600.0
    ) -> dict[str, dict[str, Any]]: ...
