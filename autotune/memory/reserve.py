"""The compute buffer: the architecture's reserve graph built and replayed through the allocator, with long
runs of identical layers cut short where that provably leaves the allocator in the same state."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from .galloc import allocate, order
from .graph import Attn, Shape
from .graphs import BUILDERS
from .layout import Ctx


@lru_cache(maxsize=4096)
def compute_buffers(sh: Shape, c: Ctx, a: Attn) -> dict[str, int]:
    """Compute buffer bytes per device: the reserve graph replayed through the allocator."""
    collecting = gc.isenabled()
    gc.disable()  # thousands of short-lived tensors: the cyclic collector only costs time here
    try:
        keys = [(sh.layer_dev[il], sh.swa_layers[il]) for il in range(sh.n_layer)]
        plan, checks = layer_plan(keys)
        if checks:
            g = BUILDERS[sh.arch](sh, c, a, plan)
            marks = {id(g.layer_out[i]): i for pair in checks for i in pair}
            sizes, states = allocate(*order(g.roots), marks)
            if all(states[i] == states[j] for i, j in checks):
                return sizes
        g = BUILDERS[sh.arch](sh, c, a, range(sh.n_layer))
        return allocate(*order(g.roots))[0]
    finally:
        if collecting:
            gc.enable()


RUN_KEEP = 3  # periods of a run that are built before the rest of it is skipped
MAX_PERIOD = 8


def layer_plan(keys: Sequence[Any]) -> tuple[list[int], list[tuple[int, int]]]:
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
