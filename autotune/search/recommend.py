"""From a finished study to one recommendation that the spread of repeated runs supports.

Single trials on a small machine are noisy (about ±10 % for identical runs), so the best few trials and
the engine defaults are measured again, side by side, in interleaved rounds of fresh processes. The
winner is the best median; a speedup is claimed only when the interquartile ranges do not overlap,
otherwise the engine defaults are recommended and the report says why. The recommended settings are
confirmed by one more real run; if that fails, the next best confirmed candidate takes its place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from .. import memory
from ..engine import Engine, Measurement, Workload
from ..facts.gguf_model import ModelFacts
from ..facts.probe import Hardware
from ..vocabulary import metrics
from ..vocabulary.errors import AutotuneError, ModelError
from ..vocabulary.settings import Settings
from .baselines import PLACEMENT_KNOBS, baselines
from .guard import GUARD_TOLERANCE, guarded
from .loop import completed
from .request import StudyRequest, objective_samples


@dataclass
class Spread:
    median: float
    q25: float
    q75: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0)
        a = np.asarray(values, dtype=float)
        return cls(
            float(np.median(a)),
            float(np.percentile(a, 25)),
            float(np.percentile(a, 75)),
            float(a.min()),
            float(a.max()),
            len(values),
        )

    def to_dict(self) -> dict[str, float]:
        return self.__dict__.copy()

    def versus(self, other: Spread, larger_is_better: bool = True) -> str:
        """The one noise rule: "better" or "worse" only when the interquartile ranges are apart and each side has
        at least ``MIN_SAMPLES`` samples; "same" (within noise) otherwise."""
        if min(self.n, other.n) < MIN_SAMPLES:
            return "same"
        above, below = self.q25 > other.q75, self.q75 < other.q25
        if not larger_is_better:
            above, below = below, above
        return "better" if above else "worse" if below else "same"


@dataclass
class Candidate:
    label: str  # "defaults", "defaults with use_extra_bufts=False", "sensible" or "trial 12"
    settings: Settings
    runs: list[Measurement] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def samples(self, metric: str, workload: Workload) -> list[float]:
        return [v for m in self.runs if m.ok for v in objective_samples(m, metric, workload)]

    def spread(self, metric: str, workload: Workload) -> Spread:
        return Spread.of(self.samples(metric, workload))


METRICS = metrics.FELT  # what a user feels; each is compared with its own best baseline


def _sign(metric: str) -> int:
    return metrics.metric(metric).sign


def compare(a: Candidate, b: Candidate, metric: str, workload: Workload) -> str:
    """ "better", "worse" or "same" on ``metric`` (``Spread.versus``)."""
    return a.spread(metric, workload).versus(b.spread(metric, workload), metrics.metric(metric).higher_is_better)


def ratio(a: Candidate, b: Candidate, metric: str, workload: Workload) -> float | None:
    """a over b on the metric's median, >1 is better for a (time to first token included)."""
    x, y = a.spread(metric, workload).median, b.spread(metric, workload).median
    if not x or not y:
        return None
    return x / y if metrics.metric(metric).higher_is_better else y / x


