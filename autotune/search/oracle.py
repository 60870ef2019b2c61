"""The memory model checked against the engine that it predicts: the bundled engine's fresh dry run, real loads
and a short real run's peak beside each estimate (``autotune memory --verify``, the memory tests and benches).
It runs the engine and teaches the memory layer from the peak, so it sits above both; how a prediction is set
beside the engine's figures is ``memory.oracle``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..engine import Workload, bundled
from ..facts.gguf_model import ModelFacts
from ..facts.probe import Hardware, probe
from ..memory import overhead
from ..memory.describe import Checked, Peak, Verified
from ..memory.estimate import estimate, gpu_engine, validate
from ..memory.layout import HOST
from ..memory.oracle import COMPONENTS, as_logged, error_pct, per_device, placed_once
from ..vocabulary.errors import ModelError
from ..vocabulary.settings import Settings


def check(facts: ModelFacts, s: Settings, hw: Hardware) -> Checked:
    """``memory.describe``'s check (``autotune memory --verify``): the engine's dry run beside the estimate and,
    where the engine offloads to this machine's GPUs, a real run's peak."""
    verified = tuple(
        Verified(r["predicted"], r["engine"], r["error_pct"], r["error"], r["devices"]) for r in verify(facts, [s], hw)
    )
    return Checked(verified, peak(facts, s, hw) if gpu_engine(hw) else None)


def verify(
    facts: ModelFacts, settings_list: Sequence[Settings], hw: Hardware | None = None, loads: bool = False
) -> list[dict[str, Any]]:
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
    hw = hw or probe(bundled, measure_bandwidth=False)
    rows: list[dict[str, Any]] = []
    checked = [validate(s) for s in settings_list]
    loaded: dict[Any, dict[str, int]] = {}
    for s, report in zip(checked, bundled.dry_run(facts.path, checked), strict=False):
        row: dict[str, Any] = {
            "settings": s,
            "estimate": None,
            "predicted": None,
            "engine": None,
            "error_pct": None,
            "error": None,
            "source": None,
            "devices": {},
        }
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
            loaded[s.load_key()] = bundled.loaded_buffers(facts.path, s)
        row.update(
            estimate=e,
            predicted=pred,
            source=e.source,
            error_pct={k: error_pct(seen[k], real[k]) for k in COMPONENTS},
            devices=per_device(e, report, loaded.get(s.load_key()) if loads else None),
        )
    return rows


def peak(facts: ModelFacts, settings: Settings, hw: Hardware, timeout: float = 300.0) -> Peak:
    """A short real run of ``settings`` (a 512-token prompt behind half the context of history, 8 tokens): its
    peak GPU memory (NVML) beside the predicted GPU total and the buffers the engine logged. The run teaches the
    GPU's overhead allowance (``memory.overhead``) as the search's runs do; the prediction is taken before it."""
    predicted = sum(d.total for d in estimate(facts, settings, hw).devices if d.device != HOST)
    prompt = min(512, settings.n_ctx // 4)
    depth = max(0, (settings.n_ctx - prompt - 8) // 2 // 256 * 256)
    work = Workload(prompt_tokens=prompt, gen_tokens=8, reps=1, depth=depth)
    m = bundled.measure(facts.path, settings, work, timeout=timeout)
    overhead.learn(bundled.build_key(), facts, m, work)
    return Peak(
        ok=m.ok,
        error=m.error,
        predicted_gpu=predicted,
        peak_vram=m.peak_vram,
        gpu_buffers=overhead.on_gpus(m.buffers) if m.ok else None,
        depth=depth,
        prompt=prompt,
        error_pct=error_pct(predicted, m.peak_vram) if m.ok and m.peak_vram else None,
    )
