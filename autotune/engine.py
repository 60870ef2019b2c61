"""The one doorway to llama.cpp (through llama-cpp-python): build facts, log capture and the dry run.

The engine can abort the whole process on bad input, so anything that creates a model or a context
runs in a child process (``python -m autotune.engine`` here, ``autotune.runner`` for timed runs); the
parent only ever reads JSON back.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from .errors import ModelError
from .settings import Settings

MIB = 2**20


@dataclass(frozen=True)
class BuildInfo:
    version: str
    backend: str
    can_offload: bool
    cpu_features: tuple[str, ...]
    system_info: str


@lru_cache(maxsize=1)
def build_info() -> BuildInfo:
    """What the installed engine was compiled for (reads the library, loads no model)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    can_offload = bool(llama_cpp.llama_supports_gpu_offload())
    lowered = info.lower()
    backend = "cpu"
    for name in ("cuda", "metal", "vulkan", "hip", "sycl"):
        if f"{name} :" in lowered or f"{name} =" in lowered or f"{name}:" in lowered:
            backend = name
            break
    if backend == "cpu" and can_offload:
        backend = "gpu"
    features = tuple(sorted({m.group(1) for m in re.finditer(r"(\w+) = 1", info)}))
    return BuildInfo(llama_cpp.__version__, backend, can_offload, features, info.strip())


def build_key() -> str:
    """Identity of the installed engine build: version, compiled features, and the native libraries' sizes and
    times (a rebuild with other ``CMAKE_ARGS`` changes them). Verdicts about what the engine does on this
    machine are remembered under it."""
    import llama_cpp

    info = build_info()
    libs = sorted(Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib").glob("*"))
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in libs)
    return hashlib.sha256(f"{info.version}|{info.system_info}|{stamp}".encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Loading: every Settings field reaches the engine here, those Llama(...) has no keyword for included.


def model_params(settings: Settings) -> Any:
    """``llama_model_params`` for ``settings`` (placement and buffer types; the load mode is the caller's)."""
    import llama_cpp.llama_cpp as C

    params = C.llama_model_default_params()
    params.n_gpu_layers = settings.n_gpu_layers
    params.use_extra_bufts = settings.use_extra_bufts
    return params


def load_llama(model_path: str, settings: Settings, **kwargs: Any) -> Any:
    """``llama_cpp.Llama`` with ``settings``. Llama builds its model parameters from
    ``llama_model_default_params()`` and has no keyword for ``use_extra_bufts``, so that function answers
    with the setting applied while this one model loads."""
    import llama_cpp
    import llama_cpp.llama_cpp as C

    real = C.llama_model_default_params

    def defaults() -> Any:
        params = real()
        params.use_extra_bufts = settings.use_extra_bufts
        return params

    C.llama_model_default_params = defaults
    try:
        return llama_cpp.Llama(model_path=model_path, **settings.llama_kwargs(), **kwargs)
    finally:
        C.llama_model_default_params = real


# ---------------------------------------------------------------------------------------------
# Child processes: stage marks for crash reports, and the one fault-injection seam for missing hardware.

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


def instrument() -> None:
    """Wrap the engine's load and decode calls (in a child process only): each new stage is marked, and with
    ``AUTOTUNE_FAKE_AMX_CRASH=1`` multi-token batches crash on models loaded with extra buffers on."""
    import llama_cpp
    import llama_cpp.llama_cpp as C

    fake = os.environ.get(FAKE_AMX_CRASH) == "1"
    with_extra: set[int] = set()
    last = [""]
    real_load, real_decode = C.llama_model_load_from_file, C.llama_decode

    def load(path: bytes, params: Any) -> Any:
        last[0] = ""
        mark("loading the model" + (" (extra buffer types on)" if params.use_extra_bufts else ""))
        model = real_load(path, params)
        if model and params.use_extra_bufts:
            with_extra.add(model)
        return model

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
        module.llama_decode = decode


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
    stages = [ln[len(STAGE_MARK):] for ln in lines if ln.startswith(STAGE_MARK)]
    phases = [ln[len(PHASE_MARK):] for ln in lines if ln.startswith(PHASE_MARK)]
    engine_lines = [ln for ln in lines if not ln.startswith((STAGE_MARK, PHASE_MARK))]
    parts = [f"during {stages[-1]}" + (f" ({phases[-1]})" if phases else "")] if stages else []
    buffers = [f"{m.group(1)} {float(m.group(2)):,.1f} MiB" for ln in engine_lines if (m := _BUFFER_LINE.search(ln))]
    if buffers:
        parts.append("model buffers " + ", ".join(buffers))
    errors = [ln.strip() for ln in engine_lines if re.search(r"\berror\b|GGML_ASSERT|fault injection", ln, re.I)]
    if errors:
        parts.append(f"engine: {errors[-1]}")
    return "; ".join(parts)


@contextlib.contextmanager
def captured_log(echo: bool = False) -> Iterator[list[str]]:
    """Collect everything the engine logs while the block runs (it reports buffer sizes only there).

    ``echo`` also writes it to stderr, so a parent still sees the last lines if the engine crashes.
    """
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode(errors="replace"))
        if echo:
            sys.stderr.write(lines[-1])

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        # Joined fragments: the engine sometimes logs one line in several calls.
        joined = "".join(lines).splitlines()
        lines[:] = joined
        silence()


_quiet: Any = None


def silence() -> None:
    """Stop the engine writing its log to stderr (callers read what they need through captured_log)."""
    global _quiet
    import llama_cpp

    if _quiet is None:
        _quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))


