"""Synthetic GGUF models written with ``gguf``: small random-weight ones the engine really runs, and
header-only ones of any size (a sparse file) for the engine's no-allocation dry run.

Tests and benchmarks use them to cover shapes this machine cannot hold. The tokenizer is copied from a
real GGUF file, so a synthetic model is vocab-compatible with its donor (a real draft/main pair).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from .gguf_model import FastReader


@dataclass(frozen=True)
class Shape:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 4096
    head_dim: int | None = None  # None: n_embd // n_head
    n_swa: int = 0  # sliding window (gemma3 architecture when set)
    # llama, qwen2 (Q/K/V biases), qwen3 (per-head Q/K norms), gemma3 (those norms and post-norms); any
    # other name gets llama's tensors (a model of an architecture the memory model does not know)
    arch: str = "llama"

    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


# Named shapes of real model families (dimensions only; the weights are never real).
SHAPES = {
    "135m": Shape(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_ctx_train=8192),
    "1b": Shape(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, n_ctx_train=131072),
    "8b": Shape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_ctx_train=131072),
    "14b": Shape(n_layer=40, n_embd=5120, n_head=40, n_head_kv=8, n_ff=13824, n_ctx_train=131072),
    "70b": Shape(n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672, n_ctx_train=131072),
    "gemma3-4b": Shape(
        n_layer=34, n_embd=2560, n_head=8, n_head_kv=4, n_ff=10240, n_ctx_train=131072,
        head_dim=256, n_swa=1024, arch="gemma3",
    ),
    "qwen3-8b": Shape(
        n_layer=36, n_embd=4096, n_head=32, n_head_kv=8, n_ff=12288, n_ctx_train=40960, head_dim=128, arch="qwen3",
    ),
}


def write_model(
    path: str | os.PathLike[str],
    tokenizer_from: str | os.PathLike[str],
    shape: Shape = Shape(),
    weight_type: str = "F16",
    header_only: bool = False,
    seed: int = 0,
    vocab: int | None = None,
) -> Path:
    """Write a model of ``shape`` to ``path`` and return it.

    ``header_only`` writes the metadata and tensor table and extends the file sparsely to its full size:
    the engine's dry run accepts it, and it costs no disk. Otherwise the weights are small random
    numbers (``weight_type`` F16 or F32) and the engine can run the model, producing nonsense text.
    ``vocab`` keeps only the donor's first tokens (and the merges among them): a 49k-token vocabulary
    costs a second or two to write and to read back.
    """
    path = Path(path)
    fields = _tokenizer_fields(Path(tokenizer_from))
    tokens = next(value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens")
    n_vocab = len(tokens) if vocab is None else min(vocab, len(tokens))
    kept = set(tokens[:n_vocab])
    arch = shape.arch
    w = GGUFWriter(path, arch)
    w.add_name(f"synthetic-{arch}-{shape.n_layer}x{shape.n_embd}")
    w.add_file_type(1 if weight_type == "F16" else 0)
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_block_count(shape.n_layer)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(shape.head_dim_)
    w.add_value_length(shape.head_dim_)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if shape.n_swa:
        w.add_sliding_window(shape.n_swa)
    for key, value, kind, sub in fields:
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value[:n_vocab]
        elif key == "tokenizer.ggml.merges" and n_vocab < len(tokens):
            value = [m for m in value if m.replace(" ", "") in kept and all(p in kept for p in m.split(" "))]
        w.add_key_value(key, value, kind, sub_type=sub)

    rng = np.random.default_rng(seed)
    dtype = GGMLQuantizationType[weight_type]
    np_dtype = np.float16 if dtype == GGMLQuantizationType.F16 else np.float32
    e, hd, ff = shape.n_embd, shape.head_dim_, shape.n_ff
    q, kv = shape.n_head * hd, shape.n_head_kv * hd
    tensors: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (n_vocab, e), True)]
    tensors.append(("output_norm.weight", (e,), False))
    for i in range(shape.n_layer):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (e,), False),
            (f"blk.{i}.attn_q.weight", (q, e), True),
            (f"blk.{i}.attn_k.weight", (kv, e), True),
            (f"blk.{i}.attn_v.weight", (kv, e), True),
            (f"blk.{i}.attn_output.weight", (e, q), True),
            (f"blk.{i}.ffn_norm.weight", (e,), False),
            (f"blk.{i}.ffn_gate.weight", (ff, e), True),
            (f"blk.{i}.ffn_up.weight", (ff, e), True),
            (f"blk.{i}.ffn_down.weight", (e, ff), True),
        ]
        if arch == "qwen2":
            tensors += [
                (f"blk.{i}.attn_q.bias", (q,), False),
                (f"blk.{i}.attn_k.bias", (kv,), False),
                (f"blk.{i}.attn_v.bias", (kv,), False),
            ]
        if arch in ("qwen3", "gemma3"):
            tensors += [
                (f"blk.{i}.attn_q_norm.weight", (hd,), False),
                (f"blk.{i}.attn_k_norm.weight", (hd,), False),
            ]
        if arch == "gemma3":
            tensors += [
                (f"blk.{i}.post_attention_norm.weight", (e,), False),
                (f"blk.{i}.post_ffw_norm.weight", (e,), False),
            ]
    data_bytes = 0
    for name, dims, is_matrix in tensors:
        t = dtype if is_matrix else GGMLQuantizationType.F32
        block, size = GGML_QUANT_SIZES[t]
        nbytes = int(np.prod(dims)) // block * size
        if header_only:
            w.add_tensor_info(name, dims, np.dtype(np.float16 if t == GGMLQuantizationType.F16 else np.float32), nbytes, t)
            data_bytes += GGUFWriter.ggml_pad(nbytes, w.data_alignment)
        elif is_matrix:
            w.add_tensor(name, (rng.standard_normal(dims) * 0.02).astype(np_dtype))
        else:  # norms 1, biases 0
            w.add_tensor(name, np.full(dims, 0.0 if name.endswith(".bias") else 1.0, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    if header_only:
        w.write_ti_data_to_file()
        assert w.fout is not None
        out = w.fout[0]
        w.write_padding(out, out.tell())
        data_start = out.tell()
        w.close()
        os.truncate(path, data_start + data_bytes)
    else:
        w.write_tensors_to_file()
        w.close()
    return path


@functools.lru_cache(maxsize=4)
def _read_tokenizer(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, Any, GGUFValueType, Any], ...]:
    """The tokenizer keys of the GGUF file at ``path`` as (key, value, type, array item type)."""
    out = []
    for key, field in FastReader(path).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            out.append((key, field.contents(), field.types[0], sub))
    return tuple(out)


def _tokenizer_fields(donor: Path) -> tuple[tuple[str, Any, GGUFValueType, Any], ...]:
    """``_read_tokenizer`` cached by path, size and mtime: reading a large vocabulary takes seconds."""
    st = donor.stat()
    return _read_tokenizer(str(donor.resolve()), st.st_size, st.st_mtime_ns)
