"""The engine child's work, one request at a time: the engine's dry run, a real load, a timed run (measured like
llama-bench: load, warm up, then per repetition prefill a fixed prompt and generate greedily), the K/V cache
divergence, and the libraries in the process. A child may serve several requests and keeps the last model it
loaded, so runs whose load settings match share one load (``process.Worker``).

Runs only in the child (``process.CHILD``), after the engine's library has loaded.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp as L

from ..vocabulary.settings import Settings
from . import history as history_cache
from . import routing
from .base import REP_MARK, Workload, mark, parse_buffers, prompt_text
from .libs import loaded_libraries
from .native import Context, Faults, Model, Refused, silence


class Session:
    """What a child keeps between requests: the faults it injects and the model it loaded last."""

    def __init__(self, faults: Faults | None) -> None:
        self.faults = faults
        self.model: Model | None = None
        self.key: tuple[Any, ...] = ()
        self.base_rss = 0

    def model_for(self, path: str, settings: Settings) -> tuple[Model, float]:
        """The model loaded with ``settings``, loading it (the engine's log echoed) unless it already is; the
        seconds the load took (0 when it was kept)."""
        key = (path, *settings.load_key())
        if self.model is not None and self.key == key:
            return self.model, 0.0
        self.close()
        self.base_rss = _peak_rss()
        start = time.perf_counter()
        self.model = Model(path, settings, echo=True, faults=self.faults)
        self.key = key
        return self.model, time.perf_counter() - start

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None


def serve(request: dict[str, Any], session: Session) -> dict[str, Any]:
    """The child's answer to one request."""
    mode = request.get("mode")
    if mode == "dry-run":
        silence()
        return _dry_run(request["model"], request["settings"], session.faults)
    if mode == "load":
        silence()
        return _load(request["model"], Settings.from_dict(request["settings"]), session.faults)
    if mode == "vocab":
        return _vocab(request["model"], session.faults)
    if mode == "divergence":
        return _divergence(request, session.faults)
    if mode == "libraries":
        return {"ok": True, "libraries": loaded_libraries()}
    if mode == "routing":
        return routing.serve(request)
    return _measure(request, session)


# ---------------------------------------------------------------------------------------------------- dry run


def _dry_run(model_path: str, settings_list: list[dict[str, Any]], faults: Faults | None) -> dict[str, Any]:
    """Load ``model_path`` without allocating (once per load settings), create one context per settings, and
    report the buffers the engine would allocate."""
    L.llama_backend_init()
    results: list[dict[str, Any] | None] = [None] * len(settings_list)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, data in enumerate(settings_list):
        groups.setdefault(Settings.from_dict(data).load_key(), []).append(i)
    for indices in groups.values():
        try:
            model = Model(model_path, Settings.from_dict(settings_list[indices[0]]), alloc=False, faults=faults)
        except Refused as e:
            for i in indices:
                results[i] = {"error": str(e), "load": True}
            continue
        model_buffers = parse_buffers(model.log).model
        try:
            for i in indices:
                try:
                    ctx = Context(model, Settings.from_dict(settings_list[i]))
                except Refused as e:
                    results[i] = {"error": str(e)}
                    continue
                report = parse_buffers(ctx.log)
                report.model = model_buffers
                report.weights_total = model.weights_total
                results[i] = report.to_dict()
                ctx.close()
        finally:
            model.close()
    return {"reports": results}


def _load(model_path: str, settings: Settings, faults: Faults | None) -> dict[str, Any]:
    """A real load: the weight buffers the dry run cannot see (CPU_Mapped, CPU_REPACK, AMX, ...)."""
    L.llama_backend_init()
    try:
        model = Model(model_path, settings, faults=faults)
    except Refused as e:
        return {"error": str(e)}
    model.close()
    return {"buffers": parse_buffers(model.log).model}


def _vocab(model_path: str, faults: Faults | None) -> dict[str, Any]:
    """The vocabulary alone, loaded and used once: where a C++ runtime loaded in the wrong order crashes."""
    silence()
    try:
        model = Model(model_path, Settings(), vocab_only=True, faults=faults)
    except Refused as e:
        return {"error": str(e)}
    n = len(model.tokenize(prompt_text("code")))
    model.close()
    return {"ok": True, "tokens": n, "libraries": loaded_libraries()}


# ---------------------------------------------------------------------------------------------- timed runs


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


def _restart_peak_rss() -> None:
    """Start this request's peak resident set from what is resident now (Linux: clear_refs 5), so a child
    serving several runs reports each run's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _measure(request: dict[str, Any], session: Session) -> dict[str, Any]:
    settings = Settings.from_dict(request["settings"])
    work = Workload(**request["workload"])
    _restart_peak_rss()
    ctx = None
    try:
        model, load_s = session.model_for(request["model"], settings)
        ctx = Context(model, settings, session.faults, echo=True)
    except Refused as e:
        if ctx is not None:
            ctx.close()
        return {"ok": False, "error": f"the engine refused these settings: {e}"}
    try:
        if session.faults is not None:
            session.faults.after_load(int(request.get("index", 0)))
        return _timed(request, settings, work, model, ctx, load_s, session.base_rss)
    finally:
        ctx.close()


def _timed(
    request: dict[str, Any],
    settings: Settings,
    work: Workload,
    model: Model,
    ctx: Context,
    load_s: float,
    base_rss: int,
) -> dict[str, Any]:
    buffers = parse_buffers(model.log + ctx.log).to_dict()
    text = prompt_text(work.prompt_kind)
    tokens = model.tokenize(text)
    if work.depth + work.prompt_tokens + work.gen_tokens > settings.n_ctx:
        return {"ok": False, "error": f"n_ctx {settings.n_ctx} is smaller than depth + prompt + generated tokens"}
    while len(tokens) < work.depth + work.prompt_tokens:
        tokens += model.tokenize(text, add_bos=False)
    history, prompt = tokens[: work.depth], tokens[work.depth : work.depth + work.prompt_tokens]
    fill_s, loaded = 0.0, False
    if history:  # the history every repetition starts from: evaluated once, kept in the cache
        start = time.perf_counter()
        saved = None
        if request.get("history_dir"):
            saved = Path(request["history_dir"]) / history_cache.key(request["model"], settings, history, L.__version__)
        loaded = saved is not None and history_cache.load(ctx, saved, history)
        if not loaded:
            ctx.eval(history)
            if saved is not None:
                history_cache.save(ctx, saved, history)
        fill_s = time.perf_counter() - start

    def one_pass(n_prompt: int, n_gen: int) -> tuple[float, float, float, list[int]]:
        ctx.n_tokens = len(history)  # back to the history: the cache past it is dropped on the next eval
        start = time.perf_counter()
        ctx.eval(prompt[:n_prompt])
        out = [ctx.greedy()]
        first = time.perf_counter()
        while len(out) < n_gen:
            ctx.eval([out[-1]])
            out.append(ctx.greedy())
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
        "output_tokens": samples[-1][3],
        "depth_fill_s": fill_s,
        "history_loaded": loaded,
    }
    return {"ok": True, "measurement": m}


# -------------------------------------------------------------------------------------------- K/V divergence


def _divergence(request: dict[str, Any], faults: Faults | None) -> dict[str, Any]:
    import numpy as np

    base = Settings.from_dict(request["settings"]).replace(flash_attn=True)
    n = int(request["tokens"])
    model = Model(request["model"], base.replace(type_k="f16", type_v="f16"), faults=faults)

    def log_probs(type_k: str, type_v: str) -> Any:
        s = base.replace(type_k=type_k, type_v=type_v, n_ctx=max(base.n_ctx, 512))
        mark(f"the {'f16 reference' if (type_k, type_v) == ('f16', 'f16') else f'{type_k}/{type_v}'} cache", phase=True)
        ctx = Context(model, s, faults)
        try:
            tokens = model.tokenize(prompt_text("prose"))[:n]
            # float32 in place: a 150k-token vocabulary makes these arrays hundreds of MiB, and float64 copies
            # of them took as long as the engine's own passes
            logits = ctx.eval(tokens, all_logits=True)
        finally:
            ctx.close()
        assert logits is not None
        logits -= logits.max(axis=1, keepdims=True)
        logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return logits

    try:
        ref = log_probs("f16", "f16")
        p_ref, top_ref = np.exp(ref), ref.argmax(axis=1)
        out: dict[str, dict[str, Any]] = {}
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
                "tokens": len(kl),
            }
    finally:
        model.close()
    return {"ok": True, "divergence": out}
