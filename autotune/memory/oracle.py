"""The engine's own figures as the oracle: a prediction beside the engine's no-allocation dry run."""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Sequence

from ..facts.gguf_model import ModelFacts
from ..facts.probe import Hardware
from ..vocabulary.errors import ModelError
from ..vocabulary.settings import Settings
from .estimate import _device_of, estimate, validate
from .layout import HOST, MIB, TENSOR_ALIGNMENT, pad, placement, weight_buffers

COMPONENTS = ("weights", "kv", "compute", "output", "total")


def error_pct(pred: int, real: int) -> float:
    if real == 0:
        return 0.0 if pred == 0 else float("inf")
    return (pred - real) / real * 100


def as_logged(n: int) -> int:
    """``n`` at the resolution of the engine's log (MiB with two decimals), for a like-for-like error."""
    return round(round(n / MIB, 2) * MIB)


def verify(facts: ModelFacts, settings_list: Sequence[Settings], hw: Hardware | None = None,
           loads: bool = False) -> list[dict[str, Any]]:
    """Each estimate against a fresh no-allocation dry run of the engine (one child process for all), in total and
    per device. ``hw`` must describe the machine the engine runs on (default: probe it). Rows carry the
    estimate's source: for an architecture the replay does not price, KV, compute and output come from the
    (cached) dry run and only the weights are predicted.

    The dry run loads without mmap (load mode none), so its side is predicted at that load mode: host weights are
    then the tensors' own bytes, not the mapped file range from the first to the last host tensor, which also
    spans the GPU tensors lying between them (what a real mmap load logs as CPU_Mapped, and the +0.3 % to +3.8 %
    seen at partial placements when the two load modes were compared). A no-allocation load logs every weight
    buffer as 0 bytes: per device it shows the KV, compute and output buffers, and for the weights only that every
    tensor is placed once (``weights``: all devices' plain weight bytes, llama_model_size on the engine's side).
    With ``loads`` each distinct model load also runs for real (a child that maps the file, copies GPU layers and
    repacks what it repacks: keep it to what the machine holds) and each device's weight buffers, repack included,
    are compared at the row's own load mode. The fixed overhead is left out of both sides."""
    from .. import engine
    from ..facts.probe import probe

    hw = hw or probe(measure_bandwidth=False)
    rows: list[dict[str, Any]] = []
    checked = [validate(s) for s in settings_list]
    loaded: dict[Any, dict[str, int]] = {}
    for s, report in zip(checked, engine.dry_run(facts.path, checked)):
        row: dict[str, Any] = {"settings": s, "estimate": None, "predicted": None, "engine": None,
                               "error_pct": None, "error": None, "source": None, "devices": {}}
        rows.append(row)
        if isinstance(report, str):
            row["error"] = report
            continue
        real = {
            "weights": report.weights_total,
            "kv": report.kv_k + report.kv_v,
            "compute": sum(report.compute.values()),
            "output": sum(report.output.values()),
        }
        real["total"] = sum(real.values())
        row["engine"] = real
        try:
            e = estimate(facts, s, hw)
        except ModelError as err:
            row["error"] = str(err)
            continue
        pred = {
            "weights": placed_once(facts, s, hw),
            "kv": e.kv_k + e.kv_v,
            "compute": sum(d.compute for d in e.devices),
            "output": sum(d.output for d in e.devices),
        }
        pred["total"] = sum(pred.values())
        seen = {
            "weights": pred["weights"],
            "kv": sum(as_logged(c.k) + as_logged(c.v) for c in e.kv_caches),
            "compute": sum(as_logged(d.compute) for d in e.devices if d.compute),
            "output": as_logged(pred["output"]),
        }
        seen["total"] = sum(seen.values())
        if loads and s.load_key() not in loaded:
            loaded[s.load_key()] = engine.loaded_buffers(facts.path, s)
        row.update(estimate=e, predicted=pred, source=e.source,
                   error_pct={k: error_pct(seen[k], real[k]) for k in COMPONENTS},
                   devices=per_device(e, report, loaded.get(s.load_key()) if loads else None))
    return rows


