"""One reserve-graph builder per architecture, as llama.cpp keeps one per model in ``src/models``. An
architecture is supported by the memory model exactly when it has a builder here that was checked against
the engine's dry run."""

from __future__ import annotations

from collections.abc import Callable

from ..graph import Attn, Graph, Shape
from ..layout import Ctx
from . import gemma3, llama
from .common import Layers

BUILDERS: dict[str, Callable[[Shape, Ctx, Attn, Layers], Graph]] = {
    "llama": llama.build,
    "qwen2": llama.build,
    "qwen3": llama.build,
    "gemma3": gemma3.build,
}
