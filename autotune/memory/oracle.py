"""The engine's own figures as the oracle: a prediction beside the engine's no-allocation dry run."""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Sequence

from ..errors import ModelError
from ..gguf_model import ModelFacts
from ..probe import Hardware
from ..settings import Settings
from .estimate import estimate, validate
from .layout import HOST, MIB

COMPONENTS = ("weights", "kv", "compute", "output", "total")


def error_pct(pred: int, real: int) -> float:
    if real == 0:
        return 0.0 if pred == 0 else float("inf")
    return (pred - real) / real * 100


def as_logged(n: int) -> int:
    """``n`` at the resolution of the engine's log (MiB with two decimals), for a like-for-like error."""
    return round(round(n / MIB, 2) * MIB)


def verify(facts: ModelFacts, settings_list: Sequence[Settings], hw: Hardware | None = None) -> list[dict[str, Any]]:
    """Each estimate against a fresh no-allocation dry run of the engine (one child process for all).
    Totals compare what the dry run can see: weights (llama_model_size, every tensor once), KV, compute and
    output; the repack buffer and the fixed overhead are left out of both sides. ``hw`` must describe the machine the engine
    runs on (default: probe it). Rows carry the estimate's source: for an architecture the replay does not
    price, KV, compute and output come from the (cached) dry run and only the weights are predicted."""
    from .. import engine
    from ..probe import probe

    hw = hw or probe(measure_bandwidth=False)
    rows: list[dict[str, Any]] = []
    checked = [validate(s) for s in settings_list]
    for s, report in zip(checked, engine.dry_run(facts.path, checked)):
        row: dict[str, Any] = {"settings": s, "estimate": None, "predicted": None, "engine": None,
                               "error_pct": None, "error": None, "source": None}
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
        # llama_model_size counts every tensor once, whatever buffer holds it (its placement is checked against a
        # real load: the dry run logs weight buffers as zero): compare the tensor table with it.
        pred = {
            "weights": sum(t.n_bytes for t in facts.tensors),
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
        row.update(estimate=e, predicted=pred, source=e.source,
                   error_pct={k: error_pct(seen[k], real[k]) for k in COMPONENTS})
    return rows


def peak(facts: ModelFacts, settings: Settings, hw: Hardware, timeout: float = 300.0) -> dict[str, Any]:
    """A short real run of ``settings`` (a 512-token prompt behind half the context of history, 8 tokens): its
    peak GPU memory (NVML) beside the predicted GPU total and the buffers the engine logged. The run teaches the
    GPU's overhead allowance (``autotune.overhead``) as every run does; the prediction is taken before it."""
    from .. import engine, overhead
    from ..engine import Workload

    predicted = sum(d.total for d in estimate(facts, settings, hw).devices if d.device != HOST)
    prompt = min(512, settings.n_ctx // 4)
    depth = max(0, (settings.n_ctx - prompt - 8) // 2 // 256 * 256)
    m = engine.measure(facts.path, settings, Workload(prompt_tokens=prompt, gen_tokens=8, reps=1, depth=depth),
                       timeout=timeout)
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
