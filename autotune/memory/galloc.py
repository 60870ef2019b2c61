"""A replay of ggml-alloc's graph allocator (architecture-neutral): the buffer each device's compute graph
needs, with the engine's in-place reuse, views and free-block search."""

from __future__ import annotations

from typing import Any

from .graph import INPLACE, INPUT, OUTPUT, Tensor
from .layout import TENSOR_ALIGNMENT, pad


def order(roots: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """ggml_build_forward_expand: depth-first over sources, leaves and nodes in first-visit order."""
    seen: set[int] = set()
    leafs: list[Tensor] = []
    nodes: list[Tensor] = []
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


class Alloc:
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


def allocate(
    leafs: list[Tensor], nodes: list[Tensor], marks: dict[int, int] | None = None
) -> tuple[dict[str, int], dict[int, Any]]:
    """ggml_gallocr_alloc_graph_impl, one allocator per device; returns each device's buffer size, and
    the allocator state right after each node of ``marks`` (id -> tag) was computed.

    A source computed on another device is read through a copy on the consumer's device, allocated with
    the graph inputs (the scheduler's split inputs)."""
    allocs: dict[str, Alloc] = {}
    copies: dict[tuple[int, str], Tensor] = {}
    live: dict[int, tuple[str, int, int]] = {}
    states: dict[int, Any] = {}
    marks = marks or {}

    def allocator(dev: str) -> Alloc:
        a = allocs.get(dev)
        if a is None:
            a = allocs[dev] = Alloc()
        return a

    for n in nodes:  # route cross-device reads through copies; the original lives until the copy is read
        src = list(n.src)
        for j, s in enumerate(n.src):
            if s.ext or s.dev == n.dev:
                continue
            key = (id(s), n.dev)
            cp = copies.get(key)
            if cp is None:
                cp = copies[key] = Tensor("NONE", s.type, s.ne, None, (), n.dev, flags=INPUT)
                cp.nbytes = s.nbytes
            src[j] = cp
            src.append(s)
        n.src = tuple(src)

    def allocate(t: Tensor) -> None:
        if t.ext or t.alloc or t.view_src is not None:
            return
        t.alloc = True
        if t.op in INPLACE:
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

    def free(t: Tensor) -> None:
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


def _free_extra(a: Alloc, node: Tensor, parent: Tensor) -> None:
    ps, ns = pad(parent.nbytes, TENSOR_ALIGNMENT), pad(node.nbytes, TENSOR_ALIGNMENT)
    if ps > ns:
        a.free(parent.addr + ns, ps - ns)
