"""The baselines: what a user would run without us (their own command line, llama.cpp's defaults, the engine's,
the probe's sensible config), each placed on this machine's GPUs by its own rule. A study measures them as its
first trials, so a search never reports less than what the user already has.
"""

from __future__ import annotations

from .. import engine
from ..facts.gguf_model import ModelFacts
from ..facts.probe import Hardware
from ..vocabulary.errors import EngineDied
from ..vocabulary.settings import Settings
from . import space
from .request import StudyRequest


def sensible(hw: Hardware, facts: ModelFacts, n_ctx: int) -> Settings:
    """The probe's advice without measuring: physical cores, flash attention, everything on the GPU."""
    return Settings(
        n_ctx=n_ctx,
        n_threads=hw.physical_cores,
        n_threads_batch=hw.logical_cores,
        flash_attn=True,
        n_gpu_layers=facts.n_layer + 1 if hw.offload_gpus else 0,
    )


def baselines(req: StudyRequest) -> list[tuple[str, Settings]]:
    """What a user would run without us, each with the user's pins: the command line they run today (when
    given), llama.cpp's own tools' defaults (the first trial, so a search never reports less), the engine's
    defaults and the probe's sensible config. On GPUs each gets its own placement, decided by the memory model at
    its own settings (``placed``): llama.cpp's defaults the one its --fit picks, and beside them "max layers on
    the GPU", what LM Studio and KoboldCpp users do. One config under two names is measured once, under the
    first."""
    mine = req.engine.defaults(req.n_ctx).replace(**req.pins)
    llama = engine.llama_cpp_defaults(req.n_ctx).replace(**req.pins)
    named = (
        ([("your command line", req.start)] if req.start is not None else [])
        + ([("llama.cpp defaults", placed(req, llama, "fit"))] if llama != mine else [])
        + (  # an external llama.cpp tool
            [("max layers on the GPU", placed(req, llama, "max"))] if req.hw.offload_gpus else []
        )
        + [
            ("defaults", placed(req, mine, "fit" if llama == mine else "space")),  # llama.cpp's own: its --fit
            ("sensible", placed(req, sensible(req.hw, req.facts, req.n_ctx).replace(**req.pins))),
        ]
    )
    out: list[tuple[str, Settings]] = []
    for role, s in named:
        if all(s != t for _, t in out):
            out.append((role, s))
    return out


PLACEMENT_KNOBS = ("n_gpu_layers", "n_cpu_moe", "moe_host_from", "moe_host_layers", "n_cpu_ffn")


def placed(req: StudyRequest, s: Settings, rule: str = "space") -> Settings:
    """``s`` with its own placement on this machine's GPUs, from the memory model at ``s``'s own cache and
    micro-batch (never another config's): ``fit``, llama.cpp's --fit (``space.llama_fit``); ``max``, the most
    layers with no overrides (``space.max_layers``); ``space``, the rule the search space uses. Without GPUs, or
    where the user pinned the placement, ``s`` as it is; where the memory model cannot tell (its dry run died),
    the space's placement."""
    if not req.hw.offload_gpus or set(PLACEMENT_KNOBS) & set(req.pins):
        return s
    try:
        if rule == "fit":
            where = space.llama_fit(req.facts, req.hw, s)[0]
        elif rule == "max":
            where = space.max_layers(req.facts, req.hw, s)
        else:
            where = space.gpu_placement(req.facts, req.hw, s)[0] or req.space.placement
    except EngineDied:
        where = req.space.placement
    return s.replace(**where)