@dataclass
class BufferReport:
    """Buffer sizes the engine logged while loading a model and creating a context, in bytes per buffer name."""

    model: dict[str, int] = field(default_factory=dict)  # e.g. {"CPU": ..., "CPU_REPACK": ..., "CUDA0": ...}
    kv: dict[str, int] = field(default_factory=dict)  # KV buffers per device
    kv_k: int = 0
    kv_v: int = 0
    kv_cells: list[int] = field(default_factory=list)  # one entry per cache (two for SWA models)
    compute: dict[str, int] = field(default_factory=dict)
    output: dict[str, int] = field(default_factory=dict)
    weights_total: int = 0  # llama_model_size: all weight bytes wherever they live

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


_MODEL_BUF = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
_KV_BUF = re.compile(r"llama_kv_cache\w*:\s+(\S+) KV buffer size =\s+([\d.]+) MiB")
_KV_SIZE = re.compile(r"size =\s+[\d.]+ MiB \(\s*(\d+) cells.*K \(\w+\):\s+([\d.]+) MiB, V \(\w+\):\s+([\d.]+) MiB")
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
            report.kv_cells.append(int(m.group(1)))
            report.kv_k += round(float(m.group(2)) * MIB)
            report.kv_v += round(float(m.group(3)) * MIB)
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
# Dry run: the engine's no-allocation load, the ground truth for the memory model.


def _dry_run_in_process(model_path: str, settings_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Load ``model_path`` without allocating, then create one context per settings; report the buffers."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    results = []
    with captured_log() as model_lines:
        mparams = model_params(Settings.from_dict(settings_list[0]) if settings_list else Settings())
        mparams.no_alloc = True
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE  # mmap together with no_alloc aborts
        model = llama_cpp.llama_model_load_from_file(model_path.encode(), mparams)
    if not model:
        return [{"error": last_error(model_lines) or "the engine could not load the model"}]
    weights_total = int(llama_cpp.llama_model_size(model))
    model_report = parse_buffers(model_lines)
    try:
        for data in settings_list:
            s = Settings.from_dict(data)
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = s.n_ctx
            cparams.n_batch = s.n_batch
            cparams.n_ubatch = s.n_ubatch
            cparams.n_threads = s.n_threads
            cparams.n_threads_batch = s.n_threads_batch
            cparams.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            kwargs = s.llama_kwargs()
            cparams.type_k = kwargs["type_k"]
            cparams.type_v = kwargs["type_v"]
            cparams.swa_full = s.swa_full
            cparams.offload_kqv = s.offload_kqv
            with captured_log() as lines:
                ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                results.append({"error": last_error(lines) or "the engine refused the context"})
                continue
            report = parse_buffers(lines)
            report.model = model_report.model
            report.weights_total = weights_total
            results.append(report.to_dict())
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
    return results


def dry_run(model_path: str, settings: list[Settings], timeout: float = 300) -> list[BufferReport | str]:
    """The engine's own accounting for each settings, from a child process: a BufferReport, or the
    engine's error line where it refused. All settings must share one model load (n_gpu_layers, use_extra_bufts)."""
    if not settings:
        return []
    if len({(s.n_gpu_layers, s.use_extra_bufts) for s in settings}) > 1:
        raise ValueError("dry_run takes settings with a single n_gpu_layers and use_extra_bufts")
    payload = json.dumps({"model": model_path, "settings": [s.to_dict() for s in settings]})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "autotune.engine", "dry-run"],
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ModelError(f"{model_path}: the engine's dry run did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        raise ModelError(f"{model_path}: the engine's dry run failed: {child_failure(done.returncode, done.stderr)}")
    out: list[BufferReport | str] = []
    for item in json.loads(done.stdout.strip().splitlines()[-1]):
        if "error" in item:
            out.append(item["error"])
        else:
            out.append(BufferReport(**item))
    if len(out) == 1 and len(settings) > 1 and isinstance(out[0], str):
        raise ModelError(f"{model_path}: the engine could not load the model: {out[0]}")
    return out


# ---------------------------------------------------------------------------------------------
# Real load: the weight buffers the dry run cannot see (CPU_Mapped, CPU_REPACK, ...).


def loaded_buffers(model_path: str, settings: Settings = Settings(), timeout: float = 300) -> dict[str, int]:
    """Model buffer sizes from a real engine load with ``settings`` (placement, mmap, extra buffer types), in a
    child process. It maps the file and repacks for real, so keep it to models that fit this machine."""
    payload = json.dumps({"model": model_path, "settings": settings.to_dict()})
    try:
        done = subprocess.run([sys.executable, "-m", "autotune.engine", "load"], input=payload,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ModelError(f"{model_path}: loading the model took longer than {timeout:.0f} s") from None
    if done.returncode != 0:
        raise ModelError(f"{model_path}: the engine could not load the model: {child_failure(done.returncode, done.stderr)}")
    return {k: int(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def _load_in_process(model_path: str, settings: Settings) -> dict[str, int]:
    import llama_cpp

    llama_cpp.llama_backend_init()
    with captured_log() as lines:
        params = model_params(settings)
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if settings.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        raise SystemExit(last_error(lines) or "the engine could not load the model")
    llama_cpp.llama_model_free(model)
    return parse_buffers(lines).model


def _main(argv: list[str]) -> int:
    if argv[:1] in (["dry-run"], ["load"]):
        request = json.loads(sys.stdin.read())
        silence()
        instrument()
        if argv[0] == "dry-run":
            print(json.dumps(_dry_run_in_process(request["model"], request["settings"])))
        else:
            print(json.dumps(_load_in_process(request["model"], Settings.from_dict(request["settings"]))))
        return 0
    print("usage: python -m autotune.engine dry-run|load < request.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
