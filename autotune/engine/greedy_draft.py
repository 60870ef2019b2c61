"""A draft model for speculative decoding measured in Python: a second GGUF proposing tokens greedily.

The main model's loop (``child._speculate``) evaluates the proposals in one batch and keeps those it would have
chosen, as llama-cpp-python's ``Llama(draft_model=...)`` does. It lives in the engine package because it is
engine code: it runs only in engine child processes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt

from ..settings import Settings
from .native import Context, Faults, Model


class GreedyDraft:
    """A second GGUF model proposing ``settings.draft_max`` tokens greedily to the main model's loop.

    Its KV cache follows the main's token history: only the tokens past the common prefix are evaluated
    (usually one or two), never the whole history again. Whether the last proposals were accepted is
    read off the next call's history. ``reset()`` starts a new generation; the counters keep adding up.
    """

    def __init__(self, path: str, settings: Settings, faults: Faults | None = None) -> None:
        mine = settings.replace(n_gpu_layers=settings.draft_gpu_layers, draft_model=None)
        self.model = Model(path, mine)
        self.llm = Context(self.model, mine, faults)
        self.n_max = settings.draft_max
        self._n_vocab = self.model.n_vocab
        self._pending: tuple[npt.NDArray[np.intc], list[int]] | None = None  # history, proposals
        self.proposed = self.accepted = self.steps = 0
        self.seconds = 0.0

    def __call__(self, input_ids: Any) -> npt.NDArray[np.intc]:
        start = time.perf_counter()
        ids = np.asarray(input_ids, dtype=np.intc)
        self._resolve(ids)
        n = min(self.n_max, self.llm.n_ctx() - len(ids))
        proposals: list[int] = []
        if n > 0 and self._sync(ids):
            for i in range(n):
                proposals.append(self._argmax())
                if i < n - 1:
                    self.llm.eval([proposals[-1]])
            self._pending = (ids.copy(), proposals)
        self.seconds += time.perf_counter() - start
        return np.array(proposals, dtype=np.intc)

    def _resolve(self, ids: npt.NDArray[np.intc]) -> None:
        """Count the last proposals: the main kept those that now follow the old history."""
        if self._pending is None:
            return
        old, proposals = self._pending
        self._pending = None
        if len(ids) <= len(old) or not np.array_equal(ids[: len(old)], old):
            return  # another generation: nothing to learn
        new = ids[len(old):]
        kept = 0
        while kept < min(len(proposals), len(new) - 1) and new[kept] == proposals[kept]:
            kept += 1
        self.steps += 1
        self.proposed += len(proposals)
        self.accepted += kept

    def _sync(self, ids: npt.NDArray[np.intc]) -> bool:
        """Bring the draft's cache to ``ids``, evaluating only what follows the common prefix."""
        llm = self.llm
        m = min(llm.n_tokens, len(ids))
        differ = np.flatnonzero(llm.input_ids[:m] != ids[:m])
        prefix = int(differ[0]) if len(differ) else m
        prefix = min(prefix, len(ids) - 1)  # evaluate at least the last token: its logits are the next guess
        rest = ids[prefix:]
        if rest.max() >= self._n_vocab:
            return False  # a main-only token id (vocabs may differ by up to 128): no guess possible
        llm.n_tokens = prefix
        llm.eval(rest.tolist())
        return True

    def _argmax(self) -> int:
        return self.llm.greedy()

    def reset(self) -> None:
        self._pending = None
        self.llm.reset()

    def close(self) -> None:
        self.llm.close()
        self.model.close()

    def stats(self) -> dict[str, Any]:
        return {
            "draft_max": self.n_max,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance": self.accepted / self.proposed if self.proposed else 0.0,
            "steps": self.steps,
            "accepted_per_step": self.accepted / self.steps if self.steps else 0.0,
            "draft_s": self.seconds,
        }
