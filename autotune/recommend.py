"""From a finished study to one recommendation that the spread of repeated runs supports.

Single trials on a small machine are noisy (about ±10 % for identical runs), so the best few trials and
the engine defaults are measured again, side by side, in interleaved rounds of fresh processes. The
winner is the best median; a speedup is claimed only when the interquartile ranges do not overlap,
otherwise the engine defaults are recommended and the report says why. The recommended settings are
confirmed by one more real run; if that fails, the next best confirmed candidate takes its place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import optuna

from . import engine, memory
from .engine import Measurement, Workload
from .errors import AutotuneError, ModelError
from .gguf_model import ModelFacts
from .probe import Hardware
from .settings import Settings
from .study import StudyRequest, completed, objective_samples


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
        return cls(float(np.median(a)), float(np.percentile(a, 25)), float(np.percentile(a, 75)),
                   float(a.min()), float(a.max()), len(values))

    def to_dict(self) -> dict[str, float]:
        return self.__dict__.copy()


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


@dataclass
class Recommendation:
    objective: str
    workload: Workload
    chosen: Candidate
    baseline: Candidate  # the best baseline that ran: every speed-up is stated against it
    candidates: list[Candidate]
    supported: bool  # the spread supports the chosen config beating the defaults
    verdict: str
    confirmation: Measurement | None
    predicted: dict[str, Any]
    roofline: dict[str, Any]
    baselines: list[Candidate] = field(default_factory=list)  # every baseline measured, those that crashed too

    def baseline_report(self) -> dict[str, Any]:
        """Per baseline: whether it ran, and why not."""
        return {b.label: {"ran": bool(b.runs), "failures": b.failures[:3], "settings": b.settings.to_dict()}
                for b in self.baselines}

    @property
    def speedup(self) -> float | None:
        """Chosen over defaults on the objective's median (>1 is better, ttft included)."""
        best = self.chosen.spread(self.objective, self.workload).median
        base = self.baseline.spread(self.objective, self.workload).median
        if not best or not base:
            return None
        return base / best if self.objective == "ttft" else best / base

    def metrics(self, c: Candidate | None = None) -> dict[str, dict[str, Any]]:
        c = c or self.chosen
        out = {}
        for metric in ("decode", "prefill", "ttft", "balanced"):
            s = c.spread(metric, self.workload)
            out[metric] = {**s.to_dict(), "samples": c.samples(metric, self.workload)}
        return out


# Run indexes (for the engine child's fault injection): trials count from 0, re-measurements and confirmations
# from these offsets, so a test can fail exactly the confirmation run.
REMEASURE = 10_000
MIN_SAMPLES = 4  # per candidate, before the spread can support a claimed win
CONFIRM = 20_000


def measure_rounds(
    model_path: str,
    candidates: list[Candidate],
    workload: Workload,
    rounds: int,
    trial_timeout: float = 300.0,
    on_run: Callable[[str, Measurement], None] | None = None,
) -> None:
    """Run every candidate once per round in a fresh process, adding to its runs or failures.

    Each round starts one candidate later, so no config always runs first or right after the same other
    config: the machine drifts, and a side-by-side comparison must not hand that drift to one config."""
    runs = 0
    for r in range(rounds):
        order = candidates[r % len(candidates):] + candidates[: r % len(candidates)]
        for c in order:
            m = engine.measure(model_path, c.settings, workload, timeout=trial_timeout, index=REMEASURE + runs)
            runs += 1
            (c.runs.append(m) if m.ok else c.failures.append(m.error))
            if on_run:
                on_run(c.label, m)


