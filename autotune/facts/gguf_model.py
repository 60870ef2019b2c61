"""What a GGUF file says about its model, read with the ``gguf`` package and nothing loaded into the engine.

Weight sizes come from the tensor table (exact bytes per tensor), not from parameter-count heuristics,
because the memory model places whole tensors on devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

from ..vocabulary.errors import ModelError
from ..vocabulary.knobs import BY_NAME
from .catalog import cache_dir, sha256_of

GGUF_MAGIC = b"GGUF"
_BLOCK = re.compile(r"^blk\.(\d+)\.")

# Layers that use a sliding window, when the file does not say: llama.cpp's built-in pattern per
# architecture (every n-th layer is a full-attention layer).
SWA_PATTERN_DEFAULT = {"gemma2": 2, "gemma3": 6, "gpt-oss": 2}
# Expert tensors, as llama.cpp's ``--n-cpu-moe`` matches them (common.h, LLM_FFN_EXPS_REGEX).
EXPERTS = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name, e.g. "Q4_K"
    shape: tuple[int, ...]
    n_bytes: int
    layer: int | None  # block index, None for token embedding / output / norms


@dataclass(frozen=True)
class ModelFacts:
    path: str
    file_size: int
    architecture: str
    name: str
    file_type: str
    n_params: int
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer (GQA: fewer KV heads than query heads)
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    n_swa: int  # sliding-window size in tokens, 0 when the model has none
    swa_layers: tuple[bool, ...]  # per layer: uses the sliding window
    vocab_type: str
    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    n_expert: int  # experts per MoE layer (0: a dense model)
    n_expert_used: int
    header_sha256: str  # of the metadata and tensor table: all the engine's dry run reads
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    tokens: tuple[str, ...] = field(repr=False, compare=False)

    @cached_property
    def layer_bytes(self) -> tuple[int, ...]:
        """Exact weight bytes of each repeating block."""
        sizes = [0] * self.n_layer
        for t in self.tensors:
            if t.layer is not None and t.layer < self.n_layer:
                sizes[t.layer] += t.n_bytes
        return tuple(sizes)

    def tensor_bytes(self, name: str) -> int:
        return sum(t.n_bytes for t in self.tensors if t.name == name)

    @property
    def token_embd_bytes(self) -> int:
        return self.tensor_bytes("token_embd.weight")

    @property
    def output_bytes(self) -> int:
        """The output (lm-head) layer: output.weight and output_norm; tied embeddings have no output.weight."""
        return sum(t.n_bytes for t in self.tensors if t.layer is None and t.name.startswith("output"))

    @property
    def tied_embeddings(self) -> bool:
        return not any(t.name == "output.weight" for t in self.tensors)

    @property
    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        """Layers holding expert tensors (what ``n_cpu_moe`` can keep in host memory)."""
        return tuple(sorted({t.layer for t in self.tensors if t.layer is not None and EXPERTS.search(t.name)}))

    @property
    def uses_swa(self) -> bool:
        return self.n_swa > 0 and any(self.swa_layers)

    @property
    def default_ctx(self) -> int:
        """The context every command uses unless told (one rule, for the search, the stages and the CLI): the
        knob table's n_ctx default, or less where the model was trained for less."""
        ctx: int = BY_NAME["n_ctx"].default
        return min(ctx, self.n_ctx_train or ctx)

    def summary(self) -> dict[str, Any]:
        """The JSON shape of ``autotune inspect --json`` (stable: keys are only ever added)."""
        return {
            "path": self.path,
            "file_size": self.file_size,
            "architecture": self.architecture,
            "name": self.name,
            "file_type": self.file_type,
            "n_params": self.n_params,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_ff": self.n_ff,
            "n_head": self.n_head,
            "n_head_kv": list(self.n_head_kv),
            "head_dim_k": self.head_dim_k,
            "head_dim_v": self.head_dim_v,
            "n_ctx_train": self.n_ctx_train,
            "n_swa": self.n_swa,
            "swa_layers": [i for i, s in enumerate(self.swa_layers) if s],
            "experts": {
                "n_expert": self.n_expert,
                "n_expert_used": self.n_expert_used,
                "layers": list(self.moe_layers),
                "bytes": sum(t.n_bytes for t in self.tensors if t.layer is not None and EXPERTS.search(t.name)),
            },
            "vocab": {
                "type": self.vocab_type,
                "size": self.n_vocab,
                "bos_id": self.bos_id,
                "eos_id": self.eos_id,
                "add_bos": self.add_bos,
                "add_eos": self.add_eos,
            },
            "weights": {
                "total_bytes": self.weight_bytes,
                "token_embd_bytes": self.token_embd_bytes,
                "output_bytes": self.output_bytes,
                "tied_embeddings": self.tied_embeddings,
                "layer_bytes": list(self.layer_bytes),
            },
        }


class FastReader(GGUFReader):
    """GGUFReader over a plain array view of its memmap.

    The stock reader slices ``np.memmap`` once per metadata item, and memmap's per-slice bookkeeping makes
    a 150k-token vocabulary take seconds; the same slices of a plain view are several times cheaper.
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def read_facts(path: str | os.PathLike[str]) -> ModelFacts:
    """Read ``path`` as a GGUF model; ModelError (one sentence) for anything that is not a usable one.

    Facts of a file already read (same path, size and mtime) come from a small on-disk cache.
    """
    p = Path(path)
    facts = _cached(p, _FACTS_KIND, lambda: _read_facts(p))
    return facts if isinstance(facts, ModelFacts) and facts.path == str(p) else _read_facts(p)


# The facts' own shape is part of their cache key: a field added or changed makes older pickles misses.
_FACTS_KIND = (
    "facts:"
    + hashlib.sha256(repr([(f.name, str(f.type)) for f in dataclasses.fields(ModelFacts)]).encode()).hexdigest()[:8]
)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The file's sha256 (cached like the facts: hashing a 40 GB model takes minutes)."""
    p = Path(path)
    return str(_cached(p, "sha256", lambda: sha256_of(p)))


