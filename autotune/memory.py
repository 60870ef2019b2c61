"""Analytic memory model: what a configuration needs per device, predicted without loading the engine.

Everything follows the rules of the vendored llama.cpp (0.3.36), read from its source:

* weights: whole tensors placed by llama.cpp's layer rule (input layer on the host, the last
  ``n_gpu_layers - 1`` repeating layers plus the output layer on the GPUs); with mmap the host part is
  the mapped file range of its tensors, and quantized matrices with a repacked CPU layout get a second
  copy in the ``CPU_REPACK`` buffer (ggml-cpu/repack.cpp decides which);
* KV cache: ``n_head_kv * head_dim`` elements per layer and cell at the cache type's row size, cells
  padded to 256, sliding-window layers in their own, smaller cache unless ``swa_full``;
* compute buffer: the engine's reserve graph is rebuilt tensor by tensor (same ops, shapes, order) and
  replayed through a copy of ggml-alloc's allocator, so flash attention, n_ubatch and the context
  change it exactly as they change the engine's;
* output buffer: logits of one sequence (n_vocab floats).

Only architectures whose graph was checked against the engine's dry run are accepted; anything else
raises ModelError saying "unsupported architecture" rather than printing a number we cannot back.
The GPU split (layer placement, per-GPU KV and compute) follows the same source rules but has not been
checked against a real GPU engine.
"""

from __future__ import annotations

import bisect
import gc
import statistics
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelError, SettingsError
from .gguf_model import ModelFacts
from .probe import Hardware
from .settings import QUANTIZED_KV, Settings, row_bytes

MIB = 2**20
GIB = 2**30
HOST = "host"
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
# Memory the process needs besides the engine's buffers: Python, the engine's libraries and the
# vocabulary (70-100 MiB measured with the catalog models, rounded up), and CPU work buffers on the
# host; the driver context on a GPU (a typical CUDA context, not measured here).
HOST_OVERHEAD = 128 * MIB
GPU_OVERHEAD = 384 * MIB
# A configuration "fits" a device when its total stays below the free memory minus this margin:
# other processes allocate while we run, and the allocator fragments.
MARGIN_MIN = 512 * MIB
MARGIN_FRACTION = 0.05
TENSOR_ALIGNMENT = 32  # ggml's CPU buffer alignment, also the gallocr alignment of CPU compute buffers
GGUF_ALIGNMENT = 32


def margin(budget: int) -> int:
    """Headroom kept free on a device: max(512 MiB, 5 % of its free memory)."""
    return max(MARGIN_MIN, int(budget * MARGIN_FRACTION))


def pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class DeviceMemory:
    """Predicted bytes on one device ("host", "gpu0", ...); budget is that device's free memory."""

    device: str
    weights: int
    repack: int
    kv: int
    compute: int
    output: int
    overhead: int
    budget: int

    @property
    def total(self) -> int:
        return self.weights + self.repack + self.kv + self.compute + self.output + self.overhead

    def fits(self, margin_bytes: int | None = None) -> bool:
        keep = margin(self.budget) if margin_bytes is None else margin_bytes
        return self.total <= self.budget - keep

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "weights": self.weights,
            "repack": self.repack,
            "kv": self.kv,
            "compute": self.compute,
            "output": self.output,
            "overhead": self.overhead,
            "total": self.total,
            "budget": self.budget,
            "margin": margin(self.budget),
            "fits": self.fits(),
        }


@dataclass(frozen=True)
class KVCache:
    cells: int
    k: int  # bytes
    v: int


@dataclass(frozen=True)
class MemoryEstimate:
    settings: Settings
    devices: tuple[DeviceMemory, ...]
    kv_caches: tuple[KVCache, ...]  # the full-attention cache, then the sliding-window one if any
    gpu_layers: int  # repeating layers on GPUs
    output_on_gpu: bool
    n_ctx: int  # after the engine's padding
    n_ubatch: int  # after the engine's clamping
    shared_memory: bool = False  # GPU memory is host RAM (Apple unified memory)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)

    @property
    def kv_k(self) -> int:
        return sum(c.k for c in self.kv_caches)

    @property
    def kv_v(self) -> int:
        return sum(c.v for c in self.kv_caches)

    @property
    def kv_cells(self) -> tuple[int, ...]:
        return tuple(c.cells for c in self.kv_caches)

    def device(self, name: str) -> DeviceMemory:
        for d in self.devices:
            if d.device == name:
                return d
        raise KeyError(name)

    def _misses(self) -> list[int]:
        """Bytes by which each checked budget is exceeded (negative: room left)."""
        out = [d.total - (d.budget - margin(d.budget)) for d in self.devices]
        if self.shared_memory:
            host = self.device(HOST)
            out.append(self.total - (host.budget - margin(host.budget)))
        return out

    @property
    def fits(self) -> bool:
        return all(m <= 0 for m in self._misses())

    @property
    def shortfall(self) -> int:
        """Bytes by which the worst device misses its budget (0 when everything fits)."""
        return max(0, max(self._misses()))

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``autotune memory --json`` (stable: keys are only ever added)."""
        return {
            "settings": self.settings.to_dict(),
            "n_ctx": self.n_ctx,
            "n_ubatch": self.n_ubatch,
            "gpu_layers": self.gpu_layers,
            "output_on_gpu": self.output_on_gpu,
            "kv_k": self.kv_k,
            "kv_v": self.kv_v,
            "kv_cells": list(self.kv_cells),
            "kv_caches": [{"cells": c.cells, "k": c.k, "v": c.v} for c in self.kv_caches],
            "devices": [d.to_dict() for d in self.devices],
            "total": self.total,
            "fits": self.fits,
            "shortfall": self.shortfall,
        }


# ------------------------------------------------------------------------------------------ support


def check_supported(facts: ModelFacts) -> None:
    """ModelError unless this model's graph is one we rebuilt and checked against the engine."""
    if facts.architecture not in SUPPORTED_ARCHS:
        raise ModelError(
            f"{facts.path}: unsupported architecture {facts.architecture!r} for the memory model "
            f"(validated: {', '.join(SUPPORTED_ARCHS)}); use --verify for the engine's own figures"
        )
    names = {t.name for t in facts.tensors}
    if any("_exps" in n or "ffn_gate_inp" in n for n in names):
        raise ModelError(f"{facts.path}: unsupported architecture (mixture-of-experts {facts.architecture}) "
                         "for the memory model")
    if "blk.0.attn_qkv.weight" in names or any(n.endswith((".scale", ".input_scale")) for n in names):
        raise ModelError(f"{facts.path}: unsupported architecture (fused QKV or scaled weights) for the memory model")
    if len(set(facts.n_head_kv)) != 1 or facts.head_dim_k != facts.head_dim_v or min(facts.n_head_kv) < 1:
        raise ModelError(f"{facts.path}: unsupported architecture (per-layer head counts or K/V head sizes differ)")


