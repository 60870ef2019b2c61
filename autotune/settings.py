"""The engine settings we tune: one frozen value that the memory model, the engine and every exporter read.

Names follow llama-cpp-python's ``Llama(...)`` keyword arguments so that a ``Settings`` maps onto the
engine without a translation table; ``export`` maps it onto the other tools' flags.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import SettingsError

# Cache types the engine accepts for K and V, in the order a search should try them (cheapest last).
KV_TYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "f32")
QUANTIZED_KV = frozenset(t for t in KV_TYPES if t not in ("f16", "bf16", "f32"))


def ggml_type(name: str) -> GGMLQuantizationType:
    """The ggml type for a cache type name ('q8_0' -> Q8_0); SettingsError for an unknown name."""
    if name not in KV_TYPES:
        raise SettingsError(f"unknown cache type {name!r}: choose one of {', '.join(KV_TYPES)}")
    return GGMLQuantizationType[name.upper()]


def row_bytes(type_name: str, n_elements: int) -> int:
    """Bytes of a row of ``n_elements`` values stored as ``type_name`` (quantized blocks included)."""
    block, size = GGML_QUANT_SIZES[ggml_type(type_name)]
    return n_elements // block * size


def default_threads() -> tuple[int, int]:
    """What llama-cpp-python picks when threads are left unset: half the logical CPUs, and all of them."""
    cpus = os.cpu_count() or 1
    return max(cpus // 2, 1), cpus


@dataclass(frozen=True)
class Settings:
    """One engine configuration. Defaults are llama-cpp-python's own, except the context length."""

    n_ctx: int = 4096
    n_gpu_layers: int = 0
    n_threads: int = dataclasses.field(default_factory=lambda: default_threads()[0])
    n_threads_batch: int = dataclasses.field(default_factory=lambda: default_threads()[1])
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = False
    type_k: str = "f16"
    type_v: str = "f16"
    swa_full: bool = True
    offload_kqv: bool = True
    use_mmap: bool = True
    use_mlock: bool = False
    # Extra weight buffer types (llama.cpp's repack: CPU_REPACK and, on CPUs with AMX, the AMX buffer);
    # off is llama.cpp's --no-repack. Llama(...) has no keyword for it: engine.load_llama sets it.
    use_extra_bufts: bool = True
    # Speculative decoding: a draft model file, how many tokens it proposes per step, its GPU layers.
    draft_model: str | None = None
    draft_max: int = 0
    draft_gpu_layers: int = 0

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
        if self.n_gpu_layers < 0:
            found.append(f"n_gpu_layers must be 0 or more (got {self.n_gpu_layers})")
        if not can_offload and (self.n_gpu_layers > 0 or self.draft_gpu_layers > 0):
            found.append("GPU layers were asked for, but this engine build cannot offload (CPU-only build)")
        if self.draft_model is not None and self.draft_max < 1:
            found.append("a draft model needs draft_max of at least 1")
        return found

    def check(self, can_offload: bool = True) -> Settings:
        """Raise SettingsError naming the first contradiction; return self when there is none."""
        found = self.problems(can_offload)
        if found:
            raise SettingsError(found[0])
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Build from a mapping, refusing unknown keys and wrong types with one clear sentence."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        values = {}
        for key, value in data.items():
            values[key] = coerce(key, value)
        return cls(**values)

    def llama_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``llama_cpp.Llama`` (the draft model is wired by the engine; the model
        parameters Llama has no keyword for, ``use_extra_bufts``, by ``engine.load_llama``)."""
        return {
            "n_ctx": self.n_ctx,
            "n_gpu_layers": self.n_gpu_layers,
            "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads_batch,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "flash_attn": self.flash_attn,
            "type_k": int(ggml_type(self.type_k)),
            "type_v": int(ggml_type(self.type_v)),
            "swa_full": self.swa_full,
            "offload_kqv": self.offload_kqv,
            "use_mmap": self.use_mmap,
            "use_mlock": self.use_mlock,
        }


_BOOL_WORDS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def coerce(name: str, value: Any) -> Any:
    """Turn a value (possibly a command-line string) into the type of Settings field ``name``."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    if name not in fields:
        raise SettingsError(f"unknown setting {name!r}: choose one of {', '.join(fields)}")
    kind = fields[name].type
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            return _BOOL_WORDS[str(value).strip().lower()]
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "str | None":
            return None if value in (None, "", "none") else str(value)
        return str(value)
    except (KeyError, ValueError, TypeError):
        raise SettingsError(f"setting {name} expects {kind}, got {value!r}") from None
