"""A configuration's memory per device against what is free there: ``estimate``, the largest context that fits,
and footprints across contexts and cache types."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from ..errors import ModelError, SettingsError
from ..gguf_model import ModelFacts
from ..probe import Hardware
from ..settings import QUANTIZED_KV, Settings
from .graph import Attn, shape_of
from .graphs import BUILDERS
from .layout import (
    GPU_OVERHEAD,
    HOST,
    HOST_OVERHEAD,
    DeviceMemory,
    MemoryEstimate,
    context,
    kv_buffers,
    placement,
    weight_buffers,
)
from .reserve import compute_buffers

SUPPORTED_ARCHS = tuple(BUILDERS)  # an architecture with a graph builder checked against the engine's dry run


def check_supported(facts: ModelFacts) -> None:
    """ModelError unless this model's graph is one we rebuilt and checked against the engine."""
    if facts.architecture not in SUPPORTED_ARCHS:
        raise ModelError(
            f"{facts.path}: unsupported architecture {facts.architecture!r} for the memory model "
            f"(validated: {', '.join(SUPPORTED_ARCHS)}); use --verify for the engine's own figures"
        )
    names = {t.name for t in facts.tensors}
    if any("_exps" in n or "ffn_gate_inp" in n for n in names):
        raise ModelError(f"{facts.path}: unsupported architecture (mixture-of-experts {facts.architecture}) "
                         "for the memory model")
    if "blk.0.attn_qkv.weight" in names or any(n.endswith((".scale", ".input_scale")) for n in names):
        raise ModelError(f"{facts.path}: unsupported architecture (fused QKV or scaled weights) for the memory model")
    if len(set(facts.n_head_kv)) != 1 or facts.head_dim_k != facts.head_dim_v or min(facts.n_head_kv) < 1:
        raise ModelError(f"{facts.path}: unsupported architecture (per-layer head counts or K/V head sizes differ)")


def validate(settings: Settings) -> Settings:
    """SettingsError for what the engine would refuse; an n_ubatch above n_batch is fine (it is clamped)."""
    found = settings.refusals(can_offload=True)
    if found:
        raise SettingsError(found[0])
    return settings


def estimate(facts: ModelFacts, settings: Settings, hw: Hardware) -> MemoryEstimate:
    """Per-device memory for ``settings`` on ``hw``; pure and fast (no engine, a few ms)."""
    check_supported(facts)
    validate(settings)
    where = placement(facts, settings, hw)
    c = context(facts, settings)
    weights, repack = weight_buffers(facts, settings, hw, where)
    kv, caches = kv_buffers(facts, settings, c, where)
    attn = Attn(settings.flash_attn, settings.type_k, settings.type_v, settings.offload_kqv)
    compute = compute_buffers(shape_of(facts, where), c, attn)
    budgets = {HOST: hw.ram_available}
    budgets.update({f"gpu{g.index}": g.vram_free for g in hw.offload_gpus})
    devices = []
    for dev in (HOST, *where.gpus):
        devices.append(
            DeviceMemory(
                device=dev,
                weights=weights.get(dev, 0),
                repack=repack if dev == HOST else 0,
                kv=kv.get(dev, 0),
                compute=compute.get(dev, 0),
                output=facts.n_vocab * 4 if dev == HOST else 0,  # logits of one sequence, host memory
                overhead=HOST_OVERHEAD if dev == HOST else GPU_OVERHEAD,
                budget=budgets[dev],
            )
        )
    return MemoryEstimate(
        settings=settings,
        devices=tuple(devices),
        kv_caches=caches,
        gpu_layers=sum(d != HOST for d in where.layers),
        output_on_gpu=where.output != HOST,
        n_ctx=c.n_ctx,
        n_ubatch=c.n_ubatch,
        shared_memory=hw.backend == "metal" and bool(where.gpus),
    )


def max_ctx(facts: ModelFacts, settings: Settings, hw: Hardware, limit: int | None = None) -> int:
    """Largest context (a multiple of 256, at most ``limit`` or the trained context) that fits; 0 if none.

    Memory grows with the context, so a binary search over multiples of 256 finds it."""
    top = (limit or facts.n_ctx_train or 131072) // 256
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(facts, settings.replace(n_ctx=mid * 256), hw).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def cache_pairs(kv_types: Iterable[str], flash_attn: bool) -> list[tuple[str, str]]:
    """(type_k, type_v) per cache type; without flash attention a quantized V is impossible, so V stays f16."""
    out = []
    for t in kv_types:
        pair = (t, t) if flash_attn or t not in QUANTIZED_KV else (t, "f16")
        if pair not in out:
            out.append(pair)
    return out


def ctx_sweep(facts: ModelFacts, settings: Settings, hw: Hardware, ctxs: Sequence[int],
              kv_types: Sequence[str]) -> list[dict[str, Any]]:
    """Footprint against context length for each K/V type: one row per (type, context)."""
    rows = []
    for tk, tv in cache_pairs(kv_types, settings.flash_attn):
        for n in ctxs:
            e = estimate(facts, settings.replace(n_ctx=n, type_k=tk, type_v=tv), hw)
            rows.append({
                "n_ctx": e.n_ctx,
                "type_k": tk,
                "type_v": tv,
                "weights": sum(d.weights + d.repack for d in e.devices),
                "kv": e.kv_k + e.kv_v,
                "compute": sum(d.compute for d in e.devices),
                "total": e.total,
                "fits": e.fits,
            })
    return rows