@dataclass
class Recommendation:
    objective: str
    workload: Workload
    chosen: Candidate
    baseline: Candidate  # the best baseline on the objective that ran: the speed-up is stated against it
    candidates: list[Candidate]
    supported: bool  # the spread supports the chosen config beating the best baseline on the objective
    verdict: str
    confirmation: Measurement | None
    predicted: dict[str, Any]
    roofline: dict[str, Any]
    baselines: list[Candidate] = field(default_factory=list)  # every baseline measured, those that crashed too
    best_baselines: dict[str, Candidate] = field(default_factory=dict)  # per metric, the best baseline that ran

    def to_json(self) -> dict[str, Any]:
        """What the tuned-config record keeps of it (its ``recommendation``): the verdict, the chosen config and
        baseline, every baseline's medians, each metric against its best baseline, the side-by-side spreads."""
        return {
            "supported": self.supported,
            "verdict": self.verdict,
            "speedup": self.speedup,
            "chosen": self.chosen.label,
            "baseline": self.baseline.label,
            "baselines": self.baseline_report(),
            "versus": self.versus(),
            "side_by_side": self.side_by_side(),
            "baseline_metrics": self.metrics(self.baseline),
            "peak_rss": self.confirmation.peak_rss if self.confirmation else None,
            "base_rss": self.confirmation.base_rss if self.confirmation else None,
            "roofline": self.roofline,
        }

    def baseline_report(self) -> dict[str, Any]:
        """Per baseline: whether it ran, and why not, and its medians."""
        return {
            b.label: {
                "ran": bool(b.runs),
                "failures": b.failures[:3],
                "settings": b.settings.to_dict(),
                "placement": {k: getattr(b.settings, k) for k in PLACEMENT_KNOBS},
                **{m: b.spread(m, self.workload).median if b.runs else None for m in METRICS},
            }
            for b in self.baselines
        }

    @property
    def speedup(self) -> float | None:
        """Chosen over the best baseline on the objective's median (>1 is better, ttft included)."""
        return ratio(self.chosen, self.baseline, self.objective, self.workload)

    def versus(self) -> dict[str, dict[str, Any]]:
        """Per metric a user feels: the best baseline on it, the chosen config's ratio to it and whether the
        spread says better, worse or the same."""
        out = {}
        for metric, base in self.best_baselines.items():
            out[metric] = {
                "baseline": base.label,
                "ratio": ratio(self.chosen, base, metric, self.workload),
                "verdict": "same" if base is self.chosen else compare(self.chosen, base, metric, self.workload),
                "baseline_median": base.spread(metric, self.workload).median,
            }
        return out

    def side_by_side(self) -> list[dict[str, Any]]:
        """Every re-measured config: its medians and interquartile ranges per metric, and the metrics on which it
        loses to that metric's best baseline (so a trade not taken is visible)."""
        rows = []
        for c in self.candidates:
            row: dict[str, Any] = {
                "label": c.label,
                "baseline": c in self.baselines,
                "ran": bool(c.runs),
                "chosen": c is self.chosen,
                "failures": c.failures[:1],
            }
            for m in METRICS:
                sp = c.spread(m, self.workload)
                row[m] = {"median": sp.median, "q25": sp.q25, "q75": sp.q75, "n": sp.n} if sp.n else None
            row["loses"] = losses(c, self.best_baselines, self.workload) if c.runs else []
            rows.append(row)
        return rows

    def metrics(self, c: Candidate | None = None) -> dict[str, dict[str, Any]]:
        c = c or self.chosen
        out = {}
        for metric in metrics.OBJECTIVES:
            s = c.spread(metric, self.workload)
            out[metric] = {**s.to_dict(), "samples": c.samples(metric, self.workload)}
        return out


# Run indexes (for the engine child's fault injection): trials count from 0, re-measurements and confirmations
# from these offsets, so a test can fail exactly the confirmation run.
REMEASURE = 10_000
MIN_SAMPLES = 4  # per candidate, before the spread can support a claimed win
CONFIRM = 20_000


def measure_rounds(
    engine: Engine,
    model_path: str,
    candidates: list[Candidate],
    workload: Workload,
    rounds: int,
    trial_timeout: float = 300.0,
    on_run: Callable[[str, Measurement], None] | None = None,
    settled: Callable[[Candidate], bool] | None = None,
) -> None:
    """Run every candidate once per round on ``engine`` in a fresh process, adding to its runs or failures.

    Each round starts one candidate later, so no config always runs first or right after the same other
    config: the machine drifts, and a side-by-side comparison must not hand that drift to one config. A
    candidate that failed in the first round and never ran is not run again. From the third round on, a
    candidate ``settled`` calls out of the running (decided by the rounds so far) sits the rest out: racing,
    as irace does, spends the remaining runs where they can still change the answer."""
    runs = 0
    for r in range(rounds):
        order = candidates[r % len(candidates) :] + candidates[: r % len(candidates)]
        out = [c for c in order if r >= 2 and settled is not None and c.runs and settled(c)]
        for c in order:
            if r and c.failures and not c.runs:  # it crashed in the first round: the crash is the answer
                continue
            if c in out:
                continue
            m = engine.measure(model_path, c.settings, workload, timeout=trial_timeout, index=REMEASURE + runs)
            runs += 1
            (c.runs.append(m) if m.ok else c.failures.append(m.error))
            if on_run:
                on_run(c.label, m)


