"""The K/V-quality gate: how each quantized K/V cache pair changes the model's outputs against an f16 cache,
measured once per study and stored on it, and the pairs beyond a threshold kept out of the search space.
"""

from __future__ import annotations

from typing import Any

import optuna

from .. import engine
from .request import StudyRequest
from .space import SearchSpace, kv_pairs

# (max mean KL to the f16 cache, min top-1 agreement) a quantized K/V pair must meet.
KV_QUALITY = {"strict": (0.01, 0.92), "relaxed": (0.05, 0.85)}


def kv_quality(study: optuna.Study, req: StudyRequest, level: str = "strict") -> tuple[SearchSpace, dict[str, Any]]:
    """Measure (once per study) how each quantized K/V pair changes the model's outputs, and drop the pairs
    beyond the ``level`` threshold from the space. Returns the space and the per-pair report."""
    if level == "off":
        return req.space, {}
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
    return req.space.without_kv(excluded), {
        key: {**r, "excluded": tuple(key.split("/")) in excluded}
        for key, r in report.items()
        if tuple(key.split("/")) in set(pairs)
    }
