"""What every architecture's reserve graph shares (llama-graph.cpp's helpers): the inputs, a cache's
attention inputs, the attention block with its K/V cache writes, the gated FFN and the output head.

An architecture's builder (one module each, like llama.cpp's ``src/models/*.cpp``) strings these together
with its own norms and scales. Tensors must be created and expanded in the engine's order: the allocator
replay depends on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...vocabulary.settings import QUANTIZED_KV
from ..graph import (
    OUTPUT,
    Attn,
    CacheInputs,
    Graph,
    Shape,
    Tensor,
    attention,
    hadamard,
    set_rows,
)
from ..layout import HOST, Ctx


@dataclass
class Builder:
    """One reserve graph being built: the graph, the model shape, the context and attention settings."""

    g: Graph
    sh: Shape
    c: Ctx
    s: Attn
    base: CacheInputs
    swa: CacheInputs
    out_ids: Tensor
    pos: Tensor

    @property
    def kv_gqa(self) -> int:
        return self.sh.n_head_kv * self.sh.head_dim

    def linear(self, name: str, x: Tensor, n_in: int, n_out: int) -> Tensor:
        g = self.g
        y = g.mul_mat(g.weight(g.dev, n_in, n_out), x)
        return g.unary("ADD", y, g.weight(g.dev, n_out)) if name in self.sh.biases else y

    def qkv(self, cur: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K and V projections, reshaped to heads."""
        sh, g, T = self.sh, self.g, self.c.n_tokens
        E, H, HKV, D = sh.n_embd, sh.n_head, sh.n_head_kv, sh.head_dim
        q = self.linear("attn_q", cur, E, H * D)
        k = self.linear("attn_k", cur, E, self.kv_gqa)
        v = self.linear("attn_v", cur, E, self.kv_gqa)
        return g.reshape(q, D, H, T), g.reshape(k, D, HKV, T), g.reshape(v, D, HKV, T)

    def attend(self, il: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """build_attn: rotations of quantized caches, the K/V cache writes, attention, the output projection."""
        g, sh, s, T, kv_gqa = self.g, self.sh, self.s, self.c.n_tokens, self.kv_gqa
        dev = sh.layer_dev[il]
        inp = self.swa if sh.swa_layers[il] else self.base
        cells = inp.cells
        kv_dev = dev if s.offload_kqv else HOST
        if inp.k_rot is not None:
            q = hadamard(g, q, inp.k_rot)
            k = hadamard(g, k, inp.k_rot)
        if inp.v_rot is not None:
            v = hadamard(g, v, inp.v_rot)
        # build_attn expands q, v, k (q, k, v for the sliding-window variant), then stores K and V
        g.expand(q)
        for t in (k, v) if any(sh.swa_layers) else (v, k):
            g.expand(t)
        g.dev = kv_dev
        cache_k = g.cache(s.type_k, kv_gqa, cells, kv_dev)
        cache_v = g.cache(s.type_v, kv_gqa, cells, kv_dev)
        k2 = g.view(k, (kv_gqa, T), (k.nb[0], k.nb[2], k.nb[2] * T, k.nb[2] * T))
        g.expand(set_rows(cache_k, k2, inp.k_idxs))
        if s.flash_attn:
            v2 = g.view(v, (kv_gqa, T), (v.nb[0], v.nb[2], v.nb[2] * T, v.nb[2] * T))
            g.expand(set_rows(cache_v, v2, inp.v_idxs))
        else:
            v2 = g.reshape(g.reshape(v, kv_gqa, T), 1, kv_gqa * T)
            g.expand(set_rows(g.reshape(cache_v, 1, kv_gqa * cells), v2, inp.v_idxs))
        cur = attention(g, q, cache_k, cache_v, inp.mask, s, sh.head_dim, sh.n_head, sh.n_head_kv, T, cells)
        g.expand(cur)
        g.dev = dev
        if inp.v_rot is not None:
            cur = hadamard(g, cur, inp.v_rot)
        return self.linear("attn_output", cur, sh.n_head * sh.head_dim, sh.n_embd)

    def output_rows(self, il: int, cur: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """The last layer keeps only the rows whose logits are wanted."""
        if il == self.sh.n_layer - 1:
            return self.g.get_rows(cur, self.out_ids), self.g.get_rows(residual, self.out_ids)
        return cur, residual

    def ffn(self, cur: Tensor) -> Tensor:
        """The gated feed-forward network (up, gate, GLU, down)."""
        sh, g = self.sh, self.g
        up = self.linear("ffn_up", cur, sh.n_embd, sh.n_ff)
        gate = self.linear("ffn_gate", cur, sh.n_embd, sh.n_ff)
        return self.linear("ffn_down", g.op("GLU", gate, (gate, up)), sh.n_ff, sh.n_embd)

    def head(self, inpL: Tensor) -> Graph:
        """The final norm and the output projection to logits."""
        g, sh = self.g, self.sh
        g.dev = sh.output_dev
        cur = g.norm(inpL)
        cur.flags |= OUTPUT
        logits = self.linear("output", cur, sh.n_embd, sh.n_vocab)
        logits.flags |= OUTPUT
        g.expand(logits)
        return g


def start(sh: Shape, c: Ctx, s: Attn, scale_embeddings: bool = False) -> tuple[Builder, Tensor]:
    """The graph's inputs in the order llama.cpp creates them (allocation depends on first use), and the
    token embeddings the first layer reads."""
    g = Graph()
    T, E, D = c.n_tokens, sh.n_embd, sh.head_dim
    tok_embd = g.weight(HOST, E, sh.n_vocab)
    tokens = g.input("i32", T)
    embd_in = g.input("f32", E, T)
    g.dev = HOST
    embd = g.get_rows(tok_embd, tokens)
    g.expand(embd)
    g.expand(embd_in)
    inpL = g.unary("SCALE", embd) if scale_embeddings else embd
    pos = g.input("i32", T)
    mask_type = "f16" if s.flash_attn else "f32"
    kv_gqa = sh.n_head_kv * D

    def attn_inputs(cells: int) -> CacheInputs:
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
        return CacheInputs(
            cells,
            g.input("i64", T),
            g.input("i64", T if s.flash_attn else T * kv_gqa),
            g.input(mask_type, cells, T),
            k_rot,
            v_rot,
        )

    base = attn_inputs(c.n_ctx)
    swa = attn_inputs(c.swa_cells) if any(sh.swa_layers) else base
    out_ids = g.input("i32", c.n_outputs)
    return Builder(g, sh, c, s, base, swa, out_ids, pos), inpL


Layers = Sequence[int]
