"""The bundled engine: llama.cpp through llama-cpp-python. The only module that imports ``llama_cpp``.

Parent side (the tuner): build facts, engine defaults, and requests to a child process for everything that
creates a model or a context (dry run, real load, timed run, K/V divergence), read back as JSON. Child side
(``python -m autotune.engine``): the functions named ``_..._in_process`` and ``_measure``/``_divergence``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import resource
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from ..errors import ModelError
from ..gguf_model import EXPERTS
from ..settings import Settings
from . import faults, process
from . import history as history_cache
from .base import (
    REP_MARK,
    BufferReport,
    BuildInfo,
    Measurement,
    OnRep,
    Workload,
    last_error,
    mark,
    parse_buffers,
    prompt_text,
)

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


def model_params(settings: Settings, defaults: Any = None) -> Any:
    """``llama_model_params`` for ``settings`` (placement and buffer types; the load mode is the caller's),
    starting from ``defaults()`` (the engine's ``llama_model_default_params``)."""
    import llama_cpp.llama_cpp as C

    params = (defaults or C.llama_model_default_params)()
    params.n_gpu_layers = settings.n_gpu_layers
    params.use_extra_bufts = settings.use_extra_bufts
    if settings.n_cpu_moe:
        params.tensor_buft_overrides = ctypes.addressof(_experts_on_host(settings.n_cpu_moe))
    return params


@lru_cache(maxsize=16)
def _experts_on_host(n: int) -> Any:
    """llama.cpp's ``--n-cpu-moe n``: a NULL-terminated override list sending the expert tensors of layers
    0..n-1 to the CPU buffer type. Cached, so the array and its pattern strings outlive every load using them."""
    import llama_cpp
    import llama_cpp._ctypes_extensions as ext

    class Override(ctypes.Structure):  # struct llama_model_tensor_buft_override (not bound by llama-cpp-python)
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

    lib_dir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    base = ext.load_shared_library("ggml-base", lib_dir)
    base.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    cpu = base.ggml_backend_cpu_buffer_type()
    array = (Override * (n + 1))()
    for i in range(n):
        array[i].pattern = f"blk\\.{i}{EXPERTS.pattern}".encode()
        array[i].buft = cpu
    return array


def load_llama(model_path: str, settings: Settings, **kwargs: Any) -> Any:
    """``llama_cpp.Llama`` with ``settings``. Llama builds its model parameters from
    ``llama_model_default_params()`` and has no keyword for ``use_extra_bufts``, so that function answers
    with the setting applied while this one model loads."""
    import llama_cpp
    import llama_cpp.llama_cpp as C

    real = C.llama_model_default_params
    C.llama_model_default_params = lambda: model_params(settings, real)
    try:
        return llama_cpp.Llama(model_path=model_path, **settings.llama_kwargs(), **kwargs)
    finally:
        C.llama_model_default_params = real


def defaults(n_ctx: int) -> Settings:
    """What llama-cpp-python does when the user sets nothing but the context: the baseline to beat (the knob
    table's defaults are its own)."""
    return Settings(n_ctx=n_ctx)


def context_params(settings: Settings) -> Any:
    """``llama_context_params`` for ``settings``: the fields ``Llama(...)`` sets from the same keywords."""
    import llama_cpp.llama_cpp as C

    params = C.llama_context_default_params()
    for key, value in settings.llama_kwargs().items():
        if hasattr(params, key):
            setattr(params, key, value)
    params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return params


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


# ---------------------------------------------------------------------------------------------
# Dry run: the engine's no-allocation load, the ground truth for the memory model.


def _dry_run_in_process(model_path: str, settings_list: list[dict[str, Any]]) -> dict[str, Any]:
    """Load ``model_path`` without allocating (once per model-level settings), create one context per settings,
    and report the buffers the engine would allocate."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    results: list[dict[str, Any] | None] = [None] * len(settings_list)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, data in enumerate(settings_list):
        groups.setdefault(load_key(Settings.from_dict(data)), []).append(i)
    for indices in groups.values():
        with captured_log() as model_lines:
            mparams = model_params(Settings.from_dict(settings_list[indices[0]]))
            mparams.no_alloc = True
            mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE  # mmap together with no_alloc aborts
            model = llama_cpp.llama_model_load_from_file(model_path.encode(), mparams)
        if not model:
            for i in indices:
                results[i] = {"error": last_error(model_lines) or "the engine could not load the model"}
            continue
        weights_total = int(llama_cpp.llama_model_size(model))
        model_buffers = parse_buffers(model_lines).model
        try:
            for i in indices:
                with captured_log() as lines:
                    ctx = llama_cpp.llama_init_from_model(model, context_params(Settings.from_dict(settings_list[i])))
                if not ctx:
                    results[i] = {"error": last_error(lines) or "the engine refused the context"}
                    continue
                report = parse_buffers(lines)
                report.model = model_buffers
                report.weights_total = weights_total
                results[i] = report.to_dict()
                llama_cpp.llama_free(ctx)
        finally:
            llama_cpp.llama_model_free(model)
    return {"reports": results}


def load_key(s: Settings) -> tuple[Any, ...]:
    """The settings one model load fixes; contexts with any other settings can share that load."""
    return (s.n_gpu_layers, s.use_extra_bufts, s.n_cpu_moe)


def dry_run(model_path: str, settings: list[Settings], timeout: float = 300) -> list[BufferReport | str]:
    """The engine's own accounting for each settings, from one child process: a BufferReport, or the engine's
    error line where it refused. ModelError when the child dies (some CPUs abort inside the dry run)."""
    if not settings:
        return []
    request = {"mode": "dry-run", "model": model_path, "settings": [s.to_dict() for s in settings]}
    result = _answer(request, timeout, "the engine's dry run failed")
    out: list[BufferReport | str] = []
    for item in result["reports"]:
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
    result = _answer(request, timeout, "the engine could not load the model")
    return {k: int(v) for k, v in result["buffers"].items()}


def _answer(request: dict[str, Any], timeout: float, failed: str) -> dict[str, Any]:
    """The child's result for a request that must succeed; ModelError ("<model>: <failed>: why") otherwise."""
    done = process.spawn(request, timeout)
    if done.timed_out:
        raise ModelError(f"{request['model']}: {failed}: no answer in {timeout:.0f} s")
    if done.result is None or "error" in done.result:
        reason = (done.result or {}).get("error") or done.failure()
        raise ModelError(f"{request['model']}: {failed}: {reason}")
    return done.result


def _load_in_process(model_path: str, settings: Settings) -> dict[str, Any]:
    import llama_cpp

    llama_cpp.llama_backend_init()
    with captured_log() as lines:
        params = model_params(settings)
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if settings.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        return {"error": last_error(lines) or "the engine could not load the model"}
    llama_cpp.llama_model_free(model)
    return {"buffers": parse_buffers(lines).model}


# ---------------------------------------------------------------------------------------------
# Timed runs, measured like llama-bench: load, warm up, then per repetition reset, prefill a fixed prompt
# of P tokens and generate G tokens greedily. Every raw sample is kept.


def measure(model_path: str, settings: Settings, workload: Workload = Workload(), timeout: float = 300.0,
            index: int = 0, on_rep: OnRep | None = None) -> Measurement:
    """Measure ``settings`` on ``model_path`` in a fresh child process. Never raises for engine faults: a
    crash, abort, out-of-memory kill or hang becomes a failed Measurement with a specific reason. ``on_rep``
    may stop the run after any repetition: the Measurement then holds the repetitions that ran."""
    request = {"mode": "measure", "model": model_path, "settings": settings.to_dict(),
               "workload": workload.__dict__, "index": index, "history_dir": history_cache.shared_dir()}
    done = process.spawn(request, timeout, watch_vram=True, on_rep=on_rep)
    if done.stopped:
        return Measurement(settings, True, prefill_tps=[r["prefill"] for r in done.reps],
                           decode_tps=[r["decode"] for r in done.reps], ttft_s=[r["ttft"] for r in done.reps],
                           wall_s=done.wall_s, peak_vram=done.peak_vram, stopped=True)
    if done.timed_out:
        return Measurement(settings, False, f"timeout: no result after {timeout:.0f} s (killed)", wall_s=done.wall_s)
    if done.result is None:
        return Measurement(settings, False, done.failure(), wall_s=done.wall_s)
    if not done.result.get("ok"):
        return Measurement(settings, False, done.result.get("error") or "the engine failed", wall_s=done.wall_s)
    m = Measurement.from_dict({**done.result["measurement"], "settings": settings.to_dict()})
    m.wall_s = done.wall_s
    m.peak_vram = done.peak_vram
    return m


def _peak_rss() -> int:
    """This process's peak resident set, in bytes.

    Linux's ru_maxrss survives exec and so reports the *parent's* peak when that was larger (a tuner
    holding a study easily is); VmHWM belongs to this address space alone. macOS reports bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _measure(request: dict[str, Any]) -> dict[str, Any]:
    settings = Settings.from_dict(request["settings"])
    work = Workload(**request["workload"])
    base_rss = _peak_rss()
    t0 = time.perf_counter()
    with captured_log(echo=True) as lines:
        try:
            draft = None
            if settings.draft_model:
                from .greedy_draft import GreedyDraft

                draft = GreedyDraft(settings.draft_model, settings)
            # With a draft, the library keeps a logits row per evaluated token, but sizes its score array
            # by n_batch unless logits_all is passed: a prompt longer than a batch would overflow it.
            llm = load_llama(request["model"], settings, verbose=True, draft_model=draft, logits_all=draft is not None)
            failure = ""
        except Exception as e:
            failure = str(e) or type(e).__name__
    if failure:
        return {"ok": False, "error": f"the engine refused these settings: {last_error(lines) or failure}"}
    load_s = time.perf_counter() - t0
    buffers = parse_buffers(lines).to_dict()
    faults.after_load(int(request.get("index", 0)))

    text = prompt_text(work.prompt_kind)
    tokens = llm.tokenize(text.encode())
    while len(tokens) < work.prompt_tokens:
        tokens += llm.tokenize(text.encode(), add_bos=False)
    if work.depth + work.prompt_tokens + work.gen_tokens > settings.n_ctx:
        return {"ok": False, "error": f"n_ctx {settings.n_ctx} is smaller than depth + prompt + generated tokens"}
    while len(tokens) < work.depth + work.prompt_tokens:
        tokens += llm.tokenize(text.encode(), add_bos=False)
    history, prompt = tokens[: work.depth], tokens[work.depth: work.depth + work.prompt_tokens]
    fill_s, loaded = 0.0, False
    if history:  # the history every repetition starts from: evaluated once, kept in the cache
        start = time.perf_counter()
        llm.reset()
        saved = None
        if request.get("history_dir") and draft is None:  # a draft keeps a cache of its own
            import llama_cpp

            saved = Path(request["history_dir"]) / history_cache.key(request["model"], settings, history,
                                                                     llama_cpp.__version__)
        loaded = saved is not None and history_cache.load(llm, saved, history)
        if not loaded:
            llm.eval(history)
            if saved is not None:
                history_cache.save(llm, saved, history)
        fill_s = time.perf_counter() - start

    def one_pass(n_prompt: int, n_gen: int) -> tuple[float, float, float, list[int]]:
        # Back to the history: the library drops cache cells past n_tokens before it evaluates the prompt.
        llm.n_tokens = len(history)
        if draft is not None:
            draft.reset()
        out: list[int] = []
        start = time.perf_counter()
        first = start
        for tok in llm.generate(history + prompt[:n_prompt], top_k=1, temp=0.0, repeat_penalty=1.0):
            out.append(int(tok))
            if len(out) == 1:
                first = time.perf_counter()
            if len(out) >= n_gen:
                break
        end = time.perf_counter()
        ttft = first - start
        decode = (len(out) - 1) / (end - first) if len(out) > 1 and end > first else 0.0
        return ttft, n_prompt / ttft, decode, out

    one_pass(min(16, len(prompt)), 2)  # warm-up: page in weights, build graphs
    samples = []
    for _ in range(work.reps):  # each repetition told as it ends: the tuner may stop a clearly bad run
        samples.append(one_pass(len(prompt), work.gen_tokens))
        ttft, prefill, decode, _ = samples[-1]
        sys.stdout.write(REP_MARK + json.dumps({"ttft": ttft, "prefill": prefill, "decode": decode}) + "\n")
        sys.stdout.flush()
    m = {
        "ok": True,
        "error": "",
        "prefill_tps": [s[1] for s in samples],
        "decode_tps": [s[2] for s in samples],
        "ttft_s": [s[0] for s in samples],
        "load_s": load_s,
        "wall_s": 0.0,
        "peak_rss": _peak_rss(),
        "base_rss": base_rss,
        "peak_vram": None,
        "buffers": buffers,
        "draft": draft.stats() if draft is not None else {},
        "output_tokens": samples[-1][3],
        "depth_fill_s": fill_s,
        "history_loaded": loaded,
    }
    return {"ok": True, "measurement": m}


def divergence(model_path: str, pairs: list[tuple[str, str]], base: Settings, n_tokens: int = 256,
               timeout: float = 600.0) -> dict[str, dict[str, float]]:
    """How far each quantized (K, V) cache pair moves the model's next-token distributions from an f16
    cache on the fixed text: top-1 agreement and mean KL(f16 || quantized), keyed "k/v". A pair the engine
    refuses, or every pair when the child dies, is reported with an error."""
    request = {"mode": "divergence", "model": model_path, "settings": base.to_dict(),
               "pairs": [list(p) for p in pairs], "tokens": n_tokens}
    done = process.spawn(request, timeout)
    if done.result is None or not done.result.get("ok"):
        reason = (done.result or {}).get("error") or (f"timeout after {timeout:.0f} s" if done.timed_out
                                                      else done.failure())
        return {f"{k}/{v}": {"error": reason} for k, v in pairs}
    return done.result["divergence"]


def _divergence(request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    base = Settings.from_dict(request["settings"]).replace(flash_attn=True, draft_model=None)
    n = int(request["tokens"])

    def log_probs(type_k: str, type_v: str) -> Any:
        s = base.replace(type_k=type_k, type_v=type_v, n_ctx=max(base.n_ctx, 512))
        mark(f"the {'f16 reference' if (type_k, type_v) == ('f16', 'f16') else f'{type_k}/{type_v}'} cache", phase=True)
        llm = load_llama(request["model"], s, verbose=False, logits_all=True)
        tokens = llm.tokenize(prompt_text("prose").encode())[:n]
        llm.eval(tokens)
        # float32 in place: a 150k-token vocabulary makes these arrays hundreds of MiB, and float64 copies of
        # them took as long as the engine's own passes
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
        llm.close()
        logits -= logits.max(axis=1, keepdims=True)
        logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return logits

    ref = log_probs("f16", "f16")
    p_ref, top_ref = np.exp(ref), ref.argmax(axis=1)
    out: dict[str, dict[str, float]] = {}
    for k, v in request["pairs"]:
        try:
            lp = log_probs(k, v)
        except Exception as e:
            out[f"{k}/{v}"] = {"error": str(e)}
            continue
        top1 = float((lp.argmax(axis=1) == top_ref).mean())
        kl = np.einsum("ij,ij->i", p_ref, np.subtract(ref, lp, out=lp), dtype=np.float64)
        out[f"{k}/{v}"] = {
            "top1_agreement": top1,
            "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()),
            "tokens": int(len(kl)),
        }
    return {"ok": True, "divergence": out}


def serve(request: dict[str, Any]) -> dict[str, Any]:
    """The child's work for one request (``python -m autotune.engine``)."""
    mode = request.get("mode")
    if mode == "dry-run":
        silence()
        return _dry_run_in_process(request["model"], request["settings"])
    if mode == "load":
        silence()
        return _load_in_process(request["model"], Settings.from_dict(request["settings"]))
    if mode == "divergence":
        return _divergence(request)
    return _measure(request)
