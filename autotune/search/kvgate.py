"""The K/V-quality gate: how each quantized K/V cache pair changes the model's outputs against an f16 cache,
measured once per study and stored on it, and the pairs beyond a threshold kept out of the search space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from .. import engine
from .request import StudyRequest
from .space import SearchSpace, kv_pairs

# (max mean KL to the f16 cache, min top-1 agreement) a quantized K/V pair must meet.
KV_QUALITY = {"strict": (0.01, 0.92), "relaxed": (0.05, 0.85)}


@dataclass(frozen=True)
class PairQuality:
    """One quantized K/V pair against the f16 cache: its divergence, or why it could not be measured. A field
    the stored measurement lacks stays None and out of ``to_json``, so a study's stored report reads back as is."""

    pair: str  # "type_k/type_v"
    excluded: bool  # beyond the threshold (or unmeasured): kept out of the search
    top1_agreement: float | None = None
    mean_kl: float | None = None
    max_kl: float | None = None
    tokens: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The shape stored in a tuned config's evidence: the engine's measurement, then ``excluded``."""
        measured = {
            "top1_agreement": self.top1_agreement,
            "mean_kl": self.mean_kl,
            "max_kl": self.max_kl,
            "tokens": self.tokens,
            "error": self.error,
        }
        return {**{k: v for k, v in measured.items() if v is not None}, "excluded": self.excluded}


@dataclass(frozen=True)
class KvQuality:
    """The gate's verdict on every quantized K/V pair of the space, in the order the study measured them
    (empty when the gate is off)."""

    pairs: tuple[PairQuality, ...] = ()

    def to_json(self) -> dict[str, dict[str, Any]]:
        """Keyed by "type_k/type_v", as ``--json`` and the tuned config's evidence have always had it."""
        return {p.pair: p.to_json() for p in self.pairs}

    def excluded(self) -> list[str]:
        return [p.pair for p in self.pairs if p.excluded]


def kv_quality(study: optuna.Study, req: StudyRequest, level: str = "strict") -> tuple[SearchSpace, KvQuality]:
    """Measure (once per study) how each quantized K/V pair changes the model's outputs, and drop the pairs
    beyond the ``level`` threshold from the space. Returns the space and the per-pair report."""
    if level == "off":
        return req.space, KvQuality()
    pairs = kv_pairs(req.space)
    report = dict(study.user_attrs.get("kv_quality", {}))
    missing = [p for p in pairs if f"{p[0]}/{p[1]}" not in report]
    if missing:
        report.update(engine.divergence(req.model_path, missing, req.space.base))
        study.set_user_attr("kv_quality", report)
    max_kl, min_top1 = KV_QUALITY[level]
    excluded = set()
    for k, v in pairs:
        r = report.get(f"{k}/{v}", {})
        if "error" in r or r.get("mean_kl", 1e9) > max_kl or r.get("top1_agreement", 0.0) < min_top1:
            excluded.add((k, v))
    verdicts = (
        _pair(key, r, tuple(key.split("/")) in excluded) for key, r in report.items() if tuple(key.split("/")) in pairs
    )
    return req.space.without_kv(excluded), KvQuality(tuple(verdicts))


def _pair(key: str, measured: dict[str, Any], excluded: bool) -> PairQuality:
    """A stored (engine-written) measurement as a PairQuality."""
    return PairQuality(
        key,
        excluded,
        measured.get("top1_agreement"),
        measured.get("mean_kl"),
        measured.get("max_kl"),
        measured.get("tokens"),
        measured.get("error"),
    )
