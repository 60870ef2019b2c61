"""Synthetic GGUF models written with ``gguf``: small random-weight ones the engine really runs, and
header-only ones of any size (a sparse file) for the engine's no-allocation dry run.

Tests and benchmarks use them to cover shapes this machine cannot hold. The tokenizer is copied from a
real GGUF file, so a synthetic model is vocab-compatible with its donor (a real draft/main pair). A header-only
mixture of experts holds real data where its routers read (``_write_routing``), so it routes like a trained one.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize

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
    n_swa: int = 0  # sliding window (gemma2, gemma3, gpt-oss)
    # llama, qwen2 (Q/K/V biases), qwen3 (per-head Q/K norms), gemma3 (those norms and post-norms), gemma2,
    # phi3 (fused QKV), qwen3moe, gpt-oss, deepseek2 (MLA with shared experts); any other name gets llama's
    # tensors (a model of an architecture nothing here knows)
    arch: str = "llama"
    n_expert: int = 0  # mixture of experts: experts per layer, of which n_expert_used run per token
    n_expert_used: int = 0
    n_ff_exp: int = 0  # an expert's hidden size
    n_expert_shared: int = 0  # deepseek2: always-on shared experts
    n_dense_lead: int = 0  # deepseek2: leading layers with a dense FFN
    kv_lora_rank: int = 0  # deepseek2 (MLA): the compressed K/V width that is cached
    rope_dim: int = 0  # deepseek2: the rotary part of each head; MLA heads are head_dim (nope + rope) wide
    head_dim_v: int = 0  # deepseek2: value head size (0: head_dim)
    expert_type: str | None = None  # header-only files: the experts' weight type (None: the weight type)
    ssm_state: int = 0  # mamba (recurrent, no attention): the state size per channel (inner size 2 * n_embd)

    @property
    def head_dim_(self) -> int:
        return self.head_dim or (self.n_embd // self.n_head if self.n_head else 0)


# Named shapes of real model families (dimensions only; the weights are never real, the vocabulary is the
# donor's).
SHAPES = {
    "135m": Shape(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_ctx_train=8192),
    "1b": Shape(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, n_ctx_train=131072),
    "8b": Shape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_ctx_train=131072),
    "14b": Shape(n_layer=40, n_embd=5120, n_head=40, n_head_kv=8, n_ff=13824, n_ctx_train=131072),
    "70b": Shape(n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, n_ff=28672, n_ctx_train=131072),
    "gemma3-4b": Shape(
        n_layer=34,
        n_embd=2560,
        n_head=8,
        n_head_kv=4,
        n_ff=10240,
        n_ctx_train=131072,
        head_dim=256,
        n_swa=1024,
        arch="gemma3",
    ),
    "qwen3-8b": Shape(
        n_layer=36,
        n_embd=4096,
        n_head=32,
        n_head_kv=8,
        n_ff=12288,
        n_ctx_train=40960,
        head_dim=128,
        arch="qwen3",
    ),
    "qwen3-30b-a3b": Shape(
        n_layer=48,
        n_embd=2048,
        n_head=32,
        n_head_kv=4,
        n_ff=6144,
        n_ctx_train=40960,
        head_dim=128,
        arch="qwen3moe",
        n_expert=128,
        n_expert_used=8,
        n_ff_exp=768,
    ),
    "gpt-oss-20b": Shape(
        n_layer=24,
        n_embd=2880,
        n_head=64,
        n_head_kv=8,
        n_ff=2880,
        n_ctx_train=131072,
        head_dim=64,
        n_swa=128,
        arch="gpt-oss",
        n_expert=32,
        n_expert_used=4,
        n_ff_exp=2880,
        expert_type="MXFP4",
    ),
    "gemma2-2b": Shape(
        n_layer=26,
        n_embd=2304,
        n_head=8,
        n_head_kv=4,
        n_ff=9216,
        n_ctx_train=8192,
        head_dim=256,
        n_swa=4096,
        arch="gemma2",
    ),
    "phi3-mini": Shape(n_layer=32, n_embd=3072, n_head=32, n_head_kv=32, n_ff=8192, n_ctx_train=4096, arch="phi3"),
    "mamba-130m": Shape(
        n_layer=24, n_embd=768, n_head=0, n_head_kv=0, n_ff=0, n_ctx_train=1048576, arch="mamba", ssm_state=16
    ),
    "deepseek-v2-lite": Shape(
        n_layer=27,
        n_embd=2048,
        n_head=16,
        n_head_kv=1,
        n_ff=10944,
        n_ctx_train=163840,
        head_dim=192,
        arch="deepseek2",
        n_expert=64,
        n_expert_used=6,
        n_ff_exp=1408,
        n_expert_shared=2,
        n_dense_lead=1,
        kv_lora_rank=512,
        rope_dim=64,
        head_dim_v=128,
    ),
}

# The architectures ``write_model`` knows; SHAPES has one of each beyond the dense llama family.
MOE_ARCHS = ("qwen3moe", "gpt-oss", "deepseek2")


def write_model(
    path: str | os.PathLike[str],
    tokenizer_from: str | os.PathLike[str],
    shape: Shape = Shape(),
    weight_type: str = "F16",
    header_only: bool = False,
    seed: int = 0,
    vocab: int | None = None,
    routing: bool = True,
) -> Path:
    """Write a model of ``shape`` to ``path`` and return it.

    ``header_only`` writes the metadata and tensor table and extends the file sparsely to its full size:
    the engine's dry run accepts it, and it costs no disk. Otherwise the weights are small random
    numbers (``weight_type`` F16 or F32) and the engine can run the model, producing nonsense text.
    ``vocab`` keeps only the donor's first tokens (and the merges among them): a 49k-token vocabulary
    costs a second or two to write and to read back.

    ``routing`` (header-only mixture of experts): the little the routers read is real data, written into the
    hole (``_write_routing``), so tokens spread over the experts as in a trained model. Without it every
    weight reads as zero and every token goes to the same experts, which overstates MoE prefill.
    """
    path = Path(path)
    fields = _tokenizer_fields(Path(tokenizer_from))
    tokens = next(value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens")
    n_vocab = len(tokens) if vocab is None else min(vocab, len(tokens))
    kept = set(tokens[:n_vocab])
    arch = shape.arch
    w = GGUFWriter(path, arch)
    # no architecture in the name: llama.cpp's vocabulary loader treats a name containing "phi3" as Phi-3's
    w.add_name(f"synthetic-{shape.n_layer}x{shape.n_embd}")
    w.add_file_type(1 if weight_type == "F16" else 0)
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_block_count(shape.n_layer)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if shape.n_swa:
        w.add_sliding_window(shape.n_swa)
    _arch_keys(w, shape)
    for key, value, kind, sub in fields:
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value[:n_vocab]
        elif key == "tokenizer.ggml.merges" and n_vocab < len(tokens):
            value = [m for m in value if m.replace(" ", "") in kept and all(p in kept for p in m.split(" "))]
        w.add_key_value(key, value, kind, sub_type=sub)

    rng = np.random.default_rng(seed)
    dtype = GGMLQuantizationType[weight_type]
    np_dtype = np.float16 if dtype == GGMLQuantizationType.F16 else np.float32
    data_bytes = 0
    routed: list[Placed] = []
    for name, dims, role in _tensors(shape, n_vocab):
        t = {"vec": GGMLQuantizationType.F32, "exp": GGMLQuantizationType[shape.expert_type or weight_type]}.get(
            role, dtype
        )
        if dims[-1] % GGML_QUANT_SIZES[t][0]:  # rows too short for the type's blocks: a quantizer falls back
            t = GGMLQuantizationType.Q8_0 if dims[-1] % 32 == 0 else GGMLQuantizationType.F16
        block, size = GGML_QUANT_SIZES[t]
        nbytes = int(np.prod(dims)) // block * size
        if header_only:
            w.add_tensor_info(
                name, dims, np.dtype(np.float16 if t == GGMLQuantizationType.F16 else np.float32), nbytes, t
            )
            if routing and shape.n_expert and _routes(name):
                routed.append((name, dims, t, data_bytes))
            data_bytes += GGUFWriter.ggml_pad(nbytes, w.data_alignment)
        elif role == "vec":  # norms 1, biases 0
            w.add_tensor(name, np.full(dims, 0.0 if name.endswith(".bias") else 1.0, dtype=np.float32))
        else:
            w.add_tensor(name, (rng.standard_normal(dims) * 0.02).astype(np_dtype))
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
        _write_routing(path, data_start, routed, seed)
    else:
        w.write_tensors_to_file()
        w.close()
    return path


# ------------------------------------------------------------------------- routing data in a header-only file
# With every weight zero, attention and the experts add nothing: each layer's residual stays the token's
# embedding, and the router reads it through the layer's FFN norm. So a random embedding, unit norms and a random
# router per layer give each layer its own spread of tokens over the experts, as a trained model's routers do;
# with zeros, every router's logits tie and every token picks the same experts in every layer. The experts
# (nearly all the bytes) stay a hole.

Placed = tuple[str, tuple[int, ...], GGMLQuantizationType, int]  # name, numpy-order dims, type, offset in the data

Q = GGMLQuantizationType
_D = 2.0**-8
# Block types written as random bytes: where their float16 scale (and min) fields sit in a block, and the value
# each gets. Small finite scales keep every value finite; each min is set so that a block's values centre on zero
# (x = d*sc*q - dmin*m over uniform random sc, q, m), and each block's scales get a random sign (Q4_0's d*(q - 8)
# leans negative), or every token's embedding would share one direction.
_SCALES: dict[GGMLQuantizationType, tuple[tuple[int, float], ...]] = {
    Q.Q4_0: ((0, _D),),
    Q.Q5_0: ((0, _D),),
    Q.Q8_0: ((0, _D),),
    Q.IQ4_NL: ((0, _D),),
    Q.IQ4_XS: ((0, _D),),
    Q.Q4_1: ((0, _D), (2, -7.5 * _D)),
    Q.Q5_1: ((0, _D), (2, -15.5 * _D)),
    Q.Q2_K: ((80, _D), (82, 1.5 * _D)),
    Q.Q3_K: ((108, _D),),
    Q.Q4_K: ((0, _D), (2, 7.5 * _D)),
    Q.Q5_K: ((0, _D), (2, 15.5 * _D)),
    Q.Q6_K: ((208, _D),),
}


def _routes(name: str) -> bool:
    """Whether the routers' choice depends on this tensor when the rest is zero: the token embedding, the norms
    on the way (all of them: they are small), the routers. Router biases (``ffn_gate_inp.bias``,
    ``exp_probs_b``) may stay zero."""
    return name == "token_embd.weight" or name.endswith(("norm.weight", "ffn_gate_inp.weight"))


def _write_routing(path: Path, data_start: int, placed: list[Placed], seed: int) -> None:
    """Write the routed tensors' data at their places in the file, already at its full size. Each tensor's
    random numbers come from the seed and its name alone: the same file every time."""
    with open(path, "r+b") as f:
        for name, dims, t, offset in placed:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            f.seek(data_start + offset)
            for chunk in _routing_data(name, dims, t, rng):
                f.write(chunk)


def _routing_data(
    name: str, dims: tuple[int, ...], t: GGMLQuantizationType, rng: np.random.Generator
) -> Iterator[bytes]:
    """The bytes of one routed tensor, in chunks of about 16M values (a 150k-token embedding is not held whole):
    norms 1, a router of random rows with logits of about unit spread, an embedding of random rows."""
    rows, cols = int(np.prod(dims[:-1])), dims[-1]
    if name.endswith("norm.weight"):
        yield _encode(np.ones(rows * cols, np.float32), t)
    elif name.endswith("ffn_gate_inp.weight"):
        yield _encode(rng.standard_normal(rows * cols, dtype=np.float32) / np.float32(np.sqrt(cols)), t)
    else:
        step = max(1, (1 << 24) // cols)
        for start in range(0, rows, step):
            yield _random_rows(rng, t, min(step, rows - start), cols)


def _encode(values: np.ndarray, t: GGMLQuantizationType) -> bytes:
    """Float values as a float type's bytes."""
    if t == Q.BF16:
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return values.astype(np.float16 if t == Q.F16 else np.float32).tobytes()