# ----------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class _Ctx:
    """The context as the engine builds it from the settings."""

    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_tokens: int  # tokens of the reserve graph
    n_outputs: int
    swa_cells: int


def _context(facts: ModelFacts, s: Settings) -> _Ctx:
    n_ctx = pad(s.n_ctx, 256)
    n_batch = min(n_ctx, s.n_batch)  # causal attention: a batch never exceeds the context
    n_ubatch = min(n_batch, s.n_ubatch)
    n_tokens = min(n_ctx, n_ubatch)
    swa = n_ctx if s.swa_full else pad(min(n_ctx, facts.n_swa + n_ubatch), 256)
    return _Ctx(n_ctx, n_batch, n_ubatch, n_tokens, min(n_tokens, n_batch), swa)


# ---------------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    layers: tuple[str, ...]  # device of each repeating layer
    output: str  # device of the output layer
    gpus: tuple[str, ...]  # offload devices, in order


def placement(facts: ModelFacts, s: Settings, hw: Hardware) -> Placement:
    """llama.cpp's rule (llama-model.cpp, load_tensors): layer il, the output layer counting as
    il = n_layer, is offloaded when il >= n_layer + 1 - n_gpu_layers, so the output layer goes first;
    several GPUs share the offloaded layers in proportion to their free memory."""
    gpus = hw.offload_gpus
    names = tuple(f"gpu{g.index}" for g in gpus)
    n = facts.n_layer
    ngl = s.n_gpu_layers if gpus else 0
    start = max(n + 1 - ngl, 0)
    active = min(ngl, n + 1)
    weights = [max(g.vram_free, 1) for g in gpus]
    cum, run = [], 0.0
    for w in weights:
        run += w
        cum.append(run / sum(weights))

    def device(il: int) -> str:
        if il < start or il - start >= active:
            return HOST
        return names[min(bisect.bisect_right(cum, (il - start) / active), len(names) - 1)]

    return Placement(tuple(device(il) for il in range(n)), device(n), names)


# ------------------------------------------------------------------------------------------ weights


def _repack_ok(type_name: str, shape: tuple[int, ...], features: frozenset[str]) -> bool:
    """Whether ggml-cpu gives this matrix a repacked layout (ggml_repack_get_optimal_repack_type)."""
    if len(shape) != 2 or "REPACK" not in features:
        return False
    rows = shape[1]
    x86 = "AVX2" in features
    i8mm = "NEON" in features and "MATMUL_INT8" in features
    dot = "NEON" in features and "DOTPROD" in features
    rules = {
        "Q4_0": (x86 and rows % 8 == 0) or ((i8mm or dot) and rows % 4 == 0),
        "Q4_K": (x86 or i8mm or dot) and rows % 8 == 0,
        "Q2_K": "AVX512F" in features and rows % 8 == 0,
        "Q5_K": (i8mm or dot) and rows % 8 == 0,
        "Q6_K": (i8mm or dot) and rows % 8 == 0,
        "IQ4_NL": (x86 and rows % 8 == 0) or (dot and rows % 4 == 0),
        "MXFP4": (x86 and rows % 8 == 0) or (dot and rows % 4 == 0),
        "Q8_0": (i8mm or dot) and rows % 4 == 0,
    }
    return bool(rules.get(type_name, False))


# AMX (ggml-cpu/amx): the weight types it has kernels for, with the multiple of the row length each needs,
# and the bytes per block its packed layout adds (a compensation term, or K-quant scales kept apart).
_AMX_ROW_MULTIPLE = {"Q4_0": 32, "Q4_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256,
                     "F16": 16}
_AMX_BLOCK_EXTRA = {"Q8_0": 4, "Q4_K": 4, "Q5_K": 4, "IQ4_XS": 2}


