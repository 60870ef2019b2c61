"""The trial loop: each trial is asked for, checked against the memory model (a configuration that cannot fit is
recorded as pruned with the reason and never run), measured by the engine in its own process, and told back:
complete with its objective value(s), or failed with the engine's reason. A failure is never scored as 0 tok/s,
which would teach the sampler something false. The loop stops early when the best stops moving.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from .. import engine, memory
from ..engine import Measurement
from ..engine.base import GpuPeak
from ..facts.probe import Hardware
from ..memory import overhead
from ..vocabulary.errors import EngineDied, EngineRefused
from ..vocabulary.settings import Settings
from .guard import guard_values
from .request import StudyRequest, objective_value
from .space import leanest_attention
from .storage import heartbeat, worker_host


def leanest(req: StudyRequest) -> memory.MemoryEstimate:
    """The smallest footprint the space can reach: if even this does not fit, no trial can."""
    s = req.space.base
    attention = req.space.params.get("attention", ())
    if attention:
        s = s.replace(**leanest_attention(attention))
    ubatch = min(req.space.params.get("n_ubatch", (s.n_ubatch,)))
    s = s.replace(n_ubatch=ubatch, n_batch=max(ubatch, s.n_batch if "n_batch" in req.pins else ubatch))
    layers = req.space.int_ranges.get("n_gpu_layers", (s.n_gpu_layers, s.n_gpu_layers))
    s = s.replace(n_cpu_moe=req.space.int_ranges.get("n_cpu_moe", (s.n_cpu_moe, s.n_cpu_moe))[1])  # most on the host
    options = [memory.estimate(req.facts, s.replace(n_gpu_layers=n), req.hw) for n in sorted(set(layers))]
    return min(options, key=lambda e: e.shortfall)


@dataclass
class Progress:
    """What the display shows after each trial."""

    done: int = 0
    total: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    last: str = ""
    best: float | None = None
    stopped: str = ""  # why the study stopped before its trial budget (the best stopped moving)


class TrialFailed(Exception):
    """An engine run that failed: the trial is recorded as failed, with its reason, and the study goes on."""


# The study stops early once this many finished trials in a row have not moved the best by more than
# MIN_GAIN (one trial's noise is about 10 %, so smaller gains would be chance), after at least MIN_TRIALS.
PATIENCE = 6
MIN_GAIN = 0.03
MIN_TRIALS = 10


def stalled(study: optuna.Study, patience: int, min_trials: int = MIN_TRIALS) -> str:
    """Why the study should stop now ("": it should not): the best complete value has not moved by more than
    ``MIN_GAIN`` over the last ``patience`` finished trials (``patience`` 0: never stop early)."""
    if patience <= 0 or len(study.directions) > 1:
        return ""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    if len(finished) < max(min_trials, patience + 1):
        return ""
    lower = study.direction == optuna.study.StudyDirection.MINIMIZE

    def best(trials: list[optuna.trial.FrozenTrial]) -> float | None:
        values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        return (min(values) if lower else max(values)) if values else None

    before, now = best(finished[:-patience]), best(finished)
    if before is None or now is None:
        return ""
    gain = before / now if lower else now / before
    if gain > 1 + MIN_GAIN:
        return ""
    return f"stopped early: the last {patience} trials moved the best by {100 * (gain - 1):.1f} % (under {100 * MIN_GAIN:.0f} %)"


# One trial's measuring step: it records what it measured on the trial and says how the trial ended (with its
# "reason" user attribute set where it did not complete) and, when complete, the objective value(s).
Step = Callable[[optuna.Trial], "tuple[TrialState, list[float] | None]"]


def run_trials(
    study: optuna.Study,
    req: StudyRequest,
    n_trials: int,
    timeout: float | None = None,
    trial_timeout: float = 300.0,
    on_progress: Callable[[Progress], None] | None = None,
    patience: int = PATIENCE,
    min_trials: int = MIN_TRIALS,
) -> Progress:
    """The search's trials through ``run``: each is gated by the memory model and measured by the engine
    (``_evaluate``); a trial whose first repetition the pruner finds clearly worse than earlier trials' stops
    there."""
    return run(
        study,
        n_trials,
        lambda trial: _evaluate(trial, req.space.suggest(trial), req, trial_timeout),
        timeout,
        on_progress,
        patience,
        min_trials,
    )


def run(
    study: optuna.Study,
    n_trials: int,
    step: Step,
    timeout: float | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    patience: int = PATIENCE,
    min_trials: int = MIN_TRIALS,
) -> Progress:
    """The one study loop (the search's and the serving study's): ``n_trials`` trials of ``step`` (fewer when
    ``timeout`` seconds pass first, or when the best has not moved for ``patience`` trials: ``stalled``),
    through Optuna's ``optimize``: each running trial's heartbeat is recorded, and trials of tuners whose
    heartbeat stopped are failed before each new trial.

    A KeyboardInterrupt stops the run in progress, records that trial as failed (interrupted) and propagates,
    leaving the study consistent.
    """
    progress = Progress(total=n_trials)

    def objective(trial: optuna.Trial) -> float | list[float]:
        pid, host = os.getpid(), worker_host()
        trial.set_user_attr("pid", pid)
        trial.set_user_attr("host", host)
        # What the trial says if this tuner dies now and the trial is failed by heartbeat (a finished trial
        # can no longer be written to); every way this function ends replaces it.
        trial.set_user_attr(
            "reason", f"tuner process {pid} on {host} died mid-trial (no heartbeat for {heartbeat()[1]} s)"
        )
        try:
            state, values = step(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("reason", "interrupted by the user")
            raise
        if state == TrialState.PRUNED:
            raise optuna.TrialPruned(trial.user_attrs["reason"])
        if state == TrialState.FAIL or values is None:
            raise TrialFailed(trial.user_attrs["reason"])
        trial.set_user_attr("reason", "")
        return values if len(values) > 1 else values[0]

    def told(st: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        progress.done += 1
        if t.state == TrialState.COMPLETE:
            progress.complete += 1
            progress.last = f"#{t.number}: " + ", ".join(f"{v:.1f}" for v in t.values or [])
        elif t.state == TrialState.PRUNED:
            progress.pruned += 1
            progress.last = f"#{t.number} pruned: {t.user_attrs.get('reason', '')}"
        else:
            progress.failed += 1
            progress.last = f"#{t.number} failed: {t.user_attrs.get('reason', '')}"
        progress.best = best_value(st)
        progress.stopped = stalled(st, patience, min_trials)
        if progress.stopped:
            st.stop()
        if on_progress:
            on_progress(progress)

    study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(TrialFailed,), callbacks=[told])
    return progress


def over_budget(gpu_peaks: Sequence[GpuPeak], peak_vram: int | None, hw: Hardware) -> str:
    """Why a run broke the user's GPU budget ("" where it kept to it, recorded no peak, or there is none): each GPU's
    peak against its budget where the run reports one per budgeted GPU, else the peak of all GPUs together
    (``peak_vram``) against their budgets' sum. Engine children, llama-bench and llama-server runs all report them."""
    budgets = [g.budget for g in hw.offload_gpus]
    if hw.gpu_budget is None:
        return ""
    if len(gpu_peaks) == len(budgets):  # in order; one value for every GPU makes the order moot
        checks = [(f"{p.device} ", p.peak, b) for p, b in zip(gpu_peaks, budgets, strict=True) if b is not None]
    else:
        checks = [("GPU ", peak_vram, hw.gpu_budget)] if peak_vram is not None else []
    for device, peak, budget in checks:
        if peak > budget:
            return f"{device}peak {peak / 2**20:,.0f} MiB over the {budget / 2**20:,.0f} MiB budget"
    return ""


