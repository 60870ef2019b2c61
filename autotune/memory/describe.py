"""``autotune memory``'s answer in one record: the estimate, what it rests on, and on request the footprint
against context, the largest context per cache type and offload, and the check against the engine (handed in by
the caller: checking runs the engine, which sits above this layer)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..facts.gguf_model import ModelFacts
from ..facts.probe import Hardware
from ..vocabulary.settings import KV_SHORTLIST, Settings
from . import dryrun
from .estimate import beyond_trained, cache_pairs, ctx_sweep, estimate, gpu_engine, max_ctx, replay_gap

Check = Callable[[ModelFacts, Settings, Hardware], dict[str, Any]]  # the engine's figures, as keys of the record


def describe(
    facts: ModelFacts, s: Settings, hw: Hardware, sweep: bool = False, largest: bool = False, check: Check | None = None
) -> dict[str, Any]:
    """The record ``autotune memory --json`` prints (keys are only ever added): ``sweep`` adds the footprint at
    powers of two up to the trained context per K/V type, ``largest`` the largest context per K/V type and GPU
    offload (none, as asked, all), ``check`` what it returns (``search.oracle.check``: the engine's dry run
    beside the estimate and, on a GPU, a real run's peak)."""
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
    out: dict[str, Any] = {"model": facts.path, "architecture": facts.architecture, "notes": notes}
    top = max(facts.n_ctx_train or 131072, s.n_ctx)
    pairs = cache_pairs(KV_SHORTLIST, s.flash_attn)
    started = time.perf_counter()
    out["estimate"] = estimate(facts, s, hw).to_dict()
    if sweep:
        ctxs = [512 * 2**i for i in range(32) if 512 * 2**i < top] + [top]
        out["ctx_sweep"] = ctx_sweep(facts, s, hw, ctxs, [k for k, _ in pairs])
    if largest:
        offloads = sorted({0, s.n_gpu_layers, facts.n_layer + 1} if hw.offload_gpus else {0})
        rows = []
        for tk, tv in pairs:
            for ngl in offloads:
                choice = s.replace(type_k=tk, type_v=tv, n_gpu_layers=ngl)
                best = max_ctx(facts, choice, hw, limit=top)
                total = estimate(facts, choice.replace(n_ctx=best), hw).total if best else None
                rows.append({"type_k": tk, "type_v": tv, "n_gpu_layers": ngl, "max_ctx": best, "total": total})
        out["max_ctx"] = rows
    if check:
        out.update(check(facts, s, hw))
    cost = dryrun.COST
    out["dry_runs"] = {
        "children": cost.runs,
        "settings": cost.settings,
        "seconds": round(cost.seconds, 3),
        "wall_s": round(time.perf_counter() - started, 3),
    }
    return out