def _amx_bytes(type_name: str, shape: tuple[int, ...], n_bytes: int, features: frozenset[str]) -> int:
    """Bytes this matrix takes in the AMX buffer, 0 if it does not go there (amx.cpp supports_op and
    ggml_backend_amx_get_alloc_size). The engine offers that buffer first, before CPU_REPACK."""
    if len(shape) != 2 or not {"AMX_INT8", "AVX512_VNNI"} <= features:
        return 0
    k, n = shape
    multiple = _AMX_ROW_MULTIPLE.get(type_name)
    if multiple is None or k % multiple or n % 32:
        return 0
    if type_name == "F16":
        return n_bytes
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return n * (k // block) * (size + _AMX_BLOCK_EXTRA.get(type_name, 0))


def _extra_bytes(type_name: str, shape: tuple[int, ...], n_bytes: int, features: frozenset[str]) -> int:
    """Bytes a matrix multiplied on the host takes in an extra buffer (AMX, else CPU_REPACK); 0 for none."""
    amx = _amx_bytes(type_name, shape, n_bytes, features)
    if amx:
        return pad(amx, TENSOR_ALIGNMENT)
    return pad(n_bytes, TENSOR_ALIGNMENT) if _repack_ok(type_name, shape, features) else 0


def _weights(facts: ModelFacts, s: Settings, hw: Hardware, where: Placement) -> tuple[dict[str, int], int]:
    """Weight bytes per device and the extra (AMX / CPU_REPACK) buffers, the way llama.cpp builds its model
    buffers."""
    # A GPU backend with a pinned host buffer type (all but Metal) comes first in llama.cpp's CPU buffer
    # list: host weights then go to plain (mapped) CPU memory and are never repacked. Extra buffers off
    # (--no-repack) has the same effect.
    metal_only = all(g.backend == "metal" for g in hw.offload_gpus)
    features = frozenset(hw.cpu_features) if metal_only and s.use_extra_bufts else frozenset()
    offsets, off = [], 0
    for t in facts.tensors:  # tensor data is laid out in table order, each padded to the alignment
        offsets.append(off)
        off += pad(t.n_bytes, GGUF_ALIGNMENT)
    mapped: dict[str, list[int]] = {}  # device -> [first, last] of its tensors in the file
    plain: dict[str, int] = {}  # device -> bytes, when not mapped
    repack = 0

    def place(dev: str, i: int) -> None:
        t = facts.tensors[i]
        if dev == HOST and s.use_mmap:
            span = mapped.setdefault(dev, [offsets[i], offsets[i] + t.n_bytes])
            span[0] = min(span[0], offsets[i])
            span[1] = max(span[1], offsets[i] + t.n_bytes)
        else:
            plain[dev] = plain.get(dev, 0) + pad(t.n_bytes, TENSOR_ALIGNMENT)

    for i, t in enumerate(facts.tensors):
        if t.layer is not None:
            dev = where.layers[t.layer] if t.layer < facts.n_layer else HOST
        elif t.name.startswith("output"):
            dev = where.output
        else:
            dev = HOST  # input layer (token embedding) always stays on the host
        # only MUL_MAT weights can live in CPU_REPACK; the embedding is read with GET_ROWS
        matmul = t.name.endswith(".weight") and t.name != "token_embd.weight" and len(t.shape) == 2
        extra = _extra_bytes(t.type, t.shape, t.n_bytes, features) if dev == HOST and matmul else 0
        if extra:
            repack += extra
        else:
            place(dev, i)
    if facts.tied_embeddings:
        # The output layer multiplies by the token embedding: llama.cpp makes a second copy of it
        # wherever the output layer's buffer type differs from the embedding's (a GPU, or CPU_REPACK).
        embd = next(t for t in facts.tensors if t.name == "token_embd.weight")
        if where.output != HOST:
            plain[where.output] = plain.get(where.output, 0) + pad(embd.n_bytes, TENSOR_ALIGNMENT)
        else:
            repack += _extra_bytes(embd.type, embd.shape, embd.n_bytes, features)
    out = dict(plain)
    for dev, (first, last) in mapped.items():
        out[dev] = out.get(dev, 0) + last - first
    return out, repack


# ----------------------------------------------------------------------------------------------- KV


def _kv(facts: ModelFacts, s: Settings, c: _Ctx, where: Placement) -> tuple[dict[str, int], tuple[KVCache, ...]]:
    """KV bytes per device, and each cache (the full-attention one, then the sliding-window one)."""
    per_dev: dict[str, int] = {}
    caches: dict[bool, list[int]] = {}
    for il in range(facts.n_layer):
        swa = facts.uses_swa and facts.swa_layers[il]
        cells = c.swa_cells if swa else c.n_ctx
        kb = row_bytes(s.type_k, facts.n_head_kv[il] * facts.head_dim_k) * cells
        vb = row_bytes(s.type_v, facts.n_head_kv[il] * facts.head_dim_v) * cells
        dev = where.layers[il] if s.offload_kqv else HOST
        per_dev[dev] = per_dev.get(dev, 0) + kb + vb
        entry = caches.setdefault(swa, [cells, 0, 0])
        entry[1] += kb
        entry[2] += vb
    return per_dev, tuple(KVCache(*caches[swa]) for swa in (False, True) if swa in caches)


# ---------------------------------------------------------------------------------- compute (graph)

# (block size, bytes per block) of every type a graph tensor can have
_TYPE_SIZE = {"f32": (1, 4), "f16": (1, 2), "i32": (1, 4), "i64": (1, 8)} | {
    t: GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]] for t in QUANTIZED_KV | {"bf16"}}
# ggml_op_can_inplace, restricted to the ops these graphs use
_INPLACE = frozenset({"SCALE", "ADD", "MUL", "UNARY", "ROPE", "RMS_NORM", "SOFT_MAX"})
INPUT, OUTPUT = 1, 2  # GGML_TENSOR_FLAG_INPUT / _OUTPUT


