"""The guard: Optuna constraints that steer a single-objective study away from configurations that win its
objective by giving another speed away (slower than the best baseline beyond one trial's noise).
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from ..engine import Measurement
from ..vocabulary import metrics
from .request import StudyRequest, objective_value

# How far below the best baseline trial another speed may measure before a trial counts as giving it up: one
# trial's noise (its repetitions share one process, so they spread less than runs do).
GUARD_TOLERANCE = 0.05


def guarded(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial gave no other speed away (``guard_values``; True where it was not guarded)."""
    return all(c <= 0 for c in t.constraints.values())


def guard_values(study: optuna.Study, req: StudyRequest, m: Measurement) -> dict[str, float]:
    """Optuna constraint values (<= 0: feasible) for a measured trial: per speed other than the objective, how far
    it falls short of the best baseline trial so far, beyond ``GUARD_TOLERANCE``. Set on the trial, they teach
    the TPE sampler where the objective is won without giving another speed away."""
    bases = [
        Measurement.from_dict(t.user_attrs["measurement"])
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("baseline")
    ]
    out = {}
    for felt in map(metrics.metric, metrics.FELT):
        if felt.speed == metrics.metric(req.objective).speed or not bases:
            continue
        ref = felt.best([objective_value(b, felt.name, req.workload) for b in bases])
        mine = objective_value(m, felt.name, req.workload)
        out[felt.name] = felt.shortfall(mine, ref) - GUARD_TOLERANCE if ref else 0.0
    return out