def out_of_running(
    c: Candidate,
    candidates: list[Candidate],
    baselines: list[Candidate],
    objective: str,
    workload: Workload,
    trade: bool = False,
) -> bool:
    """Whether the measurements so far already rule ``c`` out, beyond the noise, of every role ``decide`` gives:
    a baseline that another baseline beats on every metric is no metric's best; another config that loses a
    metric to a baseline cannot be recommended (with ``trade``: one that another config beats on the
    objective)."""
    ran_bases = [b for b in baselines if b.runs]
    if c in baselines:
        return all(any(b is not c and compare(b, c, m, workload) == "better" for b in ran_bases) for m in METRICS)
    if trade:
        return any(o is not c and compare(o, c, objective, workload) == "better" for o in candidates if o.runs)
    if not ran_bases:
        return False
    best_bases = {m: max(ran_bases, key=lambda b: _sign(m) * b.spread(m, workload).median) for m in METRICS}
    return bool(losses(c, best_bases, workload))


def recommend(
    study: optuna.Study,
    req: StudyRequest,
    top_k: int = 3,
    rounds: int = 3,
    trial_timeout: float = 300.0,
    on_run: Callable[[str, Measurement], None] | None = None,
    polish: dict[str, Any] | None = None,
    trade: bool = False,
) -> Recommendation:
    """Re-measure the best ``top_k`` trials (of those no baseline's trial beat beyond ``GUARD_TOLERANCE``) and
    every baseline in ``rounds`` interleaved rounds; decide.

    ``polish``: settings a second stage chose for the knobs that do not move the objective, applied to each
    trial re-measured. The recommendation is the best on the objective among the configs that lose to no
    metric's best baseline beyond the noise; with ``trade`` (the user chose the objective, or a Pareto
    front) the other metrics may be given up, and the verdict says which were."""
    objective = req.objective
    done = completed(study)
    if not done:
        raise AutotuneError("no trial of this study completed: nothing to recommend (see the failed/pruned reasons)")
    key = (lambda tm: tm[0].values[0]) if not req.pareto else (lambda tm: tm[1].decode)
    ranked = sorted(done, key=key, reverse=metrics.metric(objective).higher_is_better or req.pareto)
    if req.guard:  # the fastest (to show what a trade would give), then those that gave no other speed away
        ranked = ranked[:1] + sorted(ranked[1:], key=lambda tm: not guarded(tm[0]))
    baselines = baseline_candidates(req)
    candidates = list(baselines)
    reach = (
        None if req.pareto else within_reach([key(tm) for tm in done if tm[0].user_attrs.get("baseline")], objective)
    )
    for t, m in ranked:
        if len(candidates) >= len(baselines) + top_k:
            break
        if reach is not None and not reach(key((t, m))):  # a baseline's trial beat it clearly: it cannot win
            continue
        settings, label = m.settings, f"trial {t.number}"
        if settings in (c.settings for c in candidates):  # a baseline's own trial: it is measured as one
            continue
        if polish and settings.replace(**polish) != settings and _fits(req, settings.replace(**polish)):
            settings, label = settings.replace(**polish), f"{label} + stage 2"
        if settings in (c.settings for c in candidates):
            continue
        candidates.append(Candidate(label, settings))

    trading = trade or req.pareto
    measure_rounds(
        req.engine,
        req.model_path,
        candidates,
        req.workload,
        rounds,
        trial_timeout,
        on_run,
        settled=lambda c: out_of_running(c, candidates, baselines, objective, req.workload, trading),
    )
    d = decide(candidates, baselines, objective, req.workload, trading)
    order, verdict, best, baseline, best_bases = d.order, d.verdict, d.order[0], d.baseline, d.best_bases
    supported = d.supported

    confirmation = None
    chosen = order[0]
    for attempt, c in enumerate(order):
        m = req.engine.measure(req.model_path, c.settings, req.workload, timeout=trial_timeout, index=CONFIRM + attempt)
        if on_run:
            on_run(f"confirm {c.label}", m)
        if m.ok:  # proof that it runs; kept apart so the verdict rests on the interleaved rounds only
            chosen, confirmation = c, m
            break
        c.failures.append(f"confirmation run failed: {m.error}")
        verdict += f" The confirmation run of {c.label} failed ({m.error}); falling back to the next best."
    if confirmation is None:
        raise AutotuneError("no candidate could be confirmed by a final run")
    if chosen is not best and chosen not in baselines:
        supported, verdict2 = _judge(chosen, baseline, objective, req.workload)
        verdict += " " + verdict2
    lost = losses(chosen, best_bases, req.workload)
    if lost:
        why = (
            "a Pareto front trades"
            if req.pareto
            else "chosen by --objective"
            if trade
            else "no measured config matched every metric's best baseline"
        )
        verdict += " It gives up " + _losing(chosen, lost, best_bases, req.workload) + f" ({why})."
    predicted = _predicted(req.facts, chosen.settings, req.hw)
    return Recommendation(
        objective,
        req.workload,
        chosen,
        baseline,
        candidates,
        supported and chosen not in baselines,
        verdict,
        confirmation,
        predicted,
        roofline(req.facts, req.hw, chosen, req.workload),
        baselines,
        best_bases,
    )


