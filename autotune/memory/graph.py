"""Just enough of ggml to rebuild a llama.cpp reserve graph: tensors with shapes, strides, ops and devices,
the graph that creates and expands them, and the attention ops they share."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..facts.gguf_model import ModelFacts
from ..vocabulary.settings import QUANTIZED_KV, row_bytes
from .layout import HOST, Placement

# ---------------------------------------------------------------------------------- compute (graph)

# (block size, bytes per block) of every type a graph tensor can have
_TYPE_SIZE = {"f32": (1, 4), "f16": (1, 2), "i32": (1, 4), "i64": (1, 8)} | {
    t: GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]] for t in QUANTIZED_KV | {"bf16"}
}
# ggml_op_can_inplace, restricted to the ops these graphs use
INPLACE = frozenset({"SCALE", "ADD", "MUL", "UNARY", "ROPE", "RMS_NORM", "SOFT_MAX"})
INPUT, OUTPUT = 1, 2  # GGML_TENSOR_FLAG_INPUT / _OUTPUT


class Tensor:
    """A ggml tensor as far as the allocator cares: shape, strides, op, sources, where it lives."""

    __slots__ = (
        "addr",
        "alloc",
        "dev",
        "ext",
        "flags",
        "nb",
        "nbytes",
        "nchild",
        "ne",
        "nviews",
        "op",
        "src",
        "type",
        "view_src",
    )

    def __init__(
        self,
        op: str,
        type_: str,
        ne: tuple[int, ...],
        nb: tuple[int, ...] | None,
        src: tuple[Tensor, ...],
        dev: str,
        view_src: Tensor | None = None,
        flags: int = 0,
        ext: bool = False,
    ) -> None:
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


def ne4(*ne: int) -> tuple[int, ...]:
    return tuple(ne) + (1,) * (4 - len(ne))


class Graph:
    """Just enough of ggml's graph building to reproduce a llama.cpp reserve graph."""

    def __init__(self) -> None:
        self.dev = HOST
        self.roots: list[Tensor] = []
        self.layer_out: list[Tensor] = []  # each built layer's output, in build order

    # leaves
    def weight(self, dev: str, n_in: int, n_out: int = 1) -> Tensor:
        return Tensor("NONE", "f16", ne4(n_in, n_out), None, (), dev, ext=True)

    def cache(self, type_: str, width: int, cells: int, dev: str) -> Tensor:
        return Tensor("NONE", type_, ne4(width, cells), None, (), dev, ext=True)

    def input(self, type_: str, *ne: int) -> Tensor:
        return Tensor("NONE", type_, ne4(*ne), None, (), HOST, flags=INPUT)

    # ops
    def op(self, op: str, like: Tensor | tuple[int, ...], src: tuple[Tensor, ...], type_: str = "f32") -> Tensor:
        ne = like.ne if isinstance(like, Tensor) else ne4(*like)
        return Tensor(op, type_, ne, None, src, self.dev)

    def view(self, a: Tensor, ne: tuple[int, ...], nb: tuple[int, ...] | None = None, op: str = "VIEW") -> Tensor:
        base = a.view_src or a
        return Tensor(op, a.type, ne4(*ne), nb, (a,), base.dev if base.ext else a.dev, view_src=base)

    def reshape(self, a: Tensor, *ne: int) -> Tensor:
        return self.view(a, ne, None, "RESHAPE")

    def permute(self, a: Tensor, p: tuple[int, int, int, int]) -> Tensor:
        ne, nb = [0] * 4, [0] * 4
        for i in range(4):
            ne[p[i]], nb[p[i]] = a.ne[i], a.nb[i]
        return self.view(a, tuple(ne), tuple(nb), "PERMUTE")

    def mul_mat(self, w: Tensor, x: Tensor) -> Tensor:
        return self.op("MUL_MAT", (w.ne[1], x.ne[1], x.ne[2], x.ne[3]), (w, x))

    def get_rows(self, a: Tensor, idx: Tensor) -> Tensor:
        return self.op("GET_ROWS", (a.ne[0], idx.ne[0], idx.ne[1], idx.ne[2]), (a, idx))

    def unary(self, op: str, a: Tensor, *more: Tensor) -> Tensor:
        return self.op(op, a, (a, *more))

    def norm(self, x: Tensor) -> Tensor:
        """build_norm with LLM_NORM_RMS and a weight."""
        return self.unary("MUL", self.unary("RMS_NORM", x), self.weight(self.dev, x.ne[0]))

    def contiguous(self, a: Tensor) -> bool:
        return a.nb == Tensor("NONE", a.type, a.ne, None, (), a.dev).nb

    def expand(self, t: Tensor) -> None:
        self.roots.append(t)


def hadamard(g: Graph, cur: Tensor, rot: Tensor) -> Tensor:
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
class Shape:
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


def shape_of(facts: ModelFacts, where: Placement) -> Shape:
    names = {t.name for t in facts.tensors}
    return Shape(
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
class Attn:
    """The settings the compute graph depends on (a small cache key)."""

    flash_attn: bool
    type_k: str
    type_v: str
    offload_kqv: bool


@dataclass(frozen=True)
class CacheInputs:
    cells: int
    k_idxs: Tensor
    v_idxs: Tensor
    mask: Tensor
    k_rot: Tensor | None
    v_rot: Tensor | None


def set_rows(dst: Tensor, src: Tensor, idx: Tensor) -> Tensor:
    """ggml_set_rows: writes into the (external) cache, the result is a view of it."""
    base = dst.view_src or dst
    return Tensor("SET_ROWS", dst.type, dst.ne, dst.nb, (src, idx, dst), base.dev, view_src=base)


def attention(
    g: Graph, q: Tensor, ck: Tensor, cv: Tensor, mask: Tensor, s: Attn, D: int, H: int, HKV: int, T: int, cells: int
) -> Tensor:
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