def _random_rows(rng: np.random.Generator, t: GGMLQuantizationType, n_rows: int, n_cols: int) -> bytes:
    """``n_rows`` random rows of type ``t``, finite and centred on zero: float types drawn normal; block types
    in ``_SCALES`` as random bytes with their scales set (fast: a 150k x 2k Q4_K embedding in about a second);
    others quantized by ``gguf`` where it can, else ValueError."""
    if t in (Q.F32, Q.F16, Q.BF16):
        return _encode(rng.standard_normal(n_rows * n_cols, dtype=np.float32), t)
    block, size = GGML_QUANT_SIZES[t]
    fields = _SCALES.get(t)
    if fields is None:
        try:
            return quantize(rng.standard_normal((n_rows, n_cols), dtype=np.float32), t).tobytes()
        except NotImplementedError:
            raise ValueError(f"cannot write random {t.name} rows for a router's token embedding") from None
    blocks = np.frombuffer(bytearray(rng.bytes(n_rows * n_cols // block * size)), np.uint8).reshape(-1, size)
    sign = (rng.integers(0, 2, len(blocks), dtype=np.int8) * 2 - 1).astype(np.float16)
    for offset, value in fields:
        blocks[:, offset : offset + 2] = (sign * np.float16(value)).view(np.uint8).reshape(-1, 2)
    return blocks.tobytes()


def _arch_keys(w: GGUFWriter, s: Shape) -> None:
    """The metadata an architecture needs besides the common keys (llama.cpp's load_arch_hparams)."""
    arch = s.arch
    hd_v = s.head_dim_v or s.head_dim_
    if arch == "mamba":
        w.add_uint32(f"{arch}.ssm.conv_kernel", 4)
        w.add_uint32(f"{arch}.ssm.inner_size", 2 * s.n_embd)
        w.add_uint32(f"{arch}.ssm.state_size", s.ssm_state)
        w.add_uint32(f"{arch}.ssm.time_step_rank", -(-s.n_embd // 16))
    elif arch == "deepseek2":  # MLA: one cached "head" of the compressed K/V plus the rotary part
        w.add_key_length(s.kv_lora_rank + s.rope_dim)
        w.add_value_length(s.kv_lora_rank)
        w.add_uint32(f"{arch}.attention.key_length_mla", s.head_dim_)
        w.add_uint32(f"{arch}.attention.value_length_mla", hd_v)
        w.add_uint32(f"{arch}.attention.kv_lora_rank", s.kv_lora_rank)
        w.add_rope_dimension_count(s.rope_dim)
        w.add_uint32(f"{arch}.leading_dense_block_count", s.n_dense_lead)
        w.add_uint32(f"{arch}.expert_shared_count", s.n_expert_shared)
        w.add_float32(f"{arch}.expert_weights_scale", 1.0)
    else:
        w.add_key_length(s.head_dim_)
        w.add_value_length(hd_v)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        w.add_expert_feed_forward_length(s.n_ff_exp)
    if arch == "gemma2":
        w.add_float32(f"{arch}.attn_logit_softcapping", 50.0)
        w.add_float32(f"{arch}.final_logit_softcapping", 30.0)


Tensor = tuple[str, tuple[int, ...], str]  # name, numpy-order dims, kind: "mat", "exp" (expert) or "vec" (F32)


def _tensors(s: Shape, n_vocab: int) -> list[Tensor]:
    """The tensor table of ``s.arch`` as llama.cpp's load_arch_tensors asks for it."""
    e, hd, ff = s.n_embd, s.head_dim_, s.n_ff
    q, kv = s.n_head * hd, s.n_head_kv * hd
    out: list[Tensor] = [("token_embd.weight", (n_vocab, e), "mat"), ("output_norm.weight", (e,), "vec")]
    if s.arch == "mamba":
        return out + [t for i in range(s.n_layer) for t in _mamba_layer(s, f"blk.{i}.")]
    if s.arch in ("qwen3moe", "gpt-oss", "phi3", "deepseek2"):
        out.append(("output.weight", (n_vocab, e), "mat"))
    for i in range(s.n_layer):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (e,), "vec"))
        if s.arch == "deepseek2":
            out += _mla(s, b)
        elif s.arch == "phi3":
            out += [(b + "attn_qkv.weight", (q + 2 * kv, e), "mat"), (b + "attn_output.weight", (e, q), "mat")]
        else:
            out += [
                (b + "attn_q.weight", (q, e), "mat"),
                (b + "attn_k.weight", (kv, e), "mat"),
                (b + "attn_v.weight", (kv, e), "mat"),
                (b + "attn_output.weight", (e, q), "mat"),
            ]
        if s.arch in ("qwen2", "gpt-oss"):
            out += [
                (b + "attn_q.bias", (q,), "vec"),
                (b + "attn_k.bias", (kv,), "vec"),
                (b + "attn_v.bias", (kv,), "vec"),
            ]
        if s.arch in ("qwen3", "gemma3", "qwen3moe"):
            out += [(b + "attn_q_norm.weight", (hd,), "vec"), (b + "attn_k_norm.weight", (hd,), "vec")]
        if s.arch in ("gemma2", "gemma3", "gpt-oss"):
            out.append((b + "post_attention_norm.weight", (e,), "vec"))
        if s.arch == "gpt-oss":
            out += [(b + "attn_output.bias", (e,), "vec"), (b + "attn_sinks.weight", (s.n_head,), "vec")]
        if s.arch != "gpt-oss":
            out.append((b + "ffn_norm.weight", (e,), "vec"))
        if s.arch == "phi3":
            out += [(b + "ffn_up.weight", (2 * ff, e), "mat"), (b + "ffn_down.weight", (e, ff), "mat")]
        elif s.n_expert and i >= s.n_dense_lead:
            out += _experts(s, b)
        else:
            out += [
                (b + "ffn_gate.weight", (ff, e), "mat"),
                (b + "ffn_up.weight", (ff, e), "mat"),
                (b + "ffn_down.weight", (e, ff), "mat"),
            ]
        if s.arch in ("gemma2", "gemma3"):
            out.append((b + "post_ffw_norm.weight", (e,), "vec"))
    return out


def _mamba_layer(s: Shape, b: str) -> list[Tensor]:
    """A Mamba block: no attention and no KV cache, a fixed-size recurrent state instead."""
    e, inner, rank = s.n_embd, 2 * s.n_embd, -(-s.n_embd // 16)
    return [
        (b + "attn_norm.weight", (e,), "vec"),
        (b + "ssm_in.weight", (2 * inner, e), "mat"),
        (b + "ssm_conv1d.weight", (inner, 4), "vec"),
        (b + "ssm_conv1d.bias", (inner,), "vec"),
        (b + "ssm_x.weight", (rank + 2 * s.ssm_state, inner), "mat"),
        (b + "ssm_dt.weight", (inner, rank), "mat"),
        (b + "ssm_dt.bias", (inner,), "vec"),
        (b + "ssm_a", (inner, s.ssm_state), "vec"),
        (b + "ssm_d", (inner,), "vec"),
        (b + "ssm_out.weight", (e, inner), "mat"),
    ]


def _mla(s: Shape, b: str) -> list[Tensor]:
    """DeepSeek-V2 attention (Lite: no Q compression): K/V compressed to kv_lora_rank, per-head up-projections."""
    e, nope, r, v = s.n_embd, s.head_dim_ - s.rope_dim, s.kv_lora_rank, s.head_dim_v or s.head_dim_
    return [
        (b + "attn_q.weight", (s.n_head * s.head_dim_, e), "mat"),
        (b + "attn_kv_a_mqa.weight", (r + s.rope_dim, e), "mat"),
        (b + "attn_kv_a_norm.weight", (r,), "vec"),
        (b + "attn_k_b.weight", (s.n_head, r, nope), "mat"),
        (b + "attn_v_b.weight", (s.n_head, v, r), "mat"),
        (b + "attn_output.weight", (e, s.n_head * v), "mat"),
    ]


def _experts(s: Shape, b: str) -> list[Tensor]:
    """A mixture-of-experts FFN: the router, the experts' stacked matrices, and shared experts or biases."""
    e, x, f = s.n_embd, s.n_expert, s.n_ff_exp
    out: list[Tensor] = [
        (b + "ffn_gate_inp.weight", (x, e), "vec"),
        (b + "ffn_gate_exps.weight", (x, f, e), "exp"),
        (b + "ffn_up_exps.weight", (x, f, e), "exp"),
        (b + "ffn_down_exps.weight", (x, e, f), "exp"),
    ]
    if s.arch == "gpt-oss":
        out += [
            (b + "ffn_gate_inp.bias", (x,), "vec"),
            (b + "ffn_gate_exps.bias", (x, f), "vec"),
            (b + "ffn_up_exps.bias", (x, f), "vec"),
            (b + "ffn_down_exps.bias", (x, e), "vec"),
        ]
    if s.n_expert_shared:
        sh = f * s.n_expert_shared
        out += [
            (b + "ffn_gate_shexp.weight", (sh, e), "mat"),
            (b + "ffn_up_shexp.weight", (sh, e), "mat"),
            (b + "ffn_down_shexp.weight", (e, sh), "mat"),
        ]
    return out


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
