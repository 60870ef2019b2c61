"""``autotune memory``'s answer in one record: the estimate, what it rests on, and on request the footprint
against context, the largest context per cache type and offload, and the check against the engine (handed in by
the caller: checking runs the engine, which sits above this layer)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..facts.gguf_model import ModelFacts
from ..facts.probe import Hardware
from ..vocabulary.settings import KV_SHORTLIST, Settings
from . import dryrun
from .estimate import beyond_trained, cache_pairs, ctx_sweep, estimate, gpu_engine, max_ctx, replay_gap
from .layout import MemoryEstimate


@dataclass(frozen=True)
class SweepPoint:
    """One K/V type at one context: the footprint ``--ctx-sweep`` tabulates."""

    n_ctx: int
    type_k: str
    type_v: str
    weights: int
    kv: int
    compute: int
    total: int
    fits: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "n_ctx": self.n_ctx,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "weights": self.weights,
            "kv": self.kv,
            "compute": self.compute,
            "total": self.total,
            "fits": self.fits,
        }


@dataclass(frozen=True)
class LargestCtx:
    """The largest context that fits one K/V type at one offload (``--max-ctx``); 0 and None where none does."""

    type_k: str
    type_v: str
    n_gpu_layers: int
    max_ctx: int
    total: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "type_k": self.type_k,
            "type_v": self.type_v,
            "n_gpu_layers": self.n_gpu_layers,
            "max_ctx": self.max_ctx,
            "total": self.total,
        }


@dataclass(frozen=True)
class Verified:
    """The estimate beside the engine's dry run, per component (``memory.COMPONENTS``) and per device: None where
    the engine refused the settings (``error`` says why) or the estimate could not price them."""

    predicted: dict[str, int] | None
    engine: dict[str, int] | None
    error_pct: dict[str, float | None] | None
    error: str | None
    devices: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "predicted": self.predicted,
            "engine": self.engine,
            "error_pct": self.error_pct,
            "error": self.error,
            "devices": self.devices,
        }


@dataclass(frozen=True)
class Peak:
    """A short real run's GPU peak beside the predicted GPU total; ``error_pct`` only where the run measured one."""

    ok: bool
    error: str | None
    predicted_gpu: int
    peak_vram: int | None
    gpu_buffers: int | None
    depth: int
    prompt: int
    error_pct: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "error": self.error,
            "predicted_gpu": self.predicted_gpu,
            "peak_vram": self.peak_vram,
            "gpu_buffers": self.gpu_buffers,
            "depth": self.depth,
            "prompt": self.prompt,
        }
        if self.error_pct is not None:
            out["error_pct"] = self.error_pct
        return out


@dataclass(frozen=True)
class Checked:
    """What the engine said (``search.oracle.check``): the dry run per settings and, on a GPU, the real peak."""

    verify: tuple[Verified, ...]
    peak: Peak | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"verify": [v.to_json() for v in self.verify]}
        if self.peak is not None:
            out["peak"] = self.peak.to_json()
        return out


@dataclass(frozen=True)
class DryRunCost:
    """What answering cost: engine dry runs (child processes, settings priced, their seconds) and the wall time."""

    children: int
    settings: int
    seconds: float
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return {"children": self.children, "settings": self.settings, "seconds": self.seconds, "wall_s": self.wall_s}


@dataclass(frozen=True)
class MemoryReport:
    """``autotune memory``'s answer; the optional parts are None where not asked for."""

    model: str
    architecture: str
    notes: tuple[str, ...]
    estimate: MemoryEstimate
    dry_runs: DryRunCost
    ctx_sweep: tuple[SweepPoint, ...] | None = None
    max_ctx: tuple[LargestCtx, ...] | None = None
    check: Checked | None = None

    def to_json(self) -> dict[str, Any]:
        """The record ``autotune memory --json`` prints (stable: keys are only ever added)."""
        out: dict[str, Any] = {
            "model": self.model,
            "architecture": self.architecture,
            "notes": list(self.notes),
            "estimate": self.estimate.to_dict(),
        }
        if self.ctx_sweep is not None:
            out["ctx_sweep"] = [p.to_json() for p in self.ctx_sweep]
        if self.max_ctx is not None:
            out["max_ctx"] = [r.to_json() for r in self.max_ctx]
        if self.check is not None:
            out.update(self.check.to_json())
        out["dry_runs"] = self.dry_runs.to_json()
        return out


Check = Callable[[ModelFacts, Settings, Hardware], Checked]  # the engine's figures beside the estimate


def describe(
    facts: ModelFacts, s: Settings, hw: Hardware, sweep: bool = False, largest: bool = False, check: Check | None = None
) -> MemoryReport:
    """The estimate and what was asked for beside it: ``sweep`` adds the footprint at powers of two up to the
    trained context per K/V type, ``largest`` the largest context per K/V type and GPU offload (none, as asked,
    all), ``check`` what it returns (``search.oracle.check``: the engine's dry run beside the estimate and, on a
    GPU, a real run's peak)."""
    notes = [
        n
        for n in (
            beyond_trained(facts, s.n_ctx),
            replay_gap(facts) and f"priced by the engine's own dry run ({replay_gap(facts)})",
        )
        if n
    ]
    if s.n_gpu_layers and not hw.offload_gpus:
        notes.append("no GPU this engine build can offload to: --ngl is ignored, everything stays on the host")
    elif hw.offload_gpus and not gpu_engine(hw):
        notes.append("the GPU split follows llama.cpp's placement rules, priced by a host-only engine (projected)")
    top = max(facts.n_ctx_train or 131072, s.n_ctx)
    pairs = cache_pairs(KV_SHORTLIST, s.flash_attn)
    started = time.perf_counter()
    est = estimate(facts, s, hw)
    points = None
    if sweep:
        ctxs = [512 * 2**i for i in range(32) if 512 * 2**i < top] + [top]
        points = tuple(SweepPoint(**r) for r in ctx_sweep(facts, s, hw, ctxs, [k for k, _ in pairs]))
    rows = None
    if largest:
        offloads = sorted({0, s.n_gpu_layers, facts.n_layer + 1} if hw.offload_gpus else {0})
        rows = tuple(
            _largest(facts, s.replace(type_k=tk, type_v=tv, n_gpu_layers=ngl), hw, top)
            for tk, tv in pairs
            for ngl in offloads
        )
    checked = check(facts, s, hw) if check else None
    cost = dryrun.COST
    spent = DryRunCost(cost.runs, cost.settings, round(cost.seconds, 3), round(time.perf_counter() - started, 3))
    return MemoryReport(facts.path, facts.architecture, tuple(notes), est, spent, points, rows, checked)


def _largest(facts: ModelFacts, choice: Settings, hw: Hardware, top: int) -> LargestCtx:
    best = max_ctx(facts, choice, hw, limit=top)
    total = estimate(facts, choice.replace(n_ctx=best), hw).total if best else None
    return LargestCtx(choice.type_k, choice.type_v, choice.n_gpu_layers, best, total)
