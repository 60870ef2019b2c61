"""Where a configuration's memory goes, by formula: llama.cpp's layer placement, the weight buffers (mapped
file range, plain copies, and the AMX / CPU_REPACK extra buffers), the KV caches, and the records an estimate
is made of. The compute buffer is the reserve graph's (``reserve``)."""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..facts.gguf_model import EXPERTS, ModelFacts
from ..facts.probe import Hardware
from ..vocabulary.knobs import DENSE_FFN_REGEX
from ..vocabulary.settings import Settings, row_bytes

MIB = 2**20
GIB = 2**30
HOST = "host"
# Memory the process needs besides the engine's buffers: Python, the engine's libraries and the
# vocabulary (70-100 MiB measured with the catalog models, rounded up), and CPU work buffers on the
# host. A GPU's is measured (``autotune.memory.overhead``).
HOST_OVERHEAD = 128 * MIB
# A configuration "fits" a device when its total stays below the free memory minus this margin:
# other processes allocate while we run, and the allocator fragments.
MARGIN_MIN = 512 * MIB
MARGIN_FRACTION = 0.05
TENSOR_ALIGNMENT = 32  # ggml's CPU buffer alignment, also the gallocr alignment of CPU compute buffers
GGUF_ALIGNMENT = 32
DENSE_FFN = re.compile(DENSE_FFN_REGEX)


def margin(budget: int) -> int:
    """Headroom kept free on a device: max(512 MiB, 5 % of its free memory)."""
    return max(MARGIN_MIN, int(budget * MARGIN_FRACTION))


def pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class DeviceMemory:
    """Predicted bytes on one device ("host", "gpu0", ...); budget is that device's free memory, limit the
    user's GPU budget there (--gpu-budget; None: none)."""

    device: str
    weights: int
    repack: int
    kv: int
    compute: int
    output: int
    overhead: int
    budget: int
    limit: int | None = None

    @property
    def total(self) -> int:
        return self.weights + self.repack + self.kv + self.compute + self.output + self.overhead

    def room(self, margin_bytes: int | None = None) -> int:
        """Bytes this configuration may use here: the free memory less the margin (``margin_bytes``, None: the
        default), and at most the user's budget. The total includes the GPU's fixed overhead, so the budget
        bounds the whole process's use of the device; the margin is for what others allocate meanwhile."""
        free = self.budget - (margin(self.budget) if margin_bytes is None else margin_bytes)
        return free if self.limit is None else min(free, self.limit)

    def fits(self, margin_bytes: int | None = None) -> bool:
        return self.total <= self.room(margin_bytes)

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
            "gpu_budget": self.limit,
            "room": self.room(),
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
    source: str = "replay"  # where the KV and compute figures come from: the replay or the engine's dry run
    gpu_overhead_learned: bool = False  # each GPU's overhead is the allowance measured there (else the default)

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

    def _misses(self, keep: int | None = None) -> list[int]:
        """Bytes by which each checked budget is exceeded (negative: room left), keeping ``keep`` bytes free
        on each device (None: ``margin`` of its budget), within the user's GPU budget."""
        out = [d.total - d.room(keep) for d in self.devices]
        if self.shared_memory:
            out.append(self.total - self.device(HOST).room(keep))
        return out

    @property
    def fits(self) -> bool:
        return self.fits_keeping(None)

    def fits_keeping(self, keep: int | None) -> bool:
        return all(m <= 0 for m in self._misses(keep))

    @property
    def shortfall(self) -> int:
        """Bytes by which the worst device misses its budget (0 when everything fits)."""
        return max(0, max(self._misses()))

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``autotune memory --json`` (stable: keys are only ever added)."""
        return {
            "settings": self.settings.to_dict(),
            "source": self.source,
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
            "gpu_overhead_learned": self.gpu_overhead_learned,
        }


# ----------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Ctx:
    """The context as the engine builds it from the settings."""

    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_tokens: int  # tokens of the reserve graph
    n_outputs: int
    swa_cells: int


def context(facts: ModelFacts, s: Settings) -> Ctx:
    n_ctx = pad(s.n_ctx, 256)
    n_batch = min(n_ctx, s.n_batch)  # causal attention: a batch never exceeds the context
    n_ubatch = min(n_batch, s.n_ubatch)
    n_tokens = min(n_ctx, n_ubatch)
    swa = n_ctx if s.swa_full else pad(min(n_ctx, facts.n_swa + n_ubatch), 256)
    return Ctx(n_ctx, n_batch, n_ubatch, n_tokens, min(n_tokens, n_batch), swa)


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


def repack_ok(type_name: str, shape: tuple[int, ...], features: frozenset[str], indexed: bool = False) -> bool:
    """Whether ggml-cpu gives this matrix a repacked layout (ggml_repack_get_optimal_repack_type): 2-D weights
    of a MUL_MAT, or the 3-D stacked experts of a MUL_MAT_ID (``indexed``)."""
    if len(shape) != (3 if indexed else 2) or "REPACK" not in features:
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
_AMX_ROW_MULTIPLE = {
    "Q4_0": 32,
    "Q4_1": 32,
    "Q8_0": 32,
    "Q4_K": 256,
    "Q5_K": 256,
    "Q6_K": 256,
    "IQ4_XS": 256,
    "F16": 16,
}
_AMX_BLOCK_EXTRA = {"Q8_0": 4, "Q4_K": 4, "Q5_K": 4, "IQ4_XS": 2}


def amx_bytes(type_name: str, shape: tuple[int, ...], n_bytes: int, features: frozenset[str]) -> int:
    """Bytes this MUL_MAT weight takes in the AMX buffer, 0 if it does not go there (amx.cpp supports_op and
    ggml_backend_amx_get_alloc_size). The engine offers that buffer first, before CPU_REPACK. A 3-D weight
    (DeepSeek's per-head attn_k_b) is accepted too, sized by its first two dimensions only, as amx.cpp does."""
    if len(shape) not in (2, 3) or not {"AMX_INT8", "AVX512_VNNI"} <= features:
        return 0
    k, n = shape[0], shape[1]
    multiple = _AMX_ROW_MULTIPLE.get(type_name)
    if multiple is None or k % multiple or n % 32:
        return 0
    if type_name == "F16":
        return n_bytes
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return n * (k // block) * (size + _AMX_BLOCK_EXTRA.get(type_name, 0))


def extra_bytes(
    type_name: str, shape: tuple[int, ...], n_bytes: int, features: frozenset[str], indexed: bool = False
) -> int:
    """Bytes a matrix multiplied on the host takes in an extra buffer (AMX, else CPU_REPACK); 0 for none.
    ``indexed``: stacked experts (MUL_MAT_ID), which AMX has no kernel for."""
    amx = 0 if indexed else amx_bytes(type_name, shape, n_bytes, features)
    if amx:
        return pad(amx, TENSOR_ALIGNMENT)
    return pad(n_bytes, TENSOR_ALIGNMENT) if repack_ok(type_name, shape, features, indexed) else 0


def weight_buffers(facts: ModelFacts, s: Settings, hw: Hardware, where: Placement) -> tuple[dict[str, int], int]:
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

    pins = pinned_to_host(facts, s)
    for i, t in enumerate(facts.tensors):
        expert = t.layer is not None and bool(EXPERTS.search(t.name))
        if i in pins:
            # experts or dense FFN weights kept on the host: an override to the CPU buffer type, for which the
            # loader picks from the host's buffer types, the extra ones included, as for a layer on the host
            dev = HOST
        elif t.layer is not None:
            dev = where.layers[t.layer] if t.layer < facts.n_layer else HOST
        elif t.name.startswith("output"):
            dev = where.output
        else:
            dev = HOST  # input layer (token embedding) always stays on the host
        # only matrix-multiply weights can live in an extra buffer; the embedding is read with GET_ROWS
        matmul = t.name.endswith(".weight") and t.name != "token_embd.weight" and len(t.shape) in (2, 3)
        host = dev == HOST and matmul
        extra = extra_bytes(t.type, t.shape, t.n_bytes, features, indexed=expert) if host else 0
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
            repack += extra_bytes(embd.type, embd.shape, embd.n_bytes, features)
    out = dict(plain)
    for dev, (first, last) in mapped.items():
        out[dev] = out.get(dev, 0) + last - first
    return out, repack


def pinned_to_host(facts: ModelFacts, s: Settings) -> frozenset[int]:
    """Indexes of the tensors the settings' overrides keep in host memory: the experts of
    ``Settings.experts_on_host`` and the dense FFN weights of ``Settings.ffn_on_host`` (llama.cpp's --n-cpu-moe /
    -ot and --n-cpu-ffn patterns)."""
    experts, ffn = s.experts_on_host(facts.moe_layers), s.ffn_on_host()
    return frozenset(
        i
        for i, t in enumerate(facts.tensors)
        if t.layer is not None
        and ((t.layer in experts and EXPERTS.search(t.name)) or (t.layer in ffn and DENSE_FFN.search(t.name)))
    )


# ----------------------------------------------------------------------------------------------- KV


def kv_buffers(facts: ModelFacts, s: Settings, c: Ctx, where: Placement) -> tuple[dict[str, int], tuple[KVCache, ...]]:
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