def placed_once(facts: ModelFacts, s: Settings, hw: Hardware) -> int:
    """Weight bytes on all devices at the dry run's load mode (no mmap, no extra buffers: each tensor at its own
    size), less the output layer's copy of a tied embedding: llama_model_size, when every tensor is placed once."""
    plain = s.replace(use_mmap=False, use_extra_bufts=False)
    where = placement(facts, plain, hw)
    weights, _ = weight_buffers(facts, plain, hw, where)
    copy = 0
    if facts.tied_embeddings and where.output != HOST:
        copy = pad(next(t.n_bytes for t in facts.tensors if t.name == "token_embd.weight"), TENSOR_ALIGNMENT)
    return sum(weights.values()) - copy


def per_device(e: Any, report: Any, buffers: dict[str, int] | None) -> dict[str, dict[str, Any]]:
    """Predicted beside the engine's buffers on each device: KV, compute and output from the dry run, and the
    weights (repack included) from a real load's ``buffers`` where given. A part the engine logged as zero
    everywhere (a no-allocation load's per-buffer KV on some builds) is left out. Errors at the log's resolution."""
    engine: dict[str, dict[str, int]] = {d.device: {} for d in e.devices}
    sources = {"kv": report.kv, "compute": report.compute, "output": report.output, "weights": buffers or {}}
    parts = [part for part, named in sources.items() if sum(named.values())]
    for part in parts:
        for name, n in sources[part].items():
            dev = engine.setdefault(_device_of(name), {})
            dev[part] = dev.get(part, 0) + n
    out: dict[str, dict[str, Any]] = {}
    for dev, real in engine.items():
        try:
            d = e.device(dev)
        except KeyError:
            d = None
        every = {"kv": d.kv, "compute": d.compute, "output": d.output, "weights": d.weights + d.repack} if d else {}
        pred = {part: every.get(part, 0) for part in parts}
        real = {k: real.get(k, 0) for k in pred}
        out[dev] = {"predicted": pred, "engine": real,
                    "error_pct": {k: error_pct(as_logged(pred[k]), real[k]) for k in pred}}
    return out


def peak(facts: ModelFacts, settings: Settings, hw: Hardware, timeout: float = 300.0) -> dict[str, Any]:
    """A short real run of ``settings`` (a 512-token prompt behind half the context of history, 8 tokens): its
    peak GPU memory (NVML) beside the predicted GPU total and the buffers the engine logged. The run teaches the
    GPU's overhead allowance (``autotune.memory.overhead``) as the search's runs do; the prediction is taken before it."""
    from .. import engine
    from ..engine import Workload
    from . import overhead

    predicted = sum(d.total for d in estimate(facts, settings, hw).devices if d.device != HOST)
    prompt = min(512, settings.n_ctx // 4)
    depth = max(0, (settings.n_ctx - prompt - 8) // 2 // 256 * 256)
    work = Workload(prompt_tokens=prompt, gen_tokens=8, reps=1, depth=depth)
    m = engine.measure(facts.path, settings, work, timeout=timeout)
    overhead.learn(engine.build_key(), facts, m, work)
    out: dict[str, Any] = {"ok": m.ok, "error": m.error, "predicted_gpu": predicted, "peak_vram": m.peak_vram,
                           "gpu_buffers": overhead.on_gpus(m.buffers) if m.ok else None, "depth": depth,
                           "prompt": prompt}
    if m.ok and m.peak_vram:
        out["error_pct"] = error_pct(predicted, m.peak_vram)
    return out


def summarize(errors: Iterable[dict[str, float | None]]) -> dict[str, dict[str, float]]:
    """Max and median absolute error (%) per component over verify rows' ``error_pct``."""
    by: dict[str, list[float]] = {}
    for e in errors:
        for k, v in e.items():
            if v is not None:
                by.setdefault(k, []).append(abs(v))
    return {k: {"max": max(v), "median": statistics.median(v), "n": len(v)} for k, v in by.items()}
