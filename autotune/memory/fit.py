"""``autotune fit``: the placements that hold a target context on this machine, and how far each stretches.

llama.cpp's ``--fit`` fills memory by one rule (shrink the context, then offload fewer layers, then move
experts to the host) and stops at the first answer. Here every K/V cache type gets its own placements: the
most layers the GPUs hold at the target context, and for a mixture-of-experts model all layers on the GPUs
with the fewest expert layers kept in host memory (those of the last layers, as ``--fit`` chooses). Each row
says what it costs per device at the target, the largest context it allows, and whether the search should
measure it (it holds the target). A GPU budget (``Hardware.with_gpu_budget``) bounds each GPU's whole use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import memory
from ..facts.gguf_model import ModelFacts
from ..facts.probe import Hardware
from ..vocabulary.errors import EngineRefused, FitError, SettingsError
from ..vocabulary.settings import KV_SHORTLIST, Settings


@dataclass(frozen=True)
class Placement:
    settings: Settings  # at the target context
    what: str  # "all on the host", "N of M layers on the GPU", "all layers on the GPU, experts of N on the host"
    estimate: memory.MemoryEstimate | None  # at the target context (None: the engine refuses it)
    max_ctx: int  # the largest context it allows (0: not even 256 tokens)
    holds_target: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "what": self.what,
            "max_ctx": self.max_ctx,
            "holds_target": self.holds_target,
            "estimate": self.estimate.to_dict() if self.estimate else None,
        }


def fit(
    facts: ModelFacts,
    hw: Hardware,
    n_ctx: int | None = None,
    base: Settings = Settings(),
    kv_types: tuple[str, ...] = KV_SHORTLIST,
    keep: int | None = None,
    beyond_trained: bool = False,
) -> list[Placement]:
    """Placements for ``n_ctx`` (default: the trained context) per K/V type, with flash attention on (a
    quantized V cache needs it). ``keep``: bytes left free per device (None: max(512 MiB, 5 %))."""
    trained = facts.n_ctx_train or 4096
    target = n_ctx or trained
    if target > trained and not beyond_trained:
        raise SettingsError(
            f"--ctx {target:,} is beyond the {trained:,} tokens {facts.name} was trained for; "
            "pass --beyond-trained to price it anyway"
        )
    limit = max(target, trained) if beyond_trained else trained
    check_weights(facts, hw, keep)
    rows = []
    for tk, tv in memory.cache_pairs(kv_types, True):
        s = base.replace(n_ctx=target, flash_attn=True, type_k=tk, type_v=tv, n_gpu_layers=0, n_cpu_moe=0)
        for settings, what in placements(facts, hw, s, keep):
            rows.append(_row(facts, hw, settings, what, limit, keep))
    return rows


def check_weights(facts: ModelFacts, hw: Hardware, keep: int | None) -> None:
    """FitError, with the sizes, where the weights alone exceed the room of host memory and the GPUs together
    (each less its margin, a GPU at most its budget): then no placement or context helps, and pricing them would
    only answer "the most is 0 tokens"."""
    host = _room(hw.ram_available, None, keep)
    shared = hw.backend == "metal"  # unified memory: the GPU's room is host RAM, not more of it
    gpu = 0 if shared else sum(max(0, _room(g.vram_free, g.budget, keep)) for g in hw.offload_gpus)
    if facts.weight_bytes <= host + gpu:
        return
    kind = "GPU budget" if any(g.budget is not None for g in hw.offload_gpus) else "GPU memory"
    held = (
        f"{_gib(max(host, 0))} RAM + {_gib(gpu)} {kind}, after the safety margins"
        if hw.offload_gpus and not shared
        else f"{_gib(max(host, 0))} RAM after its safety margin"
    )
    raise FitError(
        f"{facts.name}: the weights alone ({_gib(facts.weight_bytes)}) exceed what this machine can hold ({held})"
    )


def _room(free: int, limit: int | None, keep: int | None) -> int:
    """What the memory model lets a configuration use on a device with ``free`` bytes free (DeviceMemory.room)."""
    return memory.DeviceMemory("", 0, 0, 0, 0, 0, 0, budget=free, limit=limit).room(keep)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _fits(facts: ModelFacts, hw: Hardware, s: Settings, keep: int | None) -> bool:
    try:
        return memory.estimate(facts, s, hw).fits_keeping(keep)
    except EngineRefused:  # the engine refuses this context; a dry run that died is raised, never "no fit"
        return False


def largest(ok: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The largest n in lo..hi with ok(n), for ok true up to some point and false after; None if none."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def placements(facts: ModelFacts, hw: Hardware, s: Settings, keep: int | None = None) -> list[tuple[Settings, str]]:
    """The placements of ``s`` (at its context) that the memory model fits, each with its description: the most
    layers on the GPUs; for a mixture of experts where not every layer fits, also every layer on the GPUs with the
    experts of the fewest last layers in host memory (llama.cpp's --fit order). Each answer is a bisection."""
    if not hw.offload_gpus:
        return [(s, "all on the host")]
    top = facts.n_layer + 1  # the repeating layers and the output layer
    ngl = most_layers(facts, hw, s, keep)
    out = [(s.replace(n_gpu_layers=ngl), f"{ngl} of {top} layers on the GPU")]
    if facts.moe_layers and ngl < top:
        everything = s.replace(n_gpu_layers=top, moe_host_from="last", moe_host_layers="")
        least = fewest(lambda n: _fits(facts, hw, everything.replace(n_cpu_moe=n), keep), 0, len(facts.moe_layers))
        if least is not None:
            out.append(
                (
                    everything.replace(n_cpu_moe=least),
                    f"all layers on the GPU, experts of the last {least} in host memory",
                )
            )
    return out


def most_layers(facts: ModelFacts, hw: Hardware, s: Settings, keep: int | None = None) -> int:
    """The most layers (the output layer counting as one) the GPUs hold with ``s``, keeping ``keep`` bytes free per
    device (None: the default margin); 0 where none fits."""
    return largest(lambda n: _fits(facts, hw, s.replace(n_gpu_layers=n), keep), 0, facts.n_layer + 1) or 0


def fewest(ok: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The smallest n in lo..hi with ok(n), for ok false up to some point and true after; None if none."""
    if not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def _row(facts: ModelFacts, hw: Hardware, s: Settings, what: str, limit: int, keep: int | None) -> Placement:
    try:
        est: memory.MemoryEstimate | None = memory.estimate(facts, s, hw)
    except EngineRefused:
        est = None
    best = memory.max_ctx(facts, s, hw, limit=limit, keep=keep)
    return Placement(s, what, est, best, est is not None and est.fits_keeping(keep))
