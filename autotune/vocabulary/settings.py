"""The engine settings we tune: one frozen value that the memory model, the engine and every exporter read.

Its fields are the knob table's (``knobs.KNOBS``): names follow llama-cpp-python's ``Llama(...)`` keyword
arguments, types and defaults are the table's, and so is every other tool's spelling. What lives here is
what the engine refuses, which no single knob can tell.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import SettingsError
from .knobs import BY_NAME, DRAFT_KINDS, HOST_ORDERS, KNOBS, SPEC_TYPES

# Cache types the engine accepts for K and V, in the order a search should try them (cheapest last).
KV_TYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "f32")
QUANTIZED_KV = frozenset(t for t in KV_TYPES if t not in ("f16", "bf16", "f32"))
# The cache types the search tries and ``fit``/``memory`` price unless told: f16 and two quantizations, 8-bit and
# 4-bit; the rest of KV_TYPES is taken where a user names it (--set type_k=..., fit --kv).
KV_SHORTLIST: tuple[str, ...] = ("f16", "q8_0", "q4_0")


def ggml_type(name: str) -> GGMLQuantizationType:
    """The ggml type for a cache type name ('q8_0' -> Q8_0); SettingsError for an unknown name."""
    if name not in KV_TYPES:
        raise SettingsError(f"unknown cache type {name!r}: choose one of {', '.join(KV_TYPES)}")
    return GGMLQuantizationType[name.upper()]


def row_bytes(type_name: str, n_elements: int) -> int:
    """Bytes of a row of ``n_elements`` values stored as ``type_name`` (quantized blocks included)."""
    block, size = GGML_QUANT_SIZES[ggml_type(type_name)]
    return n_elements // block * size


def parse_layers(text: str) -> frozenset[int]:
    """A layer set written like "0-11,40-47" (SettingsError, in one sentence, for anything else)."""
    out: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()) or (dash and int(high) < int(low)):
            raise SettingsError(f"moe_host_layers {text!r} is not a layer set like 0-11,40-47")
        out.update(range(int(low), int(high if dash else low) + 1))
    return frozenset(out)


def layer_list(layers: Iterable[int]) -> str:
    """The short form of a layer set, runs joined: {0, 1, 2, 5} -> "0-2,5" (what ``parse_layers`` reads)."""
    runs: list[list[int]] = []
    for i in sorted(set(layers)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _default(name: str) -> Any:
    """The knob table's default for a field: a value, or a factory where the machine decides (threads)."""
    default = BY_NAME[name].default
    return dataclasses.field(default_factory=default) if callable(default) else dataclasses.field(default=default)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One engine configuration, a field per knob (``knobs.KNOBS``, in its order; a test keeps the two equal);
    defaults are the table's: llama-cpp-python's own, except the context length. Written out so that a type
    checker sees every field."""

    n_ctx: int = _default("n_ctx")
    n_gpu_layers: int = _default("n_gpu_layers")
    n_threads: int = _default("n_threads")
    n_threads_batch: int = _default("n_threads_batch")
    n_batch: int = _default("n_batch")
    n_ubatch: int = _default("n_ubatch")
    flash_attn: bool = _default("flash_attn")
    type_k: str = _default("type_k")
    type_v: str = _default("type_v")
    swa_full: bool = _default("swa_full")
    offload_kqv: bool = _default("offload_kqv")
    op_offload: bool = _default("op_offload")
    n_parallel: int = _default("n_parallel")
    kv_unified: bool = _default("kv_unified")
    use_mmap: bool = _default("use_mmap")
    use_mlock: bool = _default("use_mlock")
    use_extra_bufts: bool = _default("use_extra_bufts")
    n_cpu_moe: int = _default("n_cpu_moe")
    moe_host_from: str = _default("moe_host_from")
    moe_host_layers: str = _default("moe_host_layers")
    n_cpu_ffn: int = _default("n_cpu_ffn")
    spec_type: str = _default("spec_type")
    draft_model: str | None = _default("draft_model")
    draft_max: int = _default("draft_max")
    draft_p_min: float = _default("draft_p_min")
    draft_gpu_layers: int = _default("draft_gpu_layers")
    ngram_n: int = _default("ngram_n")
    ngram_m: int = _default("ngram_m")
    ngram_min_hits: int = _default("ngram_min_hits")
    ngram_mod_match: int = _default("ngram_mod_match")
    ngram_mod_min: int = _default("ngram_mod_min")
    ngram_mod_max: int = _default("ngram_mod_max")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def problems(self, can_offload: bool = True) -> list[str]:
        """Contradictions the engine would refuse or silently override, one sentence each."""
        found = self.refusals(can_offload)
        if self.n_ubatch > self.n_batch:
            found.insert(0, f"n_ubatch ({self.n_ubatch}) > n_batch ({self.n_batch}): the engine clamps it")
        return found

    def refusals(self, can_offload: bool = True) -> list[str]:
        """What the engine refuses outright (a clamped value is not among them: the engine runs it)."""
        found = []
        for name in ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in KV_TYPES:
                found.append(f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(KV_TYPES)}")
        if self.type_v in QUANTIZED_KV and not self.flash_attn:
            found.append(f"a quantized V cache ({self.type_v}) needs flash attention: set flash_attn on")
        for name in ("n_gpu_layers", "n_cpu_moe", "n_cpu_ffn"):
            if getattr(self, name) < 0:
                found.append(f"{name} must be 0 or more (got {getattr(self, name)})")
        if self.moe_host_from not in HOST_ORDERS:
            found.append(f"unknown moe_host_from {self.moe_host_from!r}: choose one of {', '.join(HOST_ORDERS)}")
        if self.moe_host_layers:
            try:
                parse_layers(self.moe_host_layers)
            except SettingsError as e:
                found.append(str(e))
        if not can_offload and (self.n_gpu_layers > 0 or self.draft_gpu_layers > 0):
            found.append("GPU layers were asked for, but this engine build cannot offload (CPU-only build)")
        if self.spec_type not in SPEC_TYPES:
            found.append(f"unknown spec_type {self.spec_type!r}: choose one of {', '.join(SPEC_TYPES)}")
        elif self.spec_type in DRAFT_KINDS and self.draft_max < 1:
            found.append(f"speculation with {self.spec_type} needs draft_max of at least 1")
        elif self.spec_type in DRAFT_KINDS and self.spec_type != "draft-mtp" and self.draft_model is None:
            found.append(f"speculation with {self.spec_type} needs a draft model")
        return found

    def experts_on_host(self, moe_layers: Iterable[int]) -> frozenset[int]:
        """The layers whose experts stay in host memory, in a model whose expert layers are ``moe_layers``: the
        chosen set, else the first or the last ``n_cpu_moe`` layers up to the last expert layer. Counted by layer
        index, as llama.cpp's --n-cpu-moe counts: a dense layer among the first N keeps nothing on the host."""
        moe = frozenset(moe_layers)
        if self.moe_host_layers:
            return parse_layers(self.moe_host_layers) & moe
        if not moe or self.n_cpu_moe <= 0:
            return frozenset()
        end = max(moe) + 1
        span = range(self.n_cpu_moe) if self.moe_host_from == "first" else range(end - self.n_cpu_moe, end)
        return moe & frozenset(span)

    def ffn_on_host(self) -> frozenset[int]:
        """The layers whose dense FFN weights stay in host memory: the first ``n_cpu_ffn`` (llama.cpp --n-cpu-ffn)."""
        return frozenset(range(max(self.n_cpu_ffn, 0)))

    def experts_by_layer(self) -> bool:
        """Whether the experts kept on the host are named layer by layer (-ot), not as llama.cpp's "first N"."""
        return bool(self.moe_host_layers) or (self.moe_host_from != "first" and self.n_cpu_moe > 0)

    def unspeculated(self) -> Settings:
        """These settings without speculation: ``spec_type`` none and every speculation knob at its default."""
        return self.replace(spec_type="none", **{k.name: k.default_value() for k in KNOBS if k.spec})

    def check(self, can_offload: bool = True) -> Settings:
        """Raise SettingsError naming the first contradiction; return self when there is none."""
        found = self.problems(can_offload)
        if found:
            raise SettingsError(found[0])
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_key(self) -> tuple[Any, ...]:
        """The values one model load fixes (the knob table's ``load`` knobs): runs that share them can share it."""
        return tuple(getattr(self, k.name) for k in KNOBS if k.load)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Build from a mapping, refusing unknown keys and wrong types with one clear sentence."""
        unknown = sorted(set(data) - set(BY_NAME))
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**{key: coerce(key, value) for key, value in data.items()})

    def llama_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``llama_cpp.Llama`` (the draft model is wired by the engine; the model
        parameters Llama has no keyword for, ``use_extra_bufts`` and the host placement, by ``engine.native``)."""
        return {k.name: k.llama(getattr(self, k.name)) for k in KNOBS if k.llama is not None}


_BOOL_WORDS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def coerce(name: str, value: Any) -> Any:
    """Turn a value (possibly a command-line string) into the type of Settings field ``name``."""
    if name not in BY_NAME:
        raise SettingsError(f"unknown setting {name!r}: choose one of {', '.join(BY_NAME)}")
    kind = BY_NAME[name].kind
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            return _BOOL_WORDS[str(value).strip().lower()]
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "path":
            return None if value in (None, "", "none") else str(value)
        return str(value)
    except (KeyError, ValueError, TypeError):
        raise SettingsError(f"setting {name} expects {kind}, got {value!r}") from None