def _evaluate(
    trial: optuna.Trial, s: Settings, req: StudyRequest, trial_timeout: float
) -> tuple[TrialState, list[float] | None]:
    trial.set_user_attr("settings", s.to_dict())
    problems = s.problems(req.hw.can_offload)
    if problems:
        trial.set_user_attr("reason", problems[0])
        return TrialState.PRUNED, None
    try:
        est = memory.estimate(req.facts, s, req.hw)
    except EngineRefused as e:  # the engine's own dry run refuses these settings: a real run would too
        trial.set_user_attr("predicted", {"error": str(e)})
        trial.set_user_attr("reason", f"the engine's dry run: {str(e).removeprefix(f'{req.facts.path}: ')}")
        return TrialState.PRUNED, None
    except EngineDied as e:  # no answer: a failed trial with the reason, never "does not fit"
        trial.set_user_attr("predicted", {"error": str(e)})
        trial.set_user_attr("reason", f"the engine's dry run died: {str(e).removeprefix(f'{req.facts.path}: ')}")
        return TrialState.FAIL, None
    else:
        trial.set_user_attr("predicted", est.to_dict())
        if not est.fits:
            trial.set_user_attr(
                "reason", f"does not fit: predicted {est.shortfall / 2**20:,.0f} MiB over the memory budget"
            )
            return TrialState.PRUNED, None
    m = req.engine.measure(
        req.model_path,
        s,
        req.workload,
        timeout=trial_timeout,
        index=trial.number,
        on_rep=None if req.pareto else _reporter(trial, req),
    )
    overhead.learn(engine.build_key(), req.facts, m, req.workload)  # the GPU's fixed overhead, from its peak
    trial.set_user_attr("measurement", m.to_dict())
    if not m.ok:
        trial.set_user_attr("reason", m.error)
        return TrialState.FAIL, None
    broke = over_budget(m.gpu_peaks, m.peak_vram, req.hw)
    if broke:  # the run worked, but not within what the user lets us use: never a candidate
        trial.set_user_attr("reason", broke)
        return TrialState.FAIL, None
    if m.stopped:
        first = objective_value(m, req.objective, req.workload)
        trial.set_user_attr(
            "reason",
            f"stopped after {len(m.decode_tps)} of {req.workload.reps} repetitions: "
            f"{req.objective} {first:.1f} is worse than the median of earlier trials",
        )
        return TrialState.PRUNED, None
    if req.pareto:
        return TrialState.COMPLETE, [m.decode, m.prefill, float(m.peak_rss + (m.peak_vram or 0))]
    if req.guard:
        for metric, value in guard_values(trial.study, req, m).items():
            trial.set_constraint(metric, value)
    return TrialState.COMPLETE, [objective_value(m, req.objective, req.workload)]


def _reporter(trial: optuna.Trial, req: StudyRequest) -> Callable[[dict[str, float]], bool]:
    """Report each repetition's objective value to Optuna as it ends; False (stop the run) when the pruner
    says so before the last repetition."""
    reported: list[float] = []

    def on_rep(rep: dict[str, float]) -> bool:
        one = Measurement(
            Settings(), True, prefill_tps=[rep["prefill"]], decode_tps=[rep["decode"]], ttft_s=[rep["ttft"]]
        )
        reported.append(objective_value(one, req.objective, req.workload))
        trial.report(reported[-1], len(reported) - 1)
        return len(reported) >= req.workload.reps or not trial.should_prune()

    return on_rep


def best_value(study: optuna.Study) -> float | None:
    if len(study.directions) > 1:
        return None
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return None
    return study.best_value


def completed(study: optuna.Study) -> list[tuple[optuna.trial.FrozenTrial, Measurement]]:
    """Completed trials with their measurements, in trial order."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "measurement" in t.user_attrs:
            out.append((t, Measurement.from_dict(t.user_attrs["measurement"])))
    return out