def recommend(
    study: optuna.Study,
    req: StudyRequest,
    top_k: int = 3,
    rounds: int = 3,
    trial_timeout: float = 300.0,
    on_run: Callable[[str, Measurement], None] | None = None,
) -> Recommendation:
    """Re-measure the best ``top_k`` trials and the defaults in ``rounds`` interleaved rounds; decide."""
    objective = req.objective
    done = completed(study)
    if not done:
        raise AutotuneError("no trial of this study completed: nothing to recommend (see the failed/pruned reasons)")
    key = (lambda tm: tm[0].values[0]) if not req.pareto else (lambda tm: tm[1].decode)
    ranked = sorted(done, key=key, reverse=objective != "ttft" or req.pareto)
    baselines = baseline_candidates(req)
    candidates = list(baselines)
    for t, m in ranked:
        if len(candidates) >= len(baselines) + top_k:
            break
        if m.settings in (c.settings for c in candidates):
            continue
        candidates.append(Candidate(t.user_attrs.get("role") or f"trial {t.number}", m.settings))

    measure_rounds(req.model_path, candidates, req.workload, rounds, trial_timeout, on_run)
    ran = [c for c in candidates if c.samples(objective, req.workload)]
    if not ran:
        raise AutotuneError("every re-measurement failed: " + "; ".join(f for c in candidates for f in c.failures[:1]))
    ranked_c = sorted(ran, key=lambda c: c.spread(objective, req.workload).median, reverse=objective != "ttft")
    best = ranked_c[0]
    baseline = next((c for c in ranked_c if c in baselines), baselines[0])
    supported, verdict = _judge(best, baseline, objective, req.workload)
    crashed = [b for b in baselines if not b.runs]
    if crashed and baseline.runs:
        verdict = " ".join(f"{_cap(_name(b))} crash on this machine ({b.failures[0]})." for b in crashed
                           if b.failures) + f" Speed-ups are stated against {_name(baseline)}, the best baseline that runs. " + verdict
    order = ranked_c if supported or best is baseline else [baseline] + [c for c in ranked_c if c is not baseline]
    if not baseline.runs:
        order = ranked_c  # the defaults never ran: any confirmed config beats them

    confirmation = None
    chosen = order[0]
    for attempt, c in enumerate(order):
        m = engine.measure(req.model_path, c.settings, req.workload, timeout=trial_timeout, index=CONFIRM + attempt)
        if on_run:
            on_run(f"confirm {c.label}", m)
        if m.ok:  # proof that it runs; kept apart so the verdict rests on the interleaved rounds only
            chosen, confirmation = c, m
            break
        c.failures.append(f"confirmation run failed: {m.error}")
        verdict += f" The confirmation run of {c.label} failed ({m.error}); falling back to the next best."
    if confirmation is None:
        raise AutotuneError("no candidate could be confirmed by a final run")
    if chosen is not best and chosen is not baseline:
        supported, verdict2 = _judge(chosen, baseline, objective, req.workload)
        verdict += " " + verdict2
    predicted = _predicted(req.facts, chosen.settings, req.hw)
    return Recommendation(objective, req.workload, chosen, baseline, candidates,
                          supported and chosen not in baselines, verdict, confirmation, predicted,
                          roofline(req.facts, req.hw, chosen, req.workload), baselines)


def baseline_candidates(req: StudyRequest) -> list[Candidate]:
    """What a user would run without us: the engine defaults (with the user's pins), the command line they run
    today when they gave it, and, where the engine self-check pinned a switch to avoid a crash, each of those
    with that switch."""
    defaults = engine.defaults(req.n_ctx).replace(**req.pins)
    bases = [("defaults", defaults)] + ([("your command line", req.start)] if req.start is not None else [])
    out = []
    for label, s in bases:
        out.append(Candidate(label, s))
        if req.forced and s.replace(**req.forced) != s:
            switch = ", ".join(f"{k}={v}" for k, v in req.forced.items())
            out.append(Candidate(f"{label} with {switch}", s.replace(**req.forced)))
    return out


def _name(c: Candidate) -> str:
    """A baseline as a sentence names it: "the engine defaults ...", or "your command line ..."."""
    return f"the engine {c.label}" if c.label.startswith("defaults") else c.label


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _judge(best: Candidate, baseline: Candidate, objective: str, workload: Workload) -> tuple[bool, str]:
    if best is baseline:
        return False, f"{_cap(_name(baseline))} measured best: keep them."
    if not baseline.runs:
        return True, "The engine defaults failed to run here; the chosen settings did."
    b, d = best.spread(objective, workload), baseline.spread(objective, workload)
    if min(b.n, d.n) < MIN_SAMPLES:
        return False, (f"{best.label} measured best, but with {min(b.n, d.n)} samples (fewer than {MIN_SAMPLES}) "
                       f"no win can be told from noise: recommending {_name(baseline)}.")
    clear = b.q25 > d.q75 if objective != "ttft" else b.q75 < d.q25
    gain = (b.median / d.median) if objective != "ttft" else (d.median / b.median)
    if clear:
        return True, (f"{best.label} beats {_name(baseline)} on {objective}: median x{gain:.2f}, "
                      f"interquartile ranges apart ({b.n} vs {d.n} samples).")
    return False, (f"{best.label} measured x{gain:.2f} on {objective}, but its spread overlaps that of "
                   f"{_name(baseline)} ({b.q25:.1f}-{b.q75:.1f} vs {d.q25:.1f}-{d.q75:.1f}): not a supported win; "
                   f"recommending {_name(baseline)}.")


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