def within_reach(baseline_values: list[float], objective: str) -> Callable[[float], bool] | None:
    """Whether a trial's value is within the guard's tolerance of the best baseline trial on the objective:
    worth re-measuring. None where no baseline trial completed."""
    if not baseline_values:
        return None
    m = metrics.metric(objective)
    best = m.best(baseline_values)
    return lambda v: not best or m.shortfall(v, best) <= GUARD_TOLERANCE


@dataclass
class Decision:
    order: list[Candidate]  # what to confirm, first choice first
    baseline: Candidate  # the best baseline on the objective
    best_bases: dict[str, Candidate]  # per metric, the best baseline that ran
    supported: bool
    verdict: str


def losses(c: Candidate, best_bases: dict[str, Candidate], workload: Workload) -> list[str]:
    """The metrics on which ``c`` measured worse than that metric's best baseline, beyond the noise."""
    return [m for m, b in best_bases.items() if b is not c and compare(c, b, m, workload) == "worse"]


def _losing(c: Candidate, lost: list[str], best_bases: dict[str, Candidate], workload: Workload) -> str:
    return ", ".join(f"{m} to {_name(best_bases[m])} (x{ratio(c, best_bases[m], m, workload):.2f})" for m in lost)


def decide(
    candidates: list[Candidate], baselines: list[Candidate], objective: str, workload: Workload, trade: bool = False
) -> Decision:
    """From re-measured candidates to an order of choice. The best on the objective among those that lose to
    no metric's best baseline beyond the noise (with ``trade``: among all) comes first when the spread
    supports its win over the best baseline on the objective; otherwise the best such baseline does."""
    ran = [c for c in candidates if c.samples(objective, workload)]
    if not ran:
        raise AutotuneError("every re-measurement failed: " + "; ".join(f for c in candidates for f in c.failures[:1]))
    ran_bases = [c for c in ran if c in baselines]
    best_bases = (
        {m: max(ran_bases, key=lambda c: _sign(m) * c.spread(m, workload).median) for m in METRICS} if ran_bases else {}
    )

    def by_objective(cs: list[Candidate]) -> list[Candidate]:
        return sorted(cs, key=lambda c: _sign(objective) * c.spread(objective, workload).median, reverse=True)

    fastest = by_objective(ran)[0]
    pool = ran if trade else [c for c in ran if not losses(c, best_bases, workload)] or ran
    ranked = by_objective(pool)
    # Among the configs the noise cannot tell from the fastest on the objective, the one that gives least away
    # and is fastest on the other speed: knobs that do not move the objective are chosen for the other.
    other = "decode" if metrics.metric(objective).speed == "prefill" else "prefill"
    ties = [c for c in ranked if c is ranked[0] or compare(c, ranked[0], objective, workload) == "same"]
    best = max(
        ties, key=lambda c: (-len(losses(c, best_bases, workload)), _sign(other) * c.spread(other, workload).median)
    )
    tie_note = (
        ""
        if best is ranked[0]
        else (
            f"{best.label} measures the same as {ranked[0].label} on {objective} within the noise and better on "
            f"{other} (x{ratio(best, ranked[0], other, workload):.2f}): preferred. "
        )
    )
    ranked = [best] + [c for c in ranked if c is not best]
    baseline = best_bases.get(objective, baselines[0])
    supported, verdict = _judge(best, baseline, objective, workload)
    verdict = tie_note + verdict
    if fastest not in pool and fastest not in baselines:  # it was left out for what it gives away
        verdict = (
            f"{fastest.label} measured best on {objective} but loses "
            f"{_losing(fastest, losses(fastest, best_bases, workload), best_bases, workload)}: not taken "
            f"(name --objective {objective} to take that trade). " + verdict
        )
    crashed = [b for b in baselines if not b.runs]
    if crashed and ran_bases:
        verdict = (
            " ".join(f"{_cap(_name(b))} crash on this machine ({b.failures[0]})." for b in crashed if b.failures)
            + " Speed-ups are stated against the best baseline that runs. "
            + verdict
        )
    fallback = next((c for c in ranked if c in baselines), baseline)
    if not supported and fallback is not baseline:
        verdict = verdict.replace(
            f"recommending {_name(baseline)}.",
            f"recommending {_name(fallback)}, the best baseline that loses on no metric.",
        )
    order = ranked if supported or best in baselines else [fallback] + [c for c in ranked if c is not fallback]
    if not ran_bases:
        order = ranked  # no baseline ran: any confirmed config beats them
    return Decision(order, baseline, best_bases, supported, verdict)


