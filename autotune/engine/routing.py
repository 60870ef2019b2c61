"""How a mixture-of-experts model's routers spread a prompt's tokens over the experts, read from the engine
itself: the model is loaded on the CPU in a child process, a prompt is decoded, and the engine's eval callback
hands over each MoE layer's chosen experts (llama.cpp's ``ffn_moe_topk-<layer>`` tensors, src/llama-graph.cpp).

It checks that a synthetic model routes like a trained one (``synth.write_model``'s routing data): with all-zero
weights every token goes to the same experts, and MoE prefill would be measured on one hot expert set.

``expert_routing`` is the parent's side; ``serve`` runs in the engine child (``child.serve``, mode "routing").
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from ..vocabulary.settings import Settings
from . import bundled

TOPK = "ffn_moe_topk-"  # llama-graph.cpp names each layer's selected experts so: cb(selected_experts, ...)


@dataclass(frozen=True)
class Routing:
    """Per MoE layer, how many times each expert was chosen over a prompt of ``n_tokens`` tokens."""

    n_tokens: int
    n_expert: int
    n_expert_used: int
    counts: dict[int, tuple[int, ...]]  # layer -> choices per expert (they sum to n_tokens * n_expert_used)

    def chosen(self) -> dict[int, int]:
        """Per layer, the experts at least one token went to."""
        return {layer: sum(1 for c in per_expert if c) for layer, per_expert in self.counts.items()}

    def fraction(self) -> dict[int, float]:
        """Per layer, the share of the experts that at least one token went to."""
        return {layer: n / self.n_expert for layer, n in self.chosen().items()}

    def min_fraction(self) -> float:
        """The share in the layer that used the fewest experts (0 without MoE layers)."""
        return min(self.fraction().values(), default=0.0)


def expert_routing(
    model_path: str, n_tokens: int = 512, prompt_kind: str = "prose", n_threads: int = 2, timeout: float = 600.0
) -> Routing:
    """Decode ``n_tokens`` of the fixed ``prompt_kind`` text (repeated as needed) with the model on the CPU, in a
    child process, and count per MoE layer which experts the routers chose. ModelError when the engine refuses
    the model, EngineDied when the child dies or hangs."""
    # extra buffer types off: they are irrelevant here and crash multi-token decodes on some CPUs (README,
    # Troubleshooting)
    settings = Settings(
        n_ctx=n_tokens,
        n_batch=n_tokens,
        n_ubatch=min(n_tokens, 512),
        n_threads=n_threads,
        n_threads_batch=n_threads,
        n_gpu_layers=0,
        use_extra_bufts=False,
    )
    request = {
        "mode": "routing",
        "model": model_path,
        "settings": settings.to_dict(),
        "tokens": n_tokens,
        "prompt_kind": prompt_kind,
    }
    r = bundled.answer(request, timeout, "counting the experts' routing failed")
    return Routing(
        r["n_tokens"],
        r["n_expert"],
        r["n_expert_used"],
        {int(layer): tuple(c) for layer, c in sorted(r["counts"].items(), key=lambda kv: int(kv[0]))},
    )


# ------------------------------------------------------------------------------------------- the child's side


class _Tensor(ctypes.Structure):
    """The head of ggml's ``struct ggml_tensor`` (ggml.h), as far as the fields read here."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


def serve(request: dict[str, Any]) -> dict[str, Any]:
    """The child's answer to a "routing" request: per MoE layer, the choices per expert over the prompt."""
    import llama_cpp as L

    from .base import prompt_text
    from .native import Model, Refused, context_params, silence

    silence()
    L.llama_backend_init()
    settings = Settings.from_dict(request["settings"])
    try:
        model = Model(request["model"], settings)
    except Refused as e:
        return {"error": str(e)}
    text = prompt_text(request["prompt_kind"])
    tokens = model.tokenize(text)
    while len(tokens) < request["tokens"]:
        tokens += model.tokenize(text, add_bos=False)
    tokens = tokens[: request["tokens"]]
    counter = _Counter(L.llama_cpp._lib)
    params = context_params(settings)
    params.cb_eval = counter.callback
    ctx = L.llama_init_from_model(model.ptr, params)
    try:
        if not ctx:
            return {"error": "the engine refused the context"}
        if not _decode_all(ctx, tokens):
            return {"error": f"llama_decode failed on {len(tokens)} tokens"}
    finally:
        if ctx:
            L.llama_free(ctx)
        model.close()
    return {
        "n_tokens": len(tokens),
        "n_expert": counter.n_expert,
        "n_expert_used": counter.n_expert_used,
        "counts": {str(layer): c for layer, c in counter.counts.items()},
    }


def _decode_all(ctx: Any, tokens: list[int]) -> bool:
    """Decode ``tokens`` as one batch with every token's logits asked for: the engine computes the last layer
    only for tokens whose output is wanted, so with the last token's alone that layer would route one token."""
    import llama_cpp as L

    batch = L.llama_batch_init(len(tokens), 0, 1)
    try:
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, True
            batch.seq_id[i][0] = 0
        return L.llama_decode(ctx, batch) == 0
    finally:
        L.llama_batch_free(batch)


class _Counter:
    """The eval callback: asks the engine for every ``ffn_moe_topk-<layer>`` tensor and, once computed, counts
    the expert ids in it (a view of the top rows of an argsort: ``n_expert_used`` ids per token)."""

    def __init__(self, lib: Any) -> None:
        import llama_cpp as L

        self.lib = lib
        lib.ggml_nbytes.argtypes, lib.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_backend_tensor_get.restype = None
        self.counts: dict[int, list[int]] = {}
        self.n_expert = self.n_expert_used = 0
        self.callback = L.ggml_backend_sched_eval_callback(self._observe)  # kept: the engine holds only its address

    def _observe(self, t: int, ask: bool, user_data: int) -> bool:
        """Asked first whether a node is wanted; then, for those wanted, called with it computed (True: go on)."""
        tensor = _Tensor.from_address(t)
        name = tensor.name.decode(errors="replace")
        if ask:
            return name.startswith(TOPK)
        self._count(int(name[len(TOPK) :]), t, tensor)
        return True

    def _count(self, layer: int, t: int, tensor: _Tensor) -> None:
        import numpy as np

        used, n_tokens, row = tensor.ne[0], tensor.ne[1], tensor.nb[1]
        raw = (ctypes.c_char * (row * n_tokens))()
        self.lib.ggml_backend_tensor_get(t, raw, 0, self.lib.ggml_nbytes(t))  # works wherever the tensor lives
        ids = np.frombuffer(raw, dtype=np.int32).reshape(n_tokens, row // 4)[:, :used]
        self.n_expert = _Tensor.from_address(tensor.view_src).ne[0] if tensor.view_src else self.n_expert
        self.n_expert_used = int(used)
        per_expert = self.counts.setdefault(layer, [0] * self.n_expert)
        for expert, n in zip(*np.unique(ids, return_counts=True), strict=False):
            per_expert[int(expert)] += int(n)
