"""The engine's own figures as the oracle: how a prediction is set beside the engine's dry run, a real load and a
real run's peak (``search.oracle`` runs the engine and reports with these)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

from ..facts.gguf_model import ModelFacts
from ..facts.probe import Hardware
from ..vocabulary.settings import Settings
from .estimate import _device_of
from .layout import HOST, MIB, TENSOR_ALIGNMENT, pad, placement, weight_buffers

COMPONENTS = ("weights", "kv", "compute", "output", "total")


def error_pct(pred: int, real: int) -> float:
    if real == 0:
        return 0.0 if pred == 0 else float("inf")
    return (pred - real) / real * 100


def as_logged(n: int) -> int:
    """``n`` at the resolution of the engine's log (MiB with two decimals), for a like-for-like error."""
    return round(round(n / MIB, 2) * MIB)


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
            held = engine.setdefault(_device_of(name), {})
            held[part] = held.get(part, 0) + n
    out: dict[str, dict[str, Any]] = {}
    for dev, real in engine.items():
        try:
            d = e.device(dev)
        except KeyError:
            d = None
        every = {"kv": d.kv, "compute": d.compute, "output": d.output, "weights": d.weights + d.repack} if d else {}
        pred = {part: every.get(part, 0) for part in parts}
        real = {k: real.get(k, 0) for k in pred}
        out[dev] = {
            "predicted": pred,
            "engine": real,
            "error_pct": {k: error_pct(as_logged(pred[k]), real[k]) for k in pred},
        }
    return out


def summarize(errors: Iterable[dict[str, float | None]]) -> dict[str, dict[str, float]]:
    """Max and median absolute error (%) per component over verify rows' ``error_pct``."""
    by: dict[str, list[float]] = {}
    for e in errors:
        for k, v in e.items():
            if v is not None:
                by.setdefault(k, []).append(abs(v))
    return {k: {"max": max(v), "median": statistics.median(v), "n": len(v)} for k, v in by.items()}
