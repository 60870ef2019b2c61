"""A configuration's memory per device against what is free there: ``estimate``, the largest context that fits,
and footprints across contexts and cache types."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..facts.gguf_model import ModelFacts
from ..facts.probe import Build, Hardware
from ..vocabulary.errors import EngineDied, EngineRefused, SettingsError
from ..vocabulary.settings import QUANTIZED_KV, Settings
from . import dryrun, overhead
from .graph import Attn, shape_of
from .graphs import BUILDERS
from .layout import (
    HOST,
    HOST_OVERHEAD,
    MIB,
    Ctx,
    DeviceMemory,
    KVCache,
    MemoryEstimate,
    Placement,
    context,
    kv_buffers,
    placement,
    weight_buffers,
)
from .reserve import compute_buffers

REPLAY_ARCHS = tuple(BUILDERS)  # architectures whose reserve graph is rebuilt here, checked against the dry run
REPLAY = "replay"
DRY_RUN = "engine dry run"
DRY_RUN_PROJECTED = "engine dry run on the host; GPU split projected by the layer rule"


def replay_gap(facts: ModelFacts) -> str | None:
    """Why the analytic replay cannot price this model (then the engine's dry run does); None if it can."""
    if facts.architecture not in REPLAY_ARCHS:
        return f"no replay of the {facts.architecture!r} graph (replayed: {', '.join(REPLAY_ARCHS)})"
    names = {t.name for t in facts.tensors}
    if facts.n_expert or any("_exps" in n or "ffn_gate_inp" in n for n in names):
        return "mixture-of-experts layers are not replayed"
    if "blk.0.attn_qkv.weight" in names or any(n.endswith((".scale", ".input_scale")) for n in names):
        return "fused QKV or scaled weights are not replayed"
    if len(set(facts.n_head_kv)) != 1 or facts.head_dim_k != facts.head_dim_v or min(facts.n_head_kv) < 1:
        return "per-layer head counts or unequal K/V head sizes are not replayed"
    return None


def beyond_trained(facts: ModelFacts, n_ctx: int) -> str | None:
    """A warning when ``n_ctx`` exceeds the context the model was trained for; None otherwise."""
    if facts.n_ctx_train and n_ctx > facts.n_ctx_train:
        return (
            f"n_ctx {n_ctx:,} is beyond the {facts.n_ctx_train:,} tokens this model was trained for: "
            "it may lose track of text that far back unless it was made for RoPE scaling"
        )
    return None


def validate(settings: Settings) -> Settings:
    """SettingsError for what the engine would refuse; an n_ubatch above n_batch is fine (it is clamped)."""
    found = settings.refusals(can_offload=True)
    if found:
        raise SettingsError(found[0])
    return settings


def gpu_engine(hw: Hardware) -> bool:
    """Whether the engine build answering here (``hw.build``) offloads to this machine's GPUs (not a GPU described
    by a constructed Hardware): then its dry run prices each device's compute and output, as CUDA's graph splits
    make them."""
    return bool(hw.offload_gpus) and hw.build is not None and hw.build.build_info().can_offload


def _build(facts: ModelFacts, hw: Hardware) -> Build:
    """The engine build whose dry run prices ``facts`` on ``hw``; ValueError for a Hardware that names none."""
    if hw.build is None:
        raise ValueError(
            f"{facts.path}: the engine's dry run prices this model, and this Hardware names no engine "
            "build to ask (probe(build), or Hardware(build=...))"
        )
    return hw.build


def replayed(facts: ModelFacts, hw: Hardware) -> bool:
    """Whether the analytic replay prices this model here (else the engine's dry run does)."""
    return replay_gap(facts) is None and not gpu_engine(hw)


def estimate(facts: ModelFacts, settings: Settings, hw: Hardware) -> MemoryEstimate:
    """Per-device memory for ``settings`` on ``hw``: the analytic replay where it is exact (pure, a few ms),
    else the engine's cached dry run (a child process on a miss, a fraction of a second). EngineRefused where
    the engine refuses these settings, EngineDied where its dry run died: that is no answer."""
    validate(settings)
    if replayed(facts, hw):
        return _replayed(facts, settings, hw)
    found = dryrun.figures(facts, [settings], _build(facts, hw))[0]
    if isinstance(found, dryrun.Died):
        hint = "; with extra buffer types off (--no-repack) it may not" if settings.use_extra_bufts else ""
        raise EngineDied(f"{facts.path}: {found.reason}{hint}")
    if isinstance(found, str):
        raise EngineRefused(f"{facts.path}: the engine refuses these settings: {found}")
    return _from_engine(facts, settings, hw, found)


def prefetch(facts: ModelFacts, settings: Sequence[Settings], hw: Hardware) -> None:
    """Ask the engine about many settings in one child process (a no-op where the replay prices them)."""
    if not replayed(facts, hw):
        dryrun.figures(facts, [validate(s) for s in settings], _build(facts, hw))


def _budgets(hw: Hardware) -> dict[str, tuple[int, int | None]]:
    """Each device's free memory and the user's budget there (None: no budget; the host never has one)."""
    budgets: dict[str, tuple[int, int | None]] = {HOST: (hw.ram_available, None)}
    budgets.update({f"gpu{g.index}": (g.vram_free, g.budget) for g in hw.offload_gpus})
    return budgets


def _replayed(facts: ModelFacts, settings: Settings, hw: Hardware) -> MemoryEstimate:
    where = placement(facts, settings, hw)
    c = context(facts, settings)
    weights, repack = weight_buffers(facts, settings, hw, where)
    kv, caches = kv_buffers(facts, settings, c, where)
    attn = Attn(settings.flash_attn, settings.type_k, settings.type_v, settings.offload_kqv)
    compute = compute_buffers(shape_of(facts, where), c, attn)
    output = {HOST: facts.n_vocab * 4}  # logits of one sequence, host memory
    return _assemble(facts, settings, hw, where, c, weights, repack, kv, compute, output, caches, REPLAY)


def _device_of(buffer: str) -> str:
    """The device of an engine buffer name: host memory for CPU, AMX, CPU_REPACK and pinned ``*_Host``
    buffers; "gpuN" for a GPU backend's buffer numbered N (CUDA0, Vulkan1, MTL0)."""
    if buffer.startswith("CPU") or buffer.endswith("_Host") or buffer == "AMX":
        return HOST
    digits = buffer[len(buffer.rstrip("0123456789")) :]
    return f"gpu{int(digits or 0)}"


def _from_engine(facts: ModelFacts, settings: Settings, hw: Hardware, found: dryrun.Figures) -> MemoryEstimate:
    """An estimate from the engine's figures, weights placed from the tensor table. The dry run reports
    each cache's size but not its devices: a cache is split over the devices holding its layers."""
    where = placement(facts, settings, hw)
    c = context(facts, settings)
    weights, repack = weight_buffers(facts, settings, hw, where)
    caches = tuple(KVCache(*cache) for cache in found.kv_caches)
    kv: dict[str, int] = {}
    logged = sum(found.kv.values())  # per device, where the log says (a no-allocation load may log zeros)
    if logged and abs(logged - sum(c.k + c.v for c in caches)) <= 0.01 * MIB * (len(found.kv) + 2 * len(caches)):
        for name, n in found.kv.items():
            kv[_device_of(name)] = kv.get(_device_of(name), 0) + n
    for i, cache in enumerate(caches if not kv else ()):  # else: split over the devices holding its layers
        if len(caches) == 2 and facts.uses_swa:  # the full-attention cache, then the sliding-window one
            layers = [il for il in range(facts.n_layer) if facts.swa_layers[il] == (i == 1)]
        else:
            layers = list(range(facts.n_layer))
        held: dict[str, int] = {}  # layers of this cache per device
        for il in layers:
            dev = where.layers[il] if settings.offload_kqv else HOST
            held[dev] = held.get(dev, 0) + 1
        left = cache.k + cache.v  # shared out in proportion, the rounding remainder to the last device
        for n, (dev, count) in enumerate(held.items(), 1):
            share = left if n == len(held) else (cache.k + cache.v) * count // max(len(layers), 1)
            kv[dev] = kv.get(dev, 0) + share
            left -= share
    compute: dict[str, int] = {}
    output: dict[str, int] = {}
    for name, n in found.compute.items():
        compute[_device_of(name)] = compute.get(_device_of(name), 0) + n
    for name, n in found.output.items():
        output[_device_of(name)] = output.get(_device_of(name), 0) + n
    source = DRY_RUN
    if where.gpus and not any(d != HOST for d in compute):
        # A host-only engine priced this for a machine with GPUs (a constructed Hardware): each GPU holding
        # layers is given the host graph's compute buffer, an allowance not checked against a GPU engine.
        for dev in set(where.layers) | {where.output}:
            if dev != HOST:
                compute[dev] = compute.get(HOST, 0)
        source = DRY_RUN_PROJECTED
    return _assemble(facts, settings, hw, where, c, weights, repack, kv, compute, output, caches, source)


def _assemble(
    facts: ModelFacts,
    settings: Settings,
    hw: Hardware,
    where: Placement,
    c: Ctx,
    weights: dict[str, int],
    repack: int,
    kv: dict[str, int],
    compute: dict[str, int],
    output: dict[str, int],
    caches: tuple[KVCache, ...],
    source: str,
) -> MemoryEstimate:
    budgets = _budgets(hw)
    build = hw.build.build_key() if hw.build else ""  # a described machine's GPUs: nothing learned for them
    fixed = {
        f"gpu{g.index}": overhead.allowance(build, g.name, g.driver, overhead.kind(facts)) for g in hw.offload_gpus
    }  # per GPU model, driver and build
    pool = overhead.pool(facts, settings)  # on each GPU holding layers (their attention and experts run there)
    held = set(where.layers) | {where.output}
    devices = [
        DeviceMemory(
            device=dev,
            weights=weights.get(dev, 0),
            repack=repack if dev == HOST else 0,
            kv=kv.get(dev, 0),
            compute=compute.get(dev, 0),
            output=output.get(dev, 0),
            overhead=HOST_OVERHEAD if dev == HOST else fixed[dev][0] + (pool if dev in held else 0),
            budget=budgets[dev][0],
            limit=budgets[dev][1],
        )
        for dev in (HOST, *where.gpus)
    ]
    return MemoryEstimate(
        settings=settings,
        devices=tuple(devices),
        kv_caches=caches,
        gpu_layers=sum(d != HOST for d in where.layers),
        output_on_gpu=where.output != HOST,
        n_ctx=c.n_ctx,
        n_ubatch=c.n_ubatch,
        shared_memory=hw.backend == "metal" and bool(where.gpus),
        source=source,
        gpu_overhead_learned=bool(where.gpus) and all(fixed[dev][1] for dev in where.gpus),
    )


def max_ctx(
    facts: ModelFacts, settings: Settings, hw: Hardware, limit: int | None = None, keep: int | None = None
) -> int:
    """Largest context (a multiple of 256, at most ``limit`` or the trained context) that fits, keeping
    ``keep`` bytes free per device (None: the default margin); 0 if none. EngineDied (no answer) when the
    engine's dry run dies.

    Memory grows with the context, so the answer is found by narrowing a bracket: one midpoint at a time
    for the replay, 31 points per round (one child process) for the engine's dry run."""
    top = (limit or facts.n_ctx_train or 131072) // 256
    width = 1 if replayed(facts, hw) else 31
    lo, hi = 0, top

    def fits(m: int) -> bool:
        try:
            return estimate(facts, settings.replace(n_ctx=m * 256), hw).fits_keeping(keep)
        except EngineRefused:  # the engine refuses this context: it does not fit either (a death is raised)
            return False

    prefetch(facts, [settings.replace(n_ctx=hi * 256)], hw)
    if hi and fits(hi):  # the common case, the whole range fits: one answer
        return hi * 256
    while lo < hi:  # lo fits (or is 0); nothing above hi fits
        if width == 1:
            points = [(lo + hi + 1) // 2]
        else:
            points = sorted({lo + max(1, (hi - lo) * i // (width + 1)) for i in range(1, width + 1)} | {hi})
        prefetch(facts, [settings.replace(n_ctx=m * 256) for m in points], hw)
        for m in points:
            if not fits(m):
                hi = m - 1
                break
            lo = m
    return lo * 256


def cache_pairs(kv_types: Iterable[str], flash_attn: bool) -> list[tuple[str, str]]:
    """(type_k, type_v) per cache type; without flash attention a quantized V is impossible, so V stays f16."""
    out = []
    for t in kv_types:
        pair = (t, t) if flash_attn or t not in QUANTIZED_KV else (t, "f16")
        if pair not in out:
            out.append(pair)
    return out


def ctx_sweep(
    facts: ModelFacts, settings: Settings, hw: Hardware, ctxs: Sequence[int], kv_types: Sequence[str]
) -> list[dict[str, Any]]:
    """Footprint against context length for each K/V type: one row per (type, context)."""
    rows = []
    pairs = cache_pairs(kv_types, settings.flash_attn)
    prefetch(facts, [settings.replace(n_ctx=n, type_k=tk, type_v=tv) for tk, tv in pairs for n in ctxs], hw)
    for tk, tv in pairs:
        for n in ctxs:
            e = estimate(facts, settings.replace(n_ctx=n, type_k=tk, type_v=tv), hw)
            rows.append(
                {
                    "n_ctx": e.n_ctx,
                    "type_k": tk,
                    "type_v": tv,
                    "weights": sum(d.weights + d.repack for d in e.devices),
                    "kv": e.kv_k + e.kv_v,
                    "compute": sum(d.compute for d in e.devices),
                    "total": e.total,
                    "fits": e.fits,
                }
            )
    return rows
