"""The Optuna study: created once in its storage, or resumed (by a second run of the same command, or by a worker
on another machine of the same kind), with its sampler and pruner; the search's study records what it was asked
and queues its baselines as its first trials.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import optuna

from ..facts.gguf_model import file_sha256
from ..facts.probe import Hardware
from ..vocabulary.errors import StudyError
from .baselines import PLACEMENT_KNOBS, baselines
from .request import StudyRequest, directions
from .storage import fail_orphans, open_storage


def pruner() -> optuna.pruners.BasePruner:
    """Stop a trial after its first repetition when that is worse than the median of earlier trials' first
    repetitions: on a small CPU the configs that matter differ by far more than one repetition's noise (one
    decode thread instead of two halves decode), and a pruned trial costs one repetition instead of all."""
    return optuna.pruners.MedianPruner(n_startup_trials=6, n_warmup_steps=0)


# Trials (the baselines among them) before TPE models the results: the first stage's space is a few dozen
# configs, so the model takes over early.
STARTUP_TRIALS = 5


def sampler(seed: int) -> optuna.samplers.TPESampler:
    """The studies' sampler: seeded multivariate TPE, modelling from the ``STARTUP_TRIALS``-th trial; the
    constant liar keeps workers sharing a study from sampling the same point."""
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS, multivariate=True, constant_liar=True)


def open_named(
    name: str,
    storage: str | None,
    seed: int,
    goals: Sequence[Literal["minimize", "maximize"]],
    hw: Hardware,
    engine_of: dict[str, str],
    describe: Callable[[optuna.Study], None],
) -> optuna.Study:
    """Create study ``name``, or load it to resume: a worker joins only on the same kind of machine and engine
    build (``engine_of``: its name and build key), and the trials a dead tuner of this host left running are
    failed. Only the tuner whose ``create_study`` succeeds (the database's unique study name decides, however
    many tuners start at once) records the machine and engine and calls ``describe`` (attributes, first trials),
    so they are written once."""
    store = open_storage(storage)
    try:
        study = optuna.create_study(
            study_name=name, storage=store, sampler=sampler(seed), pruner=pruner(), directions=goals
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=store, sampler=sampler(seed), pruner=pruner())
        _check_same_kind(study, hw, engine_of["build"])
        fail_orphans(study, store)
        return study
    except ValueError as e:
        raise StudyError(f"study {name}: {e}") from None
    study.set_user_attr("hardware", hw.to_dict())
    study.set_user_attr("engine", engine_of)
    describe(study)
    return study


def open_study(req: StudyRequest) -> optuna.Study:
    """The search's study (``open_named``): the model, workload, objective and space recorded, and the baselines
    enqueued as its first trials, so they are measured once."""
    mine = {"name": req.engine.name, "build": req.engine.build_key()}
    return open_named(
        req.name(),
        req.storage,
        req.seed,
        directions(req.objective, req.pareto),
        req.hw,
        mine,
        lambda study: _describe(study, req),
    )


def _describe(study: optuna.Study, req: StudyRequest) -> None:
    study.set_user_attr(
        "model",
        {
            "path": req.model_path,
            "sha256": file_sha256(req.model_path),
            "architecture": req.facts.architecture,
            "name": req.facts.name,
        },
    )
    study.set_user_attr("workload", req.workload.__dict__)
    study.set_user_attr("objective", "pareto" if req.pareto else req.objective)
    study.set_user_attr("n_ctx", req.n_ctx)
    study.set_user_attr("pins", req.pins)
    study.set_user_attr("forced", req.forced)
    study.set_user_attr("space", req.space.describe())
    study.set_user_attr("stage", req.stage)
    seeds = ([("stage 1's best", req.space.base, False)] if req.stage else []) + [
        (role, s, True) for role, s in baselines(req)
    ]
    enqueued: list[dict[str, Any]] = []
    for role, s, baseline in seeds:  # each baseline is a trial too; one whose parameters are already queued is not
        params = req.space.params_of(s)
        if params not in enqueued:
            enqueued.append(params)
            same = all(getattr(req.space.settings_from(params), k) == getattr(s, k) for k in PLACEMENT_KNOBS)
            # a baseline placed outside the space seeds the nearest trial, which is not that baseline (the
            # side-by-side measures the baseline itself)
            study.enqueue_trial(
                params,
                user_attrs={
                    "role": role if same else f"{role}, placed as the space allows",
                    "baseline": baseline and same,
                },
            )


def _check_same_kind(study: optuna.Study, hw: Hardware, build: str) -> None:
    """A worker joins a study only on the same kind of machine and engine build: timings from different ones
    are not comparable, and one study would mix them."""
    theirs = study.user_attrs.get("hardware", {}).get("fingerprint")
    if theirs and theirs != hw.fingerprint():
        raise StudyError(
            f"study {study.study_name} was made on hardware {theirs}; this machine is "
            f"{hw.fingerprint()}: its timings would not be comparable (run a study of its own)"
        )
    recorded = study.user_attrs.get("engine", {}).get("build")
    if recorded and recorded != build:
        raise StudyError(
            f"study {study.study_name} was measured with engine build {recorded}; this worker's is "
            f"{build}: its timings would not be comparable"
        )
