"""The reserve graph of llama, qwen2 (biases on Q/K/V) and qwen3 (per-head Q/K norms): llama.cpp's
``src/models/llama.cpp``, ``qwen2.cpp`` and ``qwen3.cpp`` share this layer."""

from __future__ import annotations

from ..graph import Attn, Graph, Shape
from ..layout import Ctx
from .common import Layers, start


def build(sh: Shape, c: Ctx, s: Attn, layers: Layers) -> Graph:
    """The prompt-processing reserve graph with the repeating layers ``layers`` (all, or a shortened run)."""
    b, inpL = start(sh, c, s)
    g = b.g
    for il in layers:
        g.dev = sh.layer_dev[il]
        inpSA = inpL
        q, k, v = b.qkv(g.norm(inpL))
        if sh.qk_norm:
            q = g.norm(q)
        q = g.unary("ROPE", q, b.pos)
        if sh.qk_norm:
            k = g.norm(k)
        k = g.unary("ROPE", k, b.pos)
        cur, inpSA = b.output_rows(il, b.attend(il, q, k, v), inpSA)
        ffn_inp = g.unary("ADD", cur, inpSA)
        inpL = g.unary("ADD", b.ffn(g.norm(ffn_inp)), ffn_inp)
        g.layer_out.append(inpL)
    return b.head(inpL)
