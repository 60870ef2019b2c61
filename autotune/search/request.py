"""What defines one study, and so its name (``StudyRequest``), and the number it optimizes: each objective's
value from a measurement's repetitions, and the directions Optuna is told.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from .. import engine
from ..engine import Engine, Measurement, Workload
from ..facts.gguf_model import ModelFacts
from ..facts.probe import Hardware
from ..vocabulary import metrics
from ..vocabulary.settings import Settings
from .space import SearchSpace
from .storage import digest, study_name


def objective_samples(m: Measurement, objective: str, workload: Workload) -> list[float]:
    """One objective value per repetition of a run (``balanced``: end-to-end tok/s of prompt + reply)."""
    if objective == "prefill":
        return list(m.prefill_tps)
    if objective == "ttft":
        return list(m.ttft_s)
    if objective == "balanced":
        n = workload.prompt_tokens + workload.gen_tokens
        return [n / (t + (workload.gen_tokens - 1) / d) for t, d in zip(m.ttft_s, m.decode_tps, strict=False) if d > 0]
    return list(m.decode_tps)


def objective_value(m: Measurement, objective: str, workload: Workload) -> float:
    """The number the study optimizes: the median over the run's repetitions."""
    values = objective_samples(m, objective, workload)
    return statistics.median(values) if values else 0.0


def directions(objective: str, pareto: bool) -> list[metrics.Direction]:
    if pareto:
        return [metrics.metric(name).direction for name in metrics.PARETO]
    return [metrics.metric(objective).direction]


@dataclass
class StudyRequest:
    """Everything that defines one study (and so its name)."""

    model_path: str
    facts: ModelFacts
    hw: Hardware
    space: SearchSpace
    objective: str = "decode"
    pareto: bool = False
    workload: Workload = field(default_factory=Workload)
    storage: str | None = None
    seed: int = 0
    pins: dict[str, Any] = field(default_factory=dict)  # what the user pinned (--set)
    forced: dict[str, Any] = field(default_factory=dict)  # what the engine self-check pinned to avoid a crash
    start: Settings | None = None  # what the user runs today (--from-cmdline): a baseline, measured first
    engine: Engine = engine.bundled  # what measures every trial and baseline (the CLI's --engine)
    stage: str = ""  # a second stage's tag: the knobs the first left alone, over its best (``pipeline``)
    guard: bool = False  # steer the sampler away from configs slower than the best baseline on another speed

    @property
    def n_ctx(self) -> int:
        return self.space.base.n_ctx

    def name(self) -> str:
        goal = "pareto" if self.pareto else self.objective
        w = self.workload
        parts = [f"ctx{self.n_ctx}", goal, f"p{w.prompt_tokens}g{w.gen_tokens}" + (f"d{w.depth}" if w.depth else "")]
        if engine.study_key(self.engine):
            parts.append(engine.study_key(self.engine))
        if self.stage:
            parts.append(self.stage)
        for label, pinned in (("pins", self.pins), ("forced", self.forced)):
            if pinned:
                parts.append(label + digest(pinned))
        return study_name(self.model_path, self.hw, *parts)