def _fits(req: StudyRequest, s: Settings) -> bool:
    """Whether the memory model says ``s`` fits (True where it cannot tell: the run would say)."""
    try:
        return memory.estimate(req.facts, s, req.hw).fits
    except ModelError:
        return True


def baseline_candidates(req: StudyRequest) -> list[Candidate]:
    """What a user would run without us (``baselines.baselines``) and, where the engine self-check pinned a switch
    to avoid a crash, each of those with that switch."""
    out = []
    for label, s in baselines(req):
        out.append(Candidate(label, s))
        if req.forced and s.replace(**req.forced) != s:
            switch = ", ".join(f"{k}={v}" for k, v in req.forced.items())
            out.append(Candidate(f"{label} with {switch}", s.replace(**req.forced)))
    return out


def _name(c: Candidate) -> str:
    """A baseline as a sentence names it: "the engine defaults ...", "llama.cpp defaults", "your command line"."""
    return f"the engine {c.label}" if c.label.startswith("defaults") else c.label


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _judge(best: Candidate, baseline: Candidate, objective: str, workload: Workload) -> tuple[bool, str]:
    if best is baseline:
        return False, f"{_cap(_name(baseline))} measured best: keep them."
    if not baseline.runs:
        return True, "No baseline ran here; the chosen settings did."
    b, d = best.spread(objective, workload), baseline.spread(objective, workload)
    if min(b.n, d.n) < MIN_SAMPLES:
        return False, (
            f"{best.label} measured best, but with {min(b.n, d.n)} samples (fewer than {MIN_SAMPLES}) "
            f"no win can be told from noise: recommending {_name(baseline)}."
        )
    gain = ratio(best, baseline, objective, workload) or 0.0
    if compare(best, baseline, objective, workload) == "better":
        return True, (
            f"{best.label} beats {_name(baseline)} (the best baseline on {objective}): median x{gain:.2f}, "
            f"interquartile ranges apart ({b.n} vs {d.n} samples)."
        )
    return False, (
        f"{best.label} measured x{gain:.2f} on {objective}, but its spread overlaps that of "
        f"{_name(baseline)} ({b.q25:.1f}-{b.q75:.1f} vs {d.q25:.1f}-{d.q75:.1f}): not a supported win; "
        f"recommending {_name(baseline)}."
    )


def _predicted(facts: ModelFacts, s: Settings, hw: Hardware) -> dict[str, Any]:
    try:
        return memory.estimate(facts, s, hw).to_dict()
    except ModelError as e:
        return {"error": str(e)}


def roofline(facts: ModelFacts, hw: Hardware, c: Candidate, workload: Workload) -> dict[str, Any]:
    """Decode speed against the memory-bandwidth limit: every weight (and the KV so far) is read per token."""
    decode = c.spread("decode", workload).median
    if not hw.bandwidth_gbs or c.settings.n_gpu_layers > 0:
        return {"note": "no host bandwidth measured" if not hw.bandwidth_gbs else "GPU offload: host roofline n/a"}
    kv_cells = workload.prompt_tokens + workload.gen_tokens // 2
    try:
        est = memory.estimate(facts, c.settings, hw)
        kv_per_cell = (est.kv_k + est.kv_v) / max(1, sum(est.kv_cells))
    except ModelError:
        kv_per_cell = 0.0
    bytes_per_token = facts.weight_bytes - facts.token_embd_bytes + kv_cells * kv_per_cell
    limit = hw.bandwidth_gbs * 1e9 / bytes_per_token
    return {
        "bandwidth_gbs": hw.bandwidth_gbs,
        "bytes_per_token": int(bytes_per_token),
        "limit_tps": limit,
        "decode_tps": decode,
        "fraction": decode / limit if limit else None,
    }