class _T:
    """A ggml tensor as far as the allocator cares: shape, strides, op, sources, where it lives."""

    __slots__ = ("op", "type", "ne", "nb", "src", "view_src", "flags", "ext", "dev", "nbytes",
                 "nchild", "nviews", "alloc", "addr")

    def __init__(self, op: str, type_: str, ne: tuple[int, ...], nb: tuple[int, ...] | None, src: tuple[_T, ...],
                 dev: str, view_src: _T | None = None, flags: int = 0, ext: bool = False) -> None:
        block, size = _TYPE_SIZE[type_]
        ne0, ne1, ne2, ne3 = ne
        if nb is None:
            nb1 = size * (ne0 // block)
            nb = (size, nb1, nb1 * ne1, nb1 * ne1 * ne2)
        self.op, self.type, self.ne, self.nb, self.src = op, type_, ne, nb, src
        self.view_src, self.flags, self.ext, self.dev = view_src, flags, ext, dev
        rest = (ne1 - 1) * nb[1] + (ne2 - 1) * nb[2] + (ne3 - 1) * nb[3]
        self.nbytes = (size + (ne0 - 1) * nb[0] if block == 1 else ne0 * nb[0] // block) + rest
        self.nchild = self.nviews = 0
        self.alloc = False
        self.addr = 0


def _ne4(*ne: int) -> tuple[int, ...]:
    return tuple(ne) + (1,) * (4 - len(ne))


class _Graph:
    """Just enough of ggml's graph building to reproduce a llama.cpp reserve graph."""

    def __init__(self) -> None:
        self.dev = HOST
        self.roots: list[_T] = []
        self.layer_out: list[_T] = []  # each built layer's output, in build order

    # leaves
    def weight(self, dev: str, n_in: int, n_out: int = 1) -> _T:
        return _T("NONE", "f16", _ne4(n_in, n_out), None, (), dev, ext=True)

    def cache(self, type_: str, width: int, cells: int, dev: str) -> _T:
        return _T("NONE", type_, _ne4(width, cells), None, (), dev, ext=True)

    def input(self, type_: str, *ne: int) -> _T:
        return _T("NONE", type_, _ne4(*ne), None, (), HOST, flags=INPUT)

    # ops
    def op(self, op: str, like: _T | tuple[int, ...], src: tuple[_T, ...], type_: str = "f32") -> _T:
        ne = like.ne if isinstance(like, _T) else _ne4(*like)
        return _T(op, type_, ne, None, src, self.dev)

    def view(self, a: _T, ne: tuple[int, ...], nb: tuple[int, ...] | None = None, op: str = "VIEW") -> _T:
        base = a.view_src or a
        return _T(op, a.type, _ne4(*ne), nb, (a,), base.dev if base.ext else a.dev, view_src=base)

    def reshape(self, a: _T, *ne: int) -> _T:
        return self.view(a, ne, None, "RESHAPE")

    def permute(self, a: _T, p: tuple[int, int, int, int]) -> _T:
        ne, nb = [0] * 4, [0] * 4
        for i in range(4):
            ne[p[i]], nb[p[i]] = a.ne[i], a.nb[i]
        return self.view(a, tuple(ne), tuple(nb), "PERMUTE")

    def mul_mat(self, w: _T, x: _T) -> _T:
        return self.op("MUL_MAT", (w.ne[1], x.ne[1], x.ne[2], x.ne[3]), (w, x))

    def get_rows(self, a: _T, idx: _T) -> _T:
        return self.op("GET_ROWS", (a.ne[0], idx.ne[0], idx.ne[1], idx.ne[2]), (a, idx))

    def unary(self, op: str, a: _T, *more: _T) -> _T:
        return self.op(op, a, (a, *more))

    def norm(self, x: _T) -> _T:
        """build_norm with LLM_NORM_RMS and a weight."""
        return self.unary("MUL", self.unary("RMS_NORM", x), self.weight(self.dev, x.ne[0]))

    def contiguous(self, a: _T) -> bool:
        return a.nb == _T("NONE", a.type, a.ne, None, (), a.dev).nb

    def expand(self, t: _T) -> None:
        self.roots.append(t)


def _hadamard(g: _Graph, cur: _T, rot: _T) -> _T:
    """llama_mul_mat_hadamard: rotate rows of ``cur`` by the n x n matrix ``rot``."""
    n = rot.ne[0]
    total = cur.ne[0] * cur.ne[1] * cur.ne[2] * cur.ne[3]
    if g.contiguous(cur):
        res = g.reshape(cur, n, total // n)
    else:
        res = g.op("CONT", (n, total // n), (cur,))
    res = g.mul_mat(rot, res)
    return g.reshape(res, *cur.ne)


@dataclass(frozen=True)
class _Shape:
    """What the compute graph depends on, hashable so estimates over a sweep reuse graph results."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    swa_layers: tuple[bool, ...]
    biases: frozenset[str]  # which of attn_q/k/v/output, ffn_up/gate/down and output carry a bias
    qk_norm: bool
    layer_dev: tuple[str, ...]
    output_dev: str


_BIASES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_gate", "ffn_down", "output")


def _shape(facts: ModelFacts, where: Placement) -> _Shape:
    names = {t.name for t in facts.tensors}
    return _Shape(
        arch=facts.architecture,
        n_layer=facts.n_layer,
        n_embd=facts.n_embd,
        n_ff=facts.n_ff,
        n_head=facts.n_head,
        n_head_kv=facts.n_head_kv[0],
        head_dim=facts.head_dim_k,
        n_vocab=facts.n_vocab,
        swa_layers=facts.swa_layers if facts.uses_swa else (False,) * facts.n_layer,
        biases=frozenset(b for b in _BIASES if (f"blk.0.{b}.bias" if b != "output" else "output.bias") in names),
        qk_norm="blk.0.attn_q_norm.weight" in names,
        layer_dev=where.layers,
        output_dev=where.output,
    )


@dataclass(frozen=True)
class _Attn:
    """The settings the compute graph depends on (a small cache key)."""

    flash_attn: bool
    type_k: str
    type_v: str
    offload_kqv: bool


@dataclass(frozen=True)
class _CacheInputs:
    cells: int
    k_idxs: _T
    v_idxs: _T
    mask: _T
    k_rot: _T | None
    v_rot: _T | None


def _build(sh: _Shape, c: _Ctx, s: _Attn, layers: Sequence[int]) -> _Graph:
    """The pp reserve graph of llama/qwen2/qwen3/gemma3 (src/models/*.cpp with llama-graph.cpp helpers),
    with the repeating layers ``layers`` (all of them, or a shortened run, see _plan)."""
    g = _Graph()
    T, E, H, HKV, D = c.n_tokens, sh.n_embd, sh.n_head, sh.n_head_kv, sh.head_dim
    fa = s.flash_attn
    gemma = sh.arch == "gemma3"
    iswa = any(sh.swa_layers)
    kv_gqa = HKV * D

    # inputs, in the order llama.cpp creates them (allocation only depends on first use)
    tok_embd = g.weight(HOST, E, sh.n_vocab)
    tokens = g.input("i32", T)
    embd_in = g.input("f32", E, T)
    g.dev = HOST
    embd = g.get_rows(tok_embd, tokens)
    g.expand(embd)
    g.expand(embd_in)
    inpL = g.unary("SCALE", embd) if gemma else embd
    pos = g.input("i32", T)
    mask_type = "f16" if fa else "f32"

    def linear(name: str, x: _T, n_in: int, n_out: int) -> _T:
        y = g.mul_mat(g.weight(g.dev, n_in, n_out), x)
        return g.unary("ADD", y, g.weight(g.dev, n_out)) if name in sh.biases else y

    def attn_inputs(cells: int) -> _CacheInputs:
        """One cache's graph inputs; quantized K/V add Hadamard rotations (llama-kv-cache.cpp, attn_rot)."""
        k_rot = v_rot = None
        if s.type_k in QUANTIZED_KV and D % 64 == 0:
            n = 64
            while D % (n * 2) == 0:
                n *= 2
            k_rot = g.input("f32", n, n)
        if s.type_v in QUANTIZED_KV and D % 64 == 0:
            v_rot = g.input("f32", 64, 64)
        # a transposed V cache (no flash attention) is written one element per index
        return _CacheInputs(cells, g.input("i64", T), g.input("i64", T if fa else T * kv_gqa),
                            g.input(mask_type, cells, T), k_rot, v_rot)

    base = attn_inputs(c.n_ctx)
    swa = attn_inputs(c.swa_cells) if iswa else base
    out_ids = g.input("i32", c.n_outputs)

    for il in layers:
        dev = sh.layer_dev[il]
        g.dev = dev
        inp = swa if sh.swa_layers[il] else base
        cells = inp.cells
        kv_dev = dev if s.offload_kqv else HOST
        inpSA = inpL
        cur = g.norm(inpL)
        q = linear("attn_q", cur, E, H * D)
        k = linear("attn_k", cur, E, kv_gqa)
        v = linear("attn_v", cur, E, kv_gqa)
        q = g.reshape(q, D, H, T)
        k = g.reshape(k, D, HKV, T)
        v = g.reshape(v, D, HKV, T)
        if sh.qk_norm or gemma:
            q = g.norm(q)
        q = g.unary("ROPE", q, pos)
        if sh.qk_norm or gemma:
            k = g.norm(k)
        k = g.unary("ROPE", k, pos)
        if gemma:
            q = g.unary("SCALE", q)
        if inp.k_rot is not None:
            q = _hadamard(g, q, inp.k_rot)
            k = _hadamard(g, k, inp.k_rot)
        if inp.v_rot is not None:
            v = _hadamard(g, v, inp.v_rot)
        # build_attn expands q, v, k (q, k, v for the sliding-window variant), then stores K and V
        g.expand(q)
        for t in ((k, v) if iswa else (v, k)):
            g.expand(t)
        g.dev = kv_dev
        cache_k = g.cache(s.type_k, kv_gqa, cells, kv_dev)
        cache_v = g.cache(s.type_v, kv_gqa, cells, kv_dev)
        k2 = g.view(k, (kv_gqa, T), (k.nb[0], k.nb[2], k.nb[2] * T, k.nb[2] * T))
        g.expand(_set_rows(cache_k, k2, inp.k_idxs))
        if fa:
            v2 = g.view(v, (kv_gqa, T), (v.nb[0], v.nb[2], v.nb[2] * T, v.nb[2] * T))
            g.expand(_set_rows(cache_v, v2, inp.v_idxs))
        else:
            v2 = g.reshape(g.reshape(v, kv_gqa, T), 1, kv_gqa * T)
            g.expand(_set_rows(g.reshape(cache_v, 1, kv_gqa * cells), v2, inp.v_idxs))
        cur = _attention(g, q, cache_k, cache_v, inp.mask, s, D, H, HKV, T, cells)
        g.expand(cur)
        g.dev = dev
        if inp.v_rot is not None:
            cur = _hadamard(g, cur, inp.v_rot)
        cur = linear("attn_output", cur, H * D, E)
        if il == sh.n_layer - 1:
            cur = g.get_rows(cur, out_ids)
            inpSA = g.get_rows(inpSA, out_ids)
        if gemma:
            cur = g.norm(cur)
        ffn_inp = g.unary("ADD", cur, inpSA)
        cur = g.norm(ffn_inp)
        up = linear("ffn_up", cur, E, sh.n_ff)
        gate = linear("ffn_gate", cur, E, sh.n_ff)
        cur = g.op("GLU", gate, (gate, up))
        cur = linear("ffn_down", cur, sh.n_ff, E)
        if gemma:
            cur = g.norm(cur)
        inpL = g.unary("ADD", cur, ffn_inp)
        g.layer_out.append(inpL)

    g.dev = sh.output_dev
    cur = g.norm(inpL)
    cur.flags |= OUTPUT
    logits = linear("output", cur, E, sh.n_vocab)
    logits.flags |= OUTPUT
    g.expand(logits)
    return g


def _set_rows(dst: _T, src: _T, idx: _T) -> _T:
    """ggml_set_rows: writes into the (external) cache, the result is a view of it."""
    base = dst.view_src or dst
    return _T("SET_ROWS", dst.type, dst.ne, dst.nb, (src, idx, dst), base.dev, view_src=base)


def _attention(g: _Graph, q: _T, ck: _T, cv: _T, mask: _T, s: _Attn, D: int, H: int, HKV: int, T: int,
               cells: int) -> _T:
    """build_attn_mha over the cache views: flash attention, or KQ -> softmax -> KQV."""
    kb = row_bytes(s.type_k, D)
    kv_gqa = HKV * D
    krow = row_bytes(s.type_k, kv_gqa)
    k = g.view(ck, (D, HKV, cells, 1), (ck.nb[0], kb, krow, krow * cells))
    if s.flash_attn:
        vrow = row_bytes(s.type_v, kv_gqa)
        v = g.view(cv, (D, HKV, cells, 1), (cv.nb[0], row_bytes(s.type_v, D), vrow, vrow * cells))
    else:
        es = cv.nb[0]
        v = g.view(cv, (cells, HKV, D, 1), (es, es * cells * D, es * cells, es * cells * kv_gqa))
    qv = g.view(q, q.ne, q.nb)
    qp = g.permute(qv, (0, 2, 1, 3))
    kp = g.permute(k, (0, 2, 1, 3))
    vp = g.permute(v, (0, 2, 1, 3))
    if s.flash_attn:
        out = g.op("FLASH_ATTN_EXT", (D, qp.ne[2], qp.ne[1], qp.ne[3]), (qp, kp, vp, mask))
        return g.reshape(out, D * H, T)
    kq = g.mul_mat(kp, qp)
    kq = g.op("SOFT_MAX", kq, (kq, mask))
    kqv = g.mul_mat(vp, kq)
    cur = g.permute(kqv, (0, 2, 1, 3))
    return g.op("CONT", (D * H, T), (cur,))


def _order(roots: list[_T]) -> tuple[list[_T], list[_T]]:
    """ggml_build_forward_expand: depth-first over sources, leaves and nodes in first-visit order."""
    seen: set[int] = set()
    leafs: list[_T] = []
    nodes: list[_T] = []
    for root in roots:
        if id(root) in seen:
            continue
        seen.add(id(root))
        stack = [(root, 0)]
        while stack:
            t, i = stack[-1]
            if i < len(t.src):
                stack[-1] = (t, i + 1)
                s = t.src[i]
                if id(s) not in seen:
                    seen.add(id(s))
                    stack.append((s, 0))
            else:
                stack.pop()
                (leafs if t.op == "NONE" else nodes).append(t)
    return leafs, nodes


class _Alloc:
    """ggml_dyn_tallocr: best-fit free blocks, the last block grows the buffer."""

    __slots__ = ("blocks", "max")

    def __init__(self) -> None:
        self.blocks: list[list[int]] = [[0, 1 << 62]]
        self.max = 0

    def alloc(self, size: int) -> int:
        size = pad(size, TENSOR_ALIGNMENT)
        blocks = self.blocks
        best, best_size = -1, 0
        for i in range(len(blocks) - 1):
            bs = blocks[i][1]
            if bs >= size and (best < 0 or bs <= best_size):
                best, best_size = i, bs
        if best < 0:
            best = len(blocks) - 1
        block = blocks[best]
        addr = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del blocks[best]
        if addr + size > self.max:
            self.max = addr + size
        return addr

    def free(self, addr: int, size: int) -> None:
        size = pad(size, TENSOR_ALIGNMENT)
        b = self.blocks
        for i, block in enumerate(b):
            if block[0] + block[1] == addr:
                block[1] += size
                if i < len(b) - 1 and block[0] + block[1] == b[i + 1][0]:
                    block[1] += b[i + 1][1]
                    del b[i + 1]
                return
            if addr + size == block[0]:
                block[0] = addr
                block[1] += size
                if i > 0 and b[i - 1][0] + b[i - 1][1] == block[0]:
                    b[i - 1][1] += block[1]
                    del b[i]
                return
        j = 0
        while j < len(b) and b[j][0] < addr:
            j += 1
        b.insert(j, [addr, size])


def _allocate(leafs: list[_T], nodes: list[_T],
              marks: dict[int, int] | None = None) -> tuple[dict[str, int], dict[int, Any]]:
    """ggml_gallocr_alloc_graph_impl, one allocator per device; returns each device's buffer size, and
    the allocator state right after each node of ``marks`` (id -> tag) was computed.

    A source computed on another device is read through a copy on the consumer's device, allocated with
    the graph inputs (the scheduler's split inputs)."""
    allocs: dict[str, _Alloc] = {}
    copies: dict[tuple[int, str], _T] = {}
    live: dict[int, tuple[str, int, int]] = {}
    states: dict[int, Any] = {}
    marks = marks or {}

    def allocator(dev: str) -> _Alloc:
        a = allocs.get(dev)
        if a is None:
            a = allocs[dev] = _Alloc()
        return a

    for n in nodes:  # route cross-device reads through copies; the original lives until the copy is read
        src = list(n.src)
        for j, s in enumerate(n.src):
            if s.ext or s.dev == n.dev:
                continue
            key = (id(s), n.dev)
            cp = copies.get(key)
            if cp is None:
                cp = copies[key] = _T("NONE", s.type, s.ne, None, (), n.dev, flags=INPUT)
                cp.nbytes = s.nbytes
            src[j] = cp
            src.append(s)
        n.src = tuple(src)

    def allocate(t: _T) -> None:
        if t.ext or t.alloc or t.view_src is not None:
            return
        t.alloc = True
        if t.op in _INPLACE:
            for p in t.src:
                if not p.alloc or p.ext or p.dev != t.dev:
                    continue
                if p.flags & OUTPUT or (p.view_src is not None and p.view_src.flags & OUTPUT):
                    continue
                if p.type != t.type or p.ne != t.ne or p.nb != t.nb:
                    continue
                if p.nchild != 1 or p.nviews != 0:
                    continue
                if p.view_src is not None:
                    vs = p.view_src
                    if vs.nviews == 1 and vs.nchild == 0:
                        t.addr = vs.addr
                        p.alloc = vs.alloc = False
                        _free_extra(allocator(t.dev), t, vs)
                        del live[id(vs)]
                        live[id(t)] = (t.dev, t.addr, t.nbytes)
                        return
                else:
                    t.addr = p.addr
                    p.alloc = False
                    _free_extra(allocator(t.dev), t, p)
                    del live[id(p)]
                    live[id(t)] = (t.dev, t.addr, t.nbytes)
                    return
        t.addr = allocator(t.dev).alloc(t.nbytes)
        live[id(t)] = (t.dev, t.addr, t.nbytes)

    def free(t: _T) -> None:
        if t.flags & OUTPUT:
            return
        allocator(t.dev).free(t.addr, t.nbytes)
        t.alloc = False
        del live[id(t)]

    for leaf in leafs:
        allocate(leaf)
    for n in nodes:
        if n.view_src is not None:
            n.view_src.nviews += 1
            n.addr = n.view_src.addr
        for s in n.src:
            s.nchild += 1
            if s.flags & INPUT:
                allocate(s)
    for n in nodes:
        for s in n.src:
            allocate(s)
        allocate(n)
        if n.view_src is not None:
            n.addr = n.view_src.addr
        for p in n.src:
            p.nchild -= 1
            if p.nchild == 0 and p.nviews == 0:
                if p.view_src is not None:
                    vs = p.view_src
                    vs.nviews -= 1
                    if vs.nviews == 0 and vs.nchild == 0 and vs.alloc:
                        free(vs)
                elif p.alloc:
                    free(p)
        tag = marks.get(id(n))
        if tag is not None:
            states[tag] = (
                sorted((d, tuple(map(tuple, a.blocks)), a.max) for d, a in allocs.items()),
                frozenset(live.values()),
            )
    return {dev: a.max for dev, a in allocs.items()}, states


def _free_extra(a: _Alloc, node: _T, parent: _T) -> None:
    ps, ns = pad(parent.nbytes, TENSOR_ALIGNMENT), pad(node.nbytes, TENSOR_ALIGNMENT)
    if ps > ns:
        a.free(parent.addr + ns, ps - ns)


@lru_cache(maxsize=4096)
def _compute(sh: _Shape, c: _Ctx, a: _Attn) -> dict[str, int]:
    """Compute buffer bytes per device: the reserve graph replayed through the allocator."""
    collecting = gc.isenabled()
    gc.disable()  # thousands of short-lived tensors: the cyclic collector only costs time here
    try:
        keys = [(sh.layer_dev[il], sh.swa_layers[il]) for il in range(sh.n_layer)]
        plan, checks = _plan(keys)
        if checks:
            g = _build(sh, c, a, plan)
            marks = {id(g.layer_out[i]): i for pair in checks for i in pair}
            sizes, states = _allocate(*_order(g.roots), marks)
            if all(states[i] == states[j] for i, j in checks):
                return sizes
        g = _build(sh, c, a, range(sh.n_layer))
        return _allocate(*_order(g.roots))[0]
    finally:
        if collecting:
            gc.enable()


RUN_KEEP = 3  # periods of a run that are built before the rest of it is skipped
MAX_PERIOD = 8


def _plan(keys: Sequence[Any]) -> tuple[list[int], list[tuple[int, int]]]:
    """Layers to build when long periodic runs of layers are cut short, and the pairs of positions (in
    the plan) whose allocator states must match for the cut to be exact.

    Identical layers replay identical allocations: once the allocator is in the same state at the end of
    two consecutive periods of a run (one layer, or e.g. five sliding-window layers and a global one),
    the remaining periods leave it there too, so building RUN_KEEP periods gives the same buffer sizes as
    building the whole run. The last layer (which selects the output rows) is never cut."""
    n = len(keys)
    plan: list[int] = []
    checks: list[tuple[int, int]] = []
    il = 0
    while il < n - 1:
        for period in range(1, MAX_PERIOD + 1):
            end = il + period
            while end < n - 1 and keys[end] == keys[end - period]:
                end += 1
            if end - il > (RUN_KEEP + 1) * period:
                plan.extend(range(il, il + RUN_KEEP * period))
                checks.append((len(plan) - 1 - period, len(plan) - 1))
                il += RUN_KEEP * period + (end - il - RUN_KEEP * period) // period * period
                break
        else:
            plan.append(il)
            il += 1
    plan.append(n - 1)
    return plan, checks


# ---------------------------------------------------------------------------------------- estimate


def validate(settings: Settings) -> Settings:
    """SettingsError for what the engine would refuse; an n_ubatch above n_batch is fine (it is clamped)."""
    found = settings.refusals(can_offload=True)
    if found:
        raise SettingsError(found[0])
    return settings


def estimate(facts: ModelFacts, settings: Settings, hw: Hardware) -> MemoryEstimate:
    """Per-device memory for ``settings`` on ``hw``; pure and fast (no engine, a few ms)."""
    check_supported(facts)
    validate(settings)
    where = placement(facts, settings, hw)
    c = _context(facts, settings)
    weights, repack = _weights(facts, settings, hw, where)
    kv, caches = _kv(facts, settings, c, where)
    attn = _Attn(settings.flash_attn, settings.type_k, settings.type_v, settings.offload_kqv)
    compute = _compute(_shape(facts, where), c, attn)
    budgets = {HOST: hw.ram_available}
    budgets.update({f"gpu{g.index}": g.vram_free for g in hw.offload_gpus})
    devices = []
    for dev in (HOST, *where.gpus):
        devices.append(
            DeviceMemory(
                device=dev,
                weights=weights.get(dev, 0),
                repack=repack if dev == HOST else 0,
                kv=kv.get(dev, 0),
                compute=compute.get(dev, 0),
                output=facts.n_vocab * 4 if dev == HOST else 0,  # logits of one sequence, host memory
                overhead=HOST_OVERHEAD if dev == HOST else GPU_OVERHEAD,
                budget=budgets[dev],
            )
        )
    return MemoryEstimate(
        settings=settings,
        devices=tuple(devices),
        kv_caches=caches,
        gpu_layers=sum(d != HOST for d in where.layers),
        output_on_gpu=where.output != HOST,
        n_ctx=c.n_ctx,
        n_ubatch=c.n_ubatch,
        shared_memory=hw.backend == "metal" and bool(where.gpus),
    )


def max_ctx(facts: ModelFacts, settings: Settings, hw: Hardware, limit: int | None = None) -> int:
    """Largest context (a multiple of 256, at most ``limit`` or the trained context) that fits; 0 if none.

    Memory grows with the context, so a binary search over multiples of 256 finds it."""
    top = (limit or facts.n_ctx_train or 131072) // 256
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(facts, settings.replace(n_ctx=mid * 256), hw).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def cache_pairs(kv_types: Iterable[str], flash_attn: bool) -> list[tuple[str, str]]:
    """(type_k, type_v) per cache type; without flash attention a quantized V is impossible, so V stays f16."""
    out = []
    for t in kv_types:
        pair = (t, t) if flash_attn or t not in QUANTIZED_KV else (t, "f16")
        if pair not in out:
            out.append(pair)
    return out


def ctx_sweep(facts: ModelFacts, settings: Settings, hw: Hardware, ctxs: Sequence[int],
              kv_types: Sequence[str]) -> list[dict[str, Any]]:
    """Footprint against context length for each K/V type: one row per (type, context)."""
    rows = []
    for tk, tv in cache_pairs(kv_types, settings.flash_attn):
        for n in ctxs:
            e = estimate(facts, settings.replace(n_ctx=n, type_k=tk, type_v=tv), hw)
            rows.append({
                "n_ctx": e.n_ctx,
                "type_k": tk,
                "type_v": tv,
                "weights": sum(d.weights + d.repack for d in e.devices),
                "kv": e.kv_k + e.kv_v,
                "compute": sum(d.compute for d in e.devices),
                "total": e.total,
                "fits": e.fits,
            })
    return rows


# ------------------------------------------------------------------------------------ verification

COMPONENTS = ("weights", "kv", "compute", "output", "total")


def _err(pred: int, real: int) -> float:
    if real == 0:
        return 0.0 if pred == 0 else float("inf")
    return (pred - real) / real * 100


def as_logged(n: int) -> int:
    """``n`` at the resolution of the engine's log (MiB with two decimals), for a like-for-like error."""
    return round(round(n / MIB, 2) * MIB)


def verify(facts: ModelFacts, settings_list: Sequence[Settings], hw: Hardware | None = None) -> list[dict[str, Any]]:
    """Prediction against the engine's no-allocation dry run for each settings (one engine load per
    n_gpu_layers and use_extra_bufts). Totals compare what the dry run can see: weights (llama_model_size), KV, compute and
    output; the repack buffer and the fixed overhead are left out of both sides. ``hw`` must describe
    the machine the engine runs on (default: probe it). For an unsupported architecture the rows carry
    the engine's figures only."""
    from . import engine
    from .probe import probe

    try:
        check_supported(facts)
        supported = True
    except ModelError:
        supported = False
    hw = hw or probe(measure_bandwidth=False)
    rows: list[dict[str, Any]] = []
    groups: dict[tuple[int, bool], list[Settings]] = {}
    for s in settings_list:
        groups.setdefault((s.n_gpu_layers, s.use_extra_bufts), []).append(s)
    for group in groups.values():
        for s, report in zip(group, engine.dry_run(facts.path, [validate(s) for s in group])):
            row: dict[str, Any] = {"settings": s, "estimate": None, "predicted": None, "engine": None,
                                   "error_pct": None, "error": None}
            rows.append(row)
            if isinstance(report, str):
                row["error"] = report
                continue
            real = {
                "weights": report.weights_total,
                "kv": report.kv_k + report.kv_v,
                "compute": sum(report.compute.values()),
                "output": sum(report.output.values()),
            }
            real["total"] = sum(real.values())
            row["engine"] = real
            if not supported:
                row["error"] = f"unsupported architecture {facts.architecture!r}: no prediction"
                continue
            e = estimate(facts, s, hw)
            # llama_model_size counts every weight once, whatever buffer holds it: compare the layout with no
            # extra (AMX / CPU_REPACK) buffers, where every weight sits in a plain or mapped buffer.
            plain = estimate(facts, s.replace(use_extra_bufts=False), hw)
            pred = {
                "weights": sum(d.weights for d in plain.devices),
                "kv": e.kv_k + e.kv_v,
                "compute": sum(d.compute for d in e.devices),
                "output": sum(d.output for d in e.devices),
            }
            pred["total"] = sum(pred.values())
            seen = {
                "weights": pred["weights"],
                "kv": sum(as_logged(c.k) + as_logged(c.v) for c in e.kv_caches),
                "compute": sum(as_logged(d.compute) for d in e.devices if d.compute),
                "output": as_logged(pred["output"]),
            }
            seen["total"] = sum(seen.values())
            row.update(estimate=e, predicted=pred, error_pct={k: _err(seen[k], real[k]) for k in COMPONENTS})
    return rows


def summarize(errors: Iterable[dict[str, float | None]]) -> dict[str, dict[str, float]]:
    """Max and median absolute error (%) per component over verify rows' ``error_pct``."""
    by: dict[str, list[float]] = {}
    for e in errors:
        for k, v in e.items():
            if v is not None:
                by.setdefault(k, []).append(abs(v))
    return {k: {"max": max(v), "median": statistics.median(v), "n": len(v)} for k, v in by.items()}