def _cached(p: Path, kind: str, compute: Callable[[], Any]) -> Any:
    try:
        st = p.stat()
    except OSError:
        return compute()
    key = hashlib.sha256(f"{kind}|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = cache_dir() / "facts" / f"{key}.pickle"
    try:
        with open(cached, "rb") as f:
            return pickle.load(f)
    except Exception:
        pass
    value = compute()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache only costs speed
    return value


def _read_facts(p: Path) -> ModelFacts:
    if not p.exists():
        raise ModelError(f"{p}: no such file")
    if p.is_dir():
        raise ModelError(f"{p}: is a directory, not a GGUF file")
    size = p.stat().st_size
    if size == 0:
        raise ModelError(f"{p}: empty file (0 bytes)")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"{p}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{p}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = FastReader(p)
    except Exception as e:  # the reader raises whatever numpy raises on a damaged file
        raise ModelError(f"{p}: damaged or truncated GGUF file ({type(e).__name__}: {e})") from None
    try:
        return _facts(p, size, reader)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{p}: malformed GGUF metadata ({type(e).__name__}: {e})") from None


def _facts(p: Path, size: int, reader: GGUFReader) -> ModelFacts:
    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
        f = fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{p}: GGUF file has no general.architecture: not a model file")

    def need(key: str) -> Any:
        value = get(f"{arch}.{key}")
        if value is None:
            raise ModelError(f"{p}: missing {arch}.{key}: cannot describe this model")
        return value

    tensors = []
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise ModelError(f"{p}: truncated tensor data ({t.name} ends at byte {end:,}, file has {size:,})")
        m = _BLOCK.match(t.name)
        tensors.append(
            TensorInfo(
                name=t.name,
                type=GGMLQuantizationType(t.tensor_type).name,
                shape=tuple(int(d) for d in t.shape),
                n_bytes=int(t.n_bytes),
                layer=int(m.group(1)) if m else None,
            )
        )
    # Only what the engine itself requires of every architecture is required here; recurrent models have
    # no attention heads, and per-layer arrays hold 0 for layers without attention.
    n_layer = int(need("block_count"))
    n_embd = int(need("embedding_length"))
    n_head = _first(get(f"{arch}.attention.head_count", 0))
    head_kv = get(f"{arch}.attention.head_count_kv", n_head)
    n_head_kv = tuple(int(h) for h in head_kv) if isinstance(head_kv, list) else (int(head_kv),) * n_layer
    if len(n_head_kv) != n_layer or n_head < 0:
        raise ModelError(f"{p}: inconsistent attention head counts")
    head_dim_k = int(get(f"{arch}.attention.key_length", n_embd // n_head if n_head else 0))
    head_dim_v = int(get(f"{arch}.attention.value_length", n_embd // n_head if n_head else 0))
    n_swa = int(get(f"{arch}.attention.sliding_window", 0) or 0)
    swa_layers = _swa_layers(arch, n_layer, n_swa, get(f"{arch}.attention.sliding_window_pattern"))
    tokens = get("tokenizer.ggml.tokens") or []
    file_type = get("general.file_type")
    try:
        file_type_name = (
            LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"
        )
    except ValueError:
        file_type_name = f"type {file_type}"
    return ModelFacts(
        path=str(p),
        file_size=size,
        architecture=arch,
        name=str(get("general.name", p.stem)),
        file_type=file_type_name,
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=_first(get(f"{arch}.feed_forward_length", 0)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_ctx_train=int(get(f"{arch}.context_length", 0) or 0),
        n_swa=n_swa if any(swa_layers) else 0,
        swa_layers=swa_layers,
        vocab_type=str(get("tokenizer.ggml.model", "none")),
        n_vocab=len(tokens) if tokens else int(get(f"{arch}.vocab_size", 0) or 0),
        bos_id=_opt_int(get("tokenizer.ggml.bos_token_id")),
        eos_id=_opt_int(get("tokenizer.ggml.eos_token_id")),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
        n_expert=int(get(f"{arch}.expert_count", 0) or 0),
        n_expert_used=_first(get(f"{arch}.expert_used_count", 0) or 0),
        header_sha256=_header_sha256(p, int(reader.data_offset), size),
        tensors=tuple(tensors),
        tokens=tuple(tokens),
    )


def _header_sha256(p: Path, data_offset: int, size: int) -> str:
    """sha256 of the bytes before the tensor data, and the file size: a no-allocation dry run reads nothing
    else, so two files with equal digests get equal answers (and a 60 GB file hashes in milliseconds)."""
    h = hashlib.sha256(f"{size}|".encode())
    with open(p, "rb") as f:
        h.update(f.read(data_offset))
    return h.hexdigest()


def _first(value: Any) -> int:
    """Per-layer arrays (some architectures vary heads or FFN size by layer) reduce to their maximum."""
    return int(max(value)) if isinstance(value, list) else int(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _swa_layers(arch: str, n_layer: int, n_swa: int, pattern: Any) -> tuple[bool, ...]:
    """Which layers use the sliding window, following llama.cpp's rule (last of each group is dense)."""
    if n_swa <= 0:
        return (False,) * n_layer
    if isinstance(pattern, list):
        return tuple(bool(x) for x in pattern[:n_layer]) + (False,) * max(0, n_layer - len(pattern))
    n = int(pattern) if pattern is not None else SWA_PATTERN_DEFAULT.get(arch)
    if n is None:
        return (False,) * n_layer
    return tuple(n == 0 or (il % n < n - 1) for il in range(n_layer))
