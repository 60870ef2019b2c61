"""The search space: which knobs exist on this machine for this model, and which values they may take.

Knobs that constrain each other are sampled in a form that cannot be invalid, so no trial is spent on a
configuration the engine would refuse or silently change: ``n_batch`` is ``n_ubatch`` times a factor,
and flash attention with the K/V cache types is one categorical choice of valid combinations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from gguf import GGML_QUANT_SIZES

from .. import memory
from ..facts.gguf_model import ModelFacts
from ..facts.probe import Hardware
from ..memory import fit
from ..vocabulary.errors import EngineDied, EngineRefused, ModelError, SettingsError
from ..vocabulary.knobs import BY_NAME, KNOBS, IntRange, Where
from ..vocabulary.settings import KV_SHORTLIST, QUANTIZED_KV, Settings, coerce, ggml_type, layer_list, row_bytes

BATCH_FACTORS = (1, 2, 4)
MAX_BATCH = 4096  # n_batch beyond this buys nothing a prompt of a few thousand tokens can show
# Layers (or expert layers) below the most the memory model fits that a partial offload still searches: a
# larger micro-batch or an f16 cache may need a few of them back on the host.
SPAN = 4
# Knobs that matter only while layers stay on the host: with every layer on a GPU they are left at the base.
HOST_ONLY = tuple(k.name for k in KNOBS if k.host_only)
# The speeds each search parameter can change: a knob's own (``Knob.moves``), and the joint ones'.
MOVES = {
    **{k.name: k.moves for k in KNOBS},
    "batch_factor": BY_NAME["n_batch"].moves,
    "attention": ("decode", "prefill"),
}


def attention_label(flash_attn: bool, type_k: str, type_v: str) -> str:
    return f"fa-{'on' if flash_attn else 'off'}:{type_k}:{type_v}"


def parse_attention(label: str) -> tuple[bool, str, str]:
    fa, k, v = label.split(":")
    return fa == "fa-on", k, v


def attention_choices(kv_types: tuple[str, ...] = KV_SHORTLIST) -> tuple[str, ...]:
    """Valid (flash attention, K type, V type) combinations: K and V of one type, or a quantized K over
    an f16 V (the only quantized cache without flash attention, which a quantized V needs)."""
    out = []
    for fa in (False, True):
        for k in kv_types:
            for v in dict.fromkeys((k, "f16")):
                if v in QUANTIZED_KV and not fa:
                    continue
                out.append(attention_label(fa, k, v))
    return tuple(out)


def kv_pairs(space: SearchSpace) -> list[tuple[str, str]]:
    """The quantized (K, V) pairs a space may try: what the quality guard must measure."""
    pairs = {parse_attention(c)[1:] for c in space.params.get("attention", ())}
    pairs.add((space.base.type_k, space.base.type_v))
    return sorted(p for p in pairs if p != ("f16", "f16"))


@dataclass(frozen=True)
class SearchSpace:
    """Optuna parameters and how they map onto a Settings; ``base`` holds the context and pinned values."""

    base: Settings
    params: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # name -> choices (ints are ranges)
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Where the memory model put the layers on this machine's GPUs at the space's leanest settings (empty without
    # GPUs), and that choice in words; each baseline is placed at its own settings (``baselines.placed``).
    placement: dict[str, int] = field(default_factory=dict)
    where: str = ""

    def suggest(self, trial: optuna.Trial) -> Settings:
        values: dict[str, Any] = {}
        for name, (low, high) in self.int_ranges.items():
            values[name] = trial.suggest_int(name, low, high)
        for name, choices in self.params.items():
            values[name] = trial.suggest_categorical(name, choices)
        return self.settings_from(values)

    def settings_from(self, values: dict[str, Any]) -> Settings:
        """Settings from Optuna parameter values (a trial's ``params``), over ``base``."""
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if name == "attention":
                fa, k, v = parse_attention(value)
                changes.update(flash_attn=fa, type_k=k, type_v=v)
            elif name == "batch_factor":
                continue
            else:
                changes[name] = value
        s = self.base.replace(**changes)
        if "batch_factor" in values:
            s = s.replace(
                n_batch=min(
                    s.n_ubatch * int(values["batch_factor"]), max(s.n_ctx, s.n_ubatch), max(MAX_BATCH, s.n_ubatch)
                )
            )
        return s

    def params_of(self, s: Settings) -> dict[str, Any]:
        """The Optuna parameter values that produce ``s`` (for enqueuing baseline trials)."""
        out: dict[str, Any] = {}
        for name in self.int_ranges:
            low, high = self.int_ranges[name]
            out[name] = min(max(getattr(s, name), low), high)
        for name, choices in self.params.items():
            if name == "attention":
                value: Any = attention_label(s.flash_attn, s.type_k, s.type_v)
            elif name == "batch_factor":
                value = max(1, s.n_batch // max(1, s.n_ubatch))
            else:
                value = getattr(s, name)
            out[name] = value if value in choices else _nearest(value, choices)
        return out

    def without_kv(self, excluded: set[tuple[str, str]]) -> SearchSpace:
        """The same space minus attention choices whose (K, V) pair failed the quality guard."""
        if "attention" not in self.params:
            return self
        kept = tuple(c for c in self.params["attention"] if parse_attention(c)[1:] not in excluded)
        params = {**self.params, "attention": kept}
        base = self.base
        if len(kept) < 2:
            params.pop("attention")
            fa, k, v = parse_attention(kept[0]) if kept else (base.flash_attn, "f16", "f16")
            base = base.replace(flash_attn=fa, type_k=k, type_v=v)
        return SearchSpace(base, params, dict(self.int_ranges), self.placement, self.where)

    def moving(self, metric: str, base: Settings | None = None) -> SearchSpace:
        """The parameters that can change ``metric`` ("decode" or "prefill"), over ``base`` (default: this
        space's): the others stay at the base's values."""
        return self._where(lambda name: metric in MOVES[name], base or self.base)

    def neutral_to(self, metric: str, base: Settings | None = None) -> SearchSpace:
        """The parameters that cannot change ``metric``, over ``base``: a second stage tunes them for another."""
        return self._where(lambda name: metric not in MOVES[name], base or self.base)

    def _where(self, keep: Any, base: Settings) -> SearchSpace:
        return SearchSpace(
            base,
            {k: v for k, v in self.params.items() if keep(k)},
            {k: v for k, v in self.int_ranges.items() if keep(k)},
            self.placement,
            self.where,
        )

    def describe(self) -> dict[str, Any]:
        return {**{k: list(v) for k, v in self.params.items()}, **{k: list(v) for k, v in self.int_ranges.items()}}


def _repacks(facts: ModelFacts, hw: Hardware, base: Settings) -> bool:
    """Whether the engine would put weights in an extra buffer (AMX, CPU_REPACK) with them on: only then do
    extra buffer types move speed and memory. Where the memory model cannot tell, assume they might."""
    try:
        return memory.estimate(facts, base.replace(use_extra_bufts=True), hw).device(memory.HOST).repack > 0
    except ModelError:
        return True


def _nearest(value: Any, choices: tuple[Any, ...]) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and all(isinstance(c, int) for c in choices):
        return min(choices, key=lambda c: abs(c - value))
    return choices[0]


def parse_pins(items: list[str]) -> dict[str, Any]:
    """``--set name=value`` items into typed Settings values (SettingsError for unknown names or types)."""
    pins: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SettingsError(f"--set expects name=value, got {item!r}")
        name, value = item.split("=", 1)
        pins[name.strip()] = coerce(name.strip(), value.strip())
    return pins


def build_space(
    hw: Hardware,
    facts: ModelFacts,
    n_ctx: int,
    pins: dict[str, Any] | None = None,
    kv_types: tuple[str, ...] = KV_SHORTLIST,
) -> SearchSpace:
    """The knobs worth searching for this model on this machine, minus the ones the user pinned."""
    pins = dict(pins or {})
    # A quantized cache row must hold whole blocks: head dims that are not a multiple of the block size
    # make the engine refuse the context.
    kv_types = tuple(
        t
        for t in kv_types
        if facts.head_dim_k % GGML_QUANT_SIZES[ggml_type(t)][0] == 0
        and facts.head_dim_v % GGML_QUANT_SIZES[ggml_type(t)][0] == 0
    )
    if pins.get("type_v") in QUANTIZED_KV and "flash_attn" not in pins:
        pins["flash_attn"] = True  # the only way a quantized V cache runs; not a choice left to search
    base = Settings(n_ctx=n_ctx, n_threads=hw.physical_cores, n_threads_batch=hw.logical_cores).replace(**pins)
    if "n_ubatch" not in pins:  # a pinned n_batch below the default micro-batch brings it down ...
        base = base.replace(n_ubatch=min(base.n_ubatch, base.n_batch))
    if "n_batch" not in pins:  # ... and a pinned micro-batch above the default batch brings that up
        base = base.replace(n_batch=max(base.n_batch, base.n_ubatch))
    base.check(hw.can_offload)
    ints: dict[str, tuple[int, int]] = {}
    params: dict[str, tuple[Any, ...]] = {}
    here = Where(facts.n_layer, facts.moe_layers, facts.uses_swa, hw.logical_cores, bool(hw.offload_gpus))
    for knob in KNOBS:
        if knob.spec:  # speculation's parameters are the speculation stage's (``speculation``)
            continue
        domain = knob.domain(here) if knob.domain else None
        if isinstance(domain, IntRange):
            ints[knob.name] = (domain.low, domain.high)
        elif domain is not None:
            params[knob.name] = domain
    if "use_extra_bufts" in params and not _repacks(facts, hw, base):
        params.pop("use_extra_bufts")  # no weight would go to an extra buffer here: the knob moves nothing
    placement: dict[str, Any] = {}
    where = ""
    if hw.offload_gpus and not {"n_gpu_layers", "n_cpu_moe"} & set(pins):
        lean = base.replace(n_ubatch=min(params.get("n_ubatch", (base.n_ubatch,))))
        lean = lean.replace(n_batch=lean.n_ubatch, **leanest_attention(attention_choices(kv_types)))
        placement, ranges, where = _gpu_placement(facts, hw, lean)
        # Placement per candidate: llama.cpp's defaults (an f16 cache, micro-batch 512) may need more on the host
        # than the leanest settings do, so the searched range reaches what they need too.
        heavy = lean.replace(flash_attn=True, type_k="f16", type_v="f16", n_ubatch=512, n_batch=512)
        ranges = _reaching(facts, hw, heavy, placement, ranges)
        if "n_ubatch" in params and "n_ubatch" not in pins:
            params["n_ubatch"] = _fitting_ubatches(
                facts, hw, lean.replace(**{**placement, **_most_on_host(ranges)}), params["n_ubatch"]
            )
        base = base.replace(**placement)
        for name in ("n_gpu_layers", "n_cpu_moe"):
            ints.pop(name, None)
        ints.update(ranges)
        if placement.get("n_gpu_layers") == facts.n_layer + 1 and "n_cpu_moe" not in ranges:
            for name in HOST_ONLY:
                params.pop(name, None)
                ints.pop(name, None)
    # Joint encodings, so no trial is spent on what the engine would refuse or clamp.
    params["batch_factor"] = BATCH_FACTORS
    params["attention"] = attention_choices(kv_types)
    for name in pins:
        ints.pop(name, None)
        params.pop(name, None)
        if name in ("flash_attn", "type_k", "type_v"):
            fa, k, v = (
                pins.get("flash_attn", base.flash_attn),
                pins.get("type_k", base.type_k),
                pins.get("type_v", base.type_v),
            )
            allowed = tuple(
                c
                for c in attention_choices((*kv_types, k, v))
                if ("flash_attn" not in pins or parse_attention(c)[0] == fa)
                and ("type_k" not in pins or parse_attention(c)[1] == k)
                and ("type_v" not in pins or parse_attention(c)[2] == v)
            )
            params["attention"] = allowed
        if name == "n_batch":
            params.pop("batch_factor", None)
            if "n_ubatch" in params:
                params["n_ubatch"] = tuple(u for u in params["n_ubatch"] if u <= base.n_batch)
    params = {k: v for k, v in params.items() if len(v) > 1}
    ints = {k: v for k, v in ints.items() if v[1] > v[0]}
    return SearchSpace(base=base, params=params, int_ranges=ints, placement=placement, where=where)


def _most_on_host(ranges: dict[str, tuple[int, int]]) -> dict[str, int]:
    """The searched placement that leaves the GPUs the most room: the most expert layers on the host, the fewest
    layers on the GPU."""
    out = {"n_cpu_moe": ranges["n_cpu_moe"][1]} if "n_cpu_moe" in ranges else {}
    return {**out, "n_gpu_layers": ranges["n_gpu_layers"][0]} if "n_gpu_layers" in ranges else out


def _fitting_ubatches(facts: ModelFacts, hw: Hardware, s: Settings, choices: tuple[int, ...]) -> tuple[int, ...]:
    """The micro-batches (``n_batch`` the same) whose buffers fit at ``s``, the space's roomiest placement and
    leanest cache: a larger one only adds compute buffer, so the others cannot fit in any trial and are pruned
    before one runs. The smallest is always kept."""

    def fits(u: int) -> bool:
        try:
            return memory.estimate(facts, s.replace(n_ubatch=u, n_batch=u), hw).fits
        except (EngineRefused, EngineDied):
            return False

    return tuple(u for u in choices if u == min(choices) or fits(u))


def leanest_attention(choices: tuple[str, ...]) -> dict[str, Any]:
    """The attention choice with the smallest cache (flash attention on among equals: its compute buffer is
    smaller too)."""
    label = min(
        choices, key=lambda c: (sum(row_bytes(t, 32) for t in parse_attention(c)[1:]), not parse_attention(c)[0])
    )
    fa, k, v = parse_attention(label)
    return {"flash_attn": fa, "type_k": k, "type_v": v}


# llama.cpp's --fit keeps this much free on each GPU (common/fit.cpp; -fitt's default, in MiB there).
FIT_MARGIN = 1024 * 2**20


def experts_on_host(facts: ModelFacts, layers: list[int]) -> dict[str, Any]:
    """Settings that keep the experts of ``layers`` in host memory, in the knob table's terms: the first N
    (``n_cpu_moe``), the last N (``moe_host_from``) or a chosen set (``moe_host_layers``)."""
    chosen = sorted(set(layers) & set(facts.moe_layers))
    n, end = len(chosen), max(facts.moe_layers, default=-1) + 1
    if chosen == list(range(n)):
        return {**NO_OVERRIDES, "n_cpu_moe": n}
    if chosen == list(range(end - n, end)):
        return {**NO_OVERRIDES, "n_cpu_moe": n, "moe_host_from": "last"}
    return {**NO_OVERRIDES, "moe_host_layers": layer_list(chosen)}


# Every layer's weights where -ngl puts them: no expert or FFN overrides.
NO_OVERRIDES: dict[str, Any] = {
    name: BY_NAME[name].default_value() for name in ("n_cpu_moe", "moe_host_from", "moe_host_layers", "n_cpu_ffn")
}


def llama_fit(facts: ModelFacts, hw: Hardware, s: Settings, margin: int = FIT_MARGIN) -> tuple[dict[str, Any], str]:
    """Where llama.cpp's ``--fit`` puts the layers for settings ``s`` (common/fit.cpp, one GPU), each candidate
    priced by the memory model: every layer on the GPU when that leaves ``margin`` free; else a dense model's
    most layers that fit (the last ones: -ngl counts from the output layer); else, for a mixture of experts, the
    most layers whose dense part fits with every expert in host memory, and where every dense part fits, the
    experts brought back front to back, so the experts of the LAST layers stay on the host. The context is the
    user's (--fit shrinks only a context left unset). llama.cpp splits one boundary layer (gate/up on the GPU);
    here that layer's experts stay whole on the host. What --fit counts is the engine's buffers, against a GPU's
    free memory (and the user's budget) less the GPU's fixed overhead, which llama-fit-params' own process holds
    when it asks. Returns the placement and how it was made."""
    top = facts.n_layer + 1
    s = s.replace(**NO_OVERRIDES)
    # a GPU's overhead with no layer on it: the fixed part alone (the pool comes with layers)
    fixed = {d.device: d.overhead for d in memory.estimate(facts, s.replace(n_gpu_layers=0), hw).devices}

    def fits(x: Settings) -> bool:
        try:
            est = memory.estimate(facts, x, hw)
        except EngineRefused:
            return False
        return all(
            d.total - d.overhead <= min(d.budget, d.limit or d.budget) - fixed.get(d.device, 0) - margin
            for d in est.devices
            if d.device != memory.HOST
        )

    how = f"--fit as common/fit.cpp does it, priced by autotune's memory model ({margin // 2**20} MiB margin)"
    if fits(s.replace(n_gpu_layers=top)):
        return {"n_gpu_layers": top, **NO_OVERRIDES}, how
    if not facts.moe_layers:
        most = fit.largest(lambda n: fits(s.replace(n_gpu_layers=n)), 0, top)
        return {"n_gpu_layers": most or 0, **NO_OVERRIDES}, how
    every = experts_on_host(facts, list(facts.moe_layers))
    dense = fit.largest(lambda n: fits(s.replace(n_gpu_layers=n, **every)), 0, top) or 0
    if dense < top:
        return {"n_gpu_layers": dense, **every}, how
    last = max(facts.moe_layers) + 1

    def tail(k: int) -> dict[str, Any]:
        return experts_on_host(facts, list(range(last - k, last)))

    k = fit.fewest(lambda k: fits(s.replace(n_gpu_layers=top, **tail(k))), 0, last)
    return {"n_gpu_layers": top, **tail(k if k is not None else last)}, how


def max_layers(facts: ModelFacts, hw: Hardware, s: Settings) -> dict[str, Any]:
    """The "max layers on the GPU" placement, what LM Studio and KoboldCpp users do by hand: the most layers that
    fit (the memory model's own margin) with no expert or FFN overrides."""
    return {"n_gpu_layers": fit.most_layers(facts, hw, s.replace(**NO_OVERRIDES)), **NO_OVERRIDES}


def _reaching(
    facts: ModelFacts, hw: Hardware, heavy: Settings, placement: dict[str, int], ranges: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """``ranges`` widened so that a candidate at ``heavy`` settings has a placement in them that fits: more expert
    layers on the host, or fewer layers on the GPU. A dry run that dies leaves them as they are."""

    def fits(s: Settings) -> bool:
        try:
            return memory.estimate(facts, s, hw).fits
        except EngineRefused:
            return False

    out = dict(ranges)
    try:
        if "n_cpu_moe" in ranges:
            lo, hi = ranges["n_cpu_moe"]
            last = max(facts.moe_layers) + 1
            top = placement["n_gpu_layers"]
            need = fit.fewest(lambda n: fits(heavy.replace(n_gpu_layers=top, n_cpu_moe=n)), lo, last)
            out["n_cpu_moe"] = (lo, max(hi, need if need is not None else hi))
        elif "n_gpu_layers" in ranges:
            lo, hi = ranges["n_gpu_layers"]
            most = fit.largest(lambda n: fits(heavy.replace(n_gpu_layers=n, n_cpu_moe=0)), 0, hi)
            out["n_gpu_layers"] = (min(lo, most if most is not None else lo), hi)
    except EngineDied:
        return ranges
    return out


def gpu_placement(
    facts: ModelFacts, hw: Hardware, s: Settings
) -> tuple[dict[str, int], dict[str, tuple[int, int]], str]:
    """The space's placement rule (``_gpu_placement``) at the settings ``s`` of one candidate."""
    return _gpu_placement(facts, hw, s)


def _gpu_placement(
    facts: ModelFacts, hw: Hardware, lean: Settings
) -> tuple[dict[str, int], dict[str, tuple[int, int]], str]:
    """Where the layers go, from the memory model at the space's leanest settings: every layer on the GPUs where
    the whole model fits (nothing else is searched: a layer on the host only slows decode); else, for a mixture
    of experts, every layer on the GPUs with the fewest expert layers in host memory and a few more searched;
    else the most layers that fit and a few fewer searched. Returns the baselines' placement, the ranges to
    search and the choice in words. A dry run that dies leaves the placement to the knob domains, and says so."""
    top = facts.n_layer + 1

    def fits(s: Settings) -> bool:
        try:
            return memory.estimate(facts, s, hw).fits
        except EngineRefused:
            return False

    try:
        if fits(lean.replace(n_gpu_layers=top, n_cpu_moe=0)):
            return {"n_gpu_layers": top, "n_cpu_moe": 0}, {}, f"all {top} layers on the GPU: the whole model fits"
        if facts.moe_layers:
            last = max(facts.moe_layers) + 1
            least = fit.fewest(lambda n: fits(lean.replace(n_gpu_layers=top, n_cpu_moe=n)), 0, last)
            if least is not None:
                hi = min(last, least + SPAN)
                return (
                    {"n_gpu_layers": top, "n_cpu_moe": least},
                    {"n_cpu_moe": (least, hi)},
                    f"all {top} layers on the GPU, the experts of the first {least}-{hi} layers in host memory",
                )
        most = fit.largest(lambda n: fits(lean.replace(n_gpu_layers=n, n_cpu_moe=0)), 0, top) or 0
    except EngineDied as e:
        return {}, {"n_gpu_layers": (0, top)}, f"not steered by the memory model ({e})"
    lo = max(0, most - SPAN)
    return (
        {"n_gpu_layers": most, "n_cpu_moe": 0},
        {"n_gpu_layers": (lo, most)},
        f"{most} of {top} layers fit on the GPU: {lo}-{most} searched",
    )
