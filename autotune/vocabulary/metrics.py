"""The metrics table: every number autotune measures and compares, written down once.

A metric's unit, whether a higher or a lower value is better, and which speed it is made of (decode is one token
per step, prefill the prompt's batches; time to first token is the prompt's time) live here, as a knob's facts
live in the knob table. The study's directions, the guard's shortfalls, the recommendation's ranking, plots and
printers read them instead of each deciding that "lower TTFT is better".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["maximize", "minimize"]  # Optuna's words


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str  # "tok/s", "s" or "bytes"
    higher_is_better: bool
    speed: str | None  # the speed it is made of: "decode", "prefill", or None (both, or not a speed)
    label: str  # axis and table label

    @property
    def sign(self) -> int:
        """+1 where a larger value is better, -1 where a smaller one is."""
        return 1 if self.higher_is_better else -1

    @property
    def direction(self) -> Direction:
        """Optuna's word for it."""
        return "maximize" if self.higher_is_better else "minimize"

    def best(self, values: list[float]) -> float:
        """The best of ``values`` on this metric."""
        return max(values) if self.higher_is_better else min(values)

    def shortfall(self, mine: float, ref: float) -> float:
        """How far ``mine`` falls short of ``ref``, as a fraction of ``ref`` (negative: it is better)."""
        return self.sign * (ref - mine) / ref


METRICS: tuple[Metric, ...] = (
    Metric("decode", "tok/s", True, "decode", "decode (tok/s)"),
    Metric("prefill", "tok/s", True, "prefill", "prefill (tok/s)"),
    Metric("ttft", "s", False, "prefill", "time to first token (s)"),
    Metric("balanced", "tok/s", True, None, "prompt + reply (tok/s)"),
    Metric("memory", "bytes", False, None, "peak memory (MiB, RSS + VRAM)"),
    # serving: many users at once
    Metric("throughput", "tok/s", True, "decode", "generated tok/s, all users"),
    Metric("user_tps", "tok/s", True, "decode", "tok/s per user"),
    Metric("ttft_p50", "s", False, "prefill", "median time to first token (s)"),
    Metric("ttft_p95", "s", False, "prefill", "p95 time to first token (s)"),
)
BY_NAME = {m.name: m for m in METRICS}
# What a user of one conversation feels; each is compared with its own best baseline.
FELT = ("decode", "prefill", "ttft")
# The speeds a single-user search may optimize.
OBJECTIVES = ("decode", "prefill", "ttft", "balanced")
# The axes of a Pareto study, in the order of its values.
PARETO = ("decode", "prefill", "memory")


def metric(name: str) -> Metric:
    return BY_NAME[name]
