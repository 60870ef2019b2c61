"""The reserve graph of gemma3 (llama.cpp's ``src/models/gemma3.cpp``): scaled embeddings, Q/K norms, a
scaled Q, and norms after attention and after the FFN; sliding-window layers read their own cache."""

from __future__ import annotations

from ..graph import Attn, Graph, Shape
from ..layout import Ctx
from .common import Layers, start


def build(sh: Shape, c: Ctx, s: Attn, layers: Layers) -> Graph:
    """The prompt-processing reserve graph with the repeating layers ``layers`` (all, or a shortened run)."""
    b, inpL = start(sh, c, s, scale_embeddings=True)
    g = b.g
    for il in layers:
        g.dev = sh.layer_dev[il]
        inpSA = inpL
        q, k, v = b.qkv(g.norm(inpL))
        q = g.unary("ROPE", g.norm(q), b.pos)
        k = g.unary("ROPE", g.norm(k), b.pos)
        q = g.unary("SCALE", q)
        cur, inpSA = b.output_rows(il, b.attend(il, q, k, v), inpSA)
        ffn_inp = g.unary("ADD", g.norm(cur), inpSA)
        cur = g.norm(b.ffn(g.norm(ffn_inp)))
        inpL = g.unary("ADD", cur, ffn_inp)
        g.layer_out.append(inpL)
    return b.head(inpL)
