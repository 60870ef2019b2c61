"""``tune()``: the one path from a model file to a tuned config, for the CLI, the benches and the notebooks.

probe -> facts -> search space -> fit check -> engine dry run -> engine self-check -> study -> K/V quality
guard -> trials -> side-by-side re-measurement -> (a stage the caller adds: the CLI's speculation) -> the tuned-config
record. It measures with the engine it is handed; what happens on the way is told to a ``TuneReporter``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna

from .. import memory
from ..engine import Engine, Measurement, Workload, bundled, kept_loaded
from ..facts import catalog
from ..facts.gguf_model import ModelFacts, file_sha256, read_facts
from ..facts.probe import Hardware, measure_bandwidth_gbs, probe
from ..memory import overhead
from ..vocabulary import metrics
from ..vocabulary.errors import EngineDied, FitError, ModelError, SettingsError
from ..vocabulary.knobs import KNOBS
from ..vocabulary.settings import Settings
from . import health, kvgate, loop, progress, recommend, request, space, storage, study
from .config import TunedRecord

MIB = 2**20


@dataclass(frozen=True)
class TuneOptions:
    """Everything ``autotune search`` takes besides the model; the defaults are the CLI's."""

    ctx: int | None = None  # default: the model's default context (ModelFacts.default_ctx)
    objective: str = "decode"
    pareto: bool = False
    trials: int = 30
    timeout: float | None = None  # stop starting trials after this many seconds
    trial_timeout: float = 300.0
    storage: str | None = None
    pins: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    workload: Workload | None = None  # None: the machine's (``default_workload``)
    top_k: int = 2
    rounds: int = 3
    kv_quality: str = "strict"
    recommend: bool = True  # False: only run trials
    depth: int | None = None  # tokens in the cache before each measured prompt (None: default_depth)
    start: Settings | None = None  # what the user runs today (--from-cmdline): measured first, and a baseline
    trade: bool = False  # the user named the objective: the other metrics may be given up for it
    patience: int = loop.PATIENCE  # stop a stage once this many trials have not moved its best (0: never)
    gpu_budget: tuple[int, ...] | None = None  # MiB each GPU may hold in all (one value: every GPU); None: what is free


def _started(start: Settings, n_ctx: int, pins: dict[str, Any]) -> Settings:
    """The user's own settings at the study's context, with their pins; speculation is the speculation stage's."""
    return start.unspeculated().replace(n_ctx=n_ctx, **pins)


# What a trial measures when the user does not say: a prompt of the size users send to this placement. A CPU
# needs seconds for 256 tokens; a GPU prefills that in tens of milliseconds, so there the prompt is thousands of
# tokens and the reply long enough for decode to outweigh its timer.
HOST_WORKLOAD = Workload(prompt_tokens=256, gen_tokens=32, reps=2)
GPU_WORKLOAD = Workload(prompt_tokens=2048, gen_tokens=128, reps=3)


def default_workload(sp: space.SearchSpace, facts: ModelFacts, hw: Hardware) -> Workload:
    """``GPU_WORKLOAD`` where every trial keeps every layer on a GPU (its prompt at most half the context), else
    ``HOST_WORKLOAD``."""
    if (
        not hw.offload_gpus
        or "n_gpu_layers" in sp.int_ranges
        or "n_cpu_moe" in sp.int_ranges
        or sp.base.n_gpu_layers < facts.n_layer + 1
        or sp.base.n_cpu_moe
    ):
        return HOST_WORKLOAD
    half = sp.base.n_ctx // 2 // 256 * 256
    return dataclasses.replace(GPU_WORKLOAD, prompt_tokens=max(256, min(GPU_WORKLOAD.prompt_tokens, half)))


def default_depth(n_ctx: int, work: Workload) -> int:
    """An eighth of the context, in whole 256-token blocks: a conversation well under way, at a fill cost of
    a few seconds per trial on a small CPU (0 for contexts under 2,048)."""
    return max(0, min(n_ctx // 8, n_ctx - work.prompt_tokens - work.gen_tokens)) // 256 * 256


def depths_to_report(n_ctx: int, depth: int, work: Workload) -> list[int]:
    """Depths the recommendation is measured at after the search: empty, the searched depth, nearly full."""
    deepest = (n_ctx - work.prompt_tokens - work.gen_tokens) // 256 * 256
    return sorted({0, depth, max(deepest, 0)})


@dataclass
class TunedConfig:
    """A tuning run's answer: the recommended settings, the evidence, and the tuned-config record that
    ``export`` renders and ``report`` plots."""

    settings: Settings
    recommendation: recommend.Recommendation
    engine_health: health.Verdict
    study_name: str
    record: TunedRecord


# A stage run on the tuned-config record before it is stored (the CLI's speculation stage): the record and the
# machine as the search saw it in, the record it carries out.
Stage = Callable[[TunedRecord, Hardware], TunedRecord]


class TuneReporter(progress.Quiet):
    """What ``tune`` tells as it goes: the progress protocol's notes and steps, and the search's own results as
    they come (tables on the CLI's terminal). Every method does nothing here."""

    def health(self, verdict: health.Verdict) -> None: ...

    def study(self, st: optuna.Study, storage_url: str) -> None: ...

    def kv_quality(self, quality: kvgate.KvQuality, forced: dict[str, Any]) -> None: ...

    def space(self, sp: space.SearchSpace, hw: Hardware, pins: dict[str, Any], forced: dict[str, Any]) -> None: ...

    @contextlib.contextmanager
    def trials(self, total: int, objective: str) -> Iterator[Callable[[loop.Progress], None]]:
        yield lambda _progress: None

    def trials_done(self, st: optuna.Study) -> None: ...

    def depth_sweep(self, rows: tuple[DepthPoint, ...]) -> None: ...


def tune(
    model: str | None, options: TuneOptions, reporter: TuneReporter, engine: Engine, stage: Stage | None = None
) -> TunedConfig | None:
    """Tune ``model`` (None: the demo model), measuring with ``engine``; ``stage`` runs on the record before it
    is stored. Returns None when ``options.recommend`` is off. A KeyboardInterrupt leaves the study consistent
    and propagates; AutotuneError for anything the user can fix."""
    with kept_loaded(engine):  # on a GPU, runs that share a load share one
        return _tune(model, options, reporter, engine, stage)


def _tune(
    model: str | None, options: TuneOptions, reporter: TuneReporter, engine: Engine, stage: Stage | None
) -> TunedConfig | None:
    model = model or str(catalog.fetch(quiet=False))
    facts = read_facts(model)
    # the space, the fit check and every trial keep to the budget; the bandwidth is measured for the roofline only
    hw = probe(bundled, measure_bandwidth=False).with_gpu_budget(options.gpu_budget)  # bundled prices memory
    n_ctx = options.ctx or facts.default_ctx
    pins = options.pins
    first = space.build_space(hw, facts, n_ctx, pins)
    work = options.workload or default_workload(first, facts, hw)
    if work.prompt_tokens + work.gen_tokens > n_ctx:
        raise SettingsError(
            f"--ctx {n_ctx} is smaller than the measured prompt + reply "
            f"({work.prompt_tokens} + {work.gen_tokens} tokens)"
        )
    depth = default_depth(n_ctx, work) if options.depth is None else options.depth
    if depth < 0 or depth + work.prompt_tokens + work.gen_tokens > n_ctx:
        raise SettingsError(
            f"--depth {depth} leaves no room in --ctx {n_ctx} for the measured prompt + reply "
            f"({work.prompt_tokens} + {work.gen_tokens} tokens)"
        )
    work = dataclasses.replace(work, depth=depth)
    if first.where:
        reporter.note(f"placement: {first.where}")
    req = request.StudyRequest(
        model_path=model,
        facts=facts,
        hw=hw,
        space=first,
        objective=options.objective,
        pareto=options.pareto,
        workload=work,
        storage=options.storage,
        seed=options.seed,
        pins=pins,
        start=None if options.start is None else _started(options.start, n_ctx, pins),
        engine=engine,
    )
    warning = memory.beyond_trained(facts, n_ctx)
    if warning:
        reporter.note(warning)
    unchecked = check_fits(req)
    try:  # the engine itself must accept the file (~1 s); ModelError when it cannot load it at all
        preflight = engine.dry_run(model, [req.space.base])[0]
    except EngineDied:  # its dry run died (some CPUs abort there): the self-check finds the switch, if any
        preflight = None
    if isinstance(preflight, str):
        raise ModelError(f"{model}: the engine refuses the starting settings: {preflight}")
    with reporter.step("engine self-check: a short real run with the starting settings ..."):
        verdict = health.check(model, req.space.base, hw, engine, pinned=frozenset(pins), timeout=options.trial_timeout)
    reporter.health(verdict)
    if verdict.pins:  # the whole study runs with the switch that keeps the engine alive
        req = dataclasses.replace(
            req, space=space.build_space(hw, facts, n_ctx, {**pins, **verdict.pins}), forced=verdict.pins
        )
        unchecked = check_fits(req)  # with the switch, the engine's dry run may answer where it died before
    if unchecked:
        reporter.note(f"memory model: {unchecked}; trials run without a fit check")
    full = req.space
    metric = moved_by(options.objective, options.pareto)
    n_second = second_trials(full, metric, options.trials)
    if metric and n_second:  # the first stage searches only the knobs that can move the objective
        req = dataclasses.replace(req, space=full.moving(metric), guard=not options.trade)
    st = study.open_study(req)
    reporter.study(st, storage.storage_url(options.storage))
    with reporter.step("measuring how quantized K/V caches change the outputs (once per study) ..."):
        sp, quality = kvgate.kv_quality(st, req, options.kv_quality)
    req = dataclasses.replace(req, space=sp)
    if quality.pairs:
        reporter.kv_quality(quality, req.forced)
    reporter.space(sp, hw, pins, req.forced)
    if metric and n_second:
        reporter.note(
            f"held for a second stage of {n_second} trials (they cannot move {metric}; tuned there for "
            f"{SECOND[metric]}): {', '.join(full.neutral_to(metric).describe())}"
        )
    try:
        with reporter.trials(options.trials - n_second, options.objective) as show:
            loop.run_trials(
                st,
                req,
                options.trials - n_second,
                timeout=options.timeout,
                trial_timeout=options.trial_timeout,
                on_progress=show,
                patience=options.patience,
            )
    finally:
        reporter.trials_done(st)
    polish: dict[str, Any] = {}
    st2 = None
    if metric and n_second and loop.completed(st):
        polish, st2 = second_stage(st, req, full, metric, n_second, options, reporter)
    if not options.recommend:
        return None
    req = dataclasses.replace(req, hw=dataclasses.replace(req.hw, bandwidth_gbs=measure_bandwidth_gbs()))
    with reporter.step("re-measuring the best candidates against every baseline ...") as status:

        def on_run(label: str, m: Measurement) -> None:
            status(f"re-measured {label}: " + (f"{m.decode:.1f} tok/s decode" if m.ok else m.error[:60]))

        rec = recommend.recommend(
            st,
            req,
            top_k=options.top_k,
            rounds=options.rounds,
            trial_timeout=options.trial_timeout,
            on_run=on_run,
            polish=polish,
            trade=options.trade,
        )
    record = _record(req, st, rec, verdict, quality, options)
    if st2 is not None and metric is not None:
        record.evidence["study"]["second_stage"] = {
            "name": st2.study_name,
            "objective": SECOND[metric],
            "chose": polish,
        }
    deep = depth_sweep(
        model, rec.chosen.settings, req.n_ctx, work, options.trial_timeout, reporter, engine, done=rec.confirmation
    )
    record.evidence["depth_sweep"] = [p.to_json() for p in deep]
    if stage is not None:
        record = stage(record, hw)
    st.set_user_attr("recommendation", record.to_json())
    return TunedConfig(record.settings, rec, verdict, st.study_name, record)


# The speed a stage-1 objective is made of, and what the second stage then tunes the other knobs for.
SECOND = {"decode": "prefill", "prefill": "decode"}


def moved_by(objective: str, pareto: bool) -> str | None:
    """The speed an objective is made of ("decode" or "prefill"; TTFT is the prompt's time), or None where
    it is made of both (balanced, a Pareto front): then one stage searches every knob."""
    return None if pareto else metrics.metric(objective).speed


def second_trials(full: space.SearchSpace, metric: str | None, trials: int) -> int:
    """Trials for the second stage: an eighth of the budget, at least 4, at most a quarter; 0 (one stage over
    every knob) where that leaves fewer than 4, or nothing is left for a second stage to tune."""
    if metric is None:
        return 0
    neutral = full.neutral_to(metric)
    n = min(trials // 4, max(4, trials // 8))
    return n if n >= 4 and (neutral.params or neutral.int_ranges) else 0


def second_stage(
    st: optuna.Study,
    req: request.StudyRequest,
    full: space.SearchSpace,
    metric: str,
    n_trials: int,
    options: TuneOptions,
    reporter: TuneReporter,
) -> tuple[dict[str, Any], optuna.Study]:
    """Tune the knobs that cannot move the objective (for decode: prompt threads, n_batch, n_ubatch) for the
    other speed, over the first stage's best settings, in a study of its own; the baselines' values for those
    knobs are among its first trials. Returns the settings it chose for them, and the study."""
    best = st.best_trial
    base = Settings.from_dict(best.user_attrs["settings"])
    sp = full.neutral_to(metric, base)
    tag = hashlib.sha256(json.dumps(base.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    req2 = dataclasses.replace(
        req, space=sp, objective=SECOND[metric], stage=f"then-{SECOND[metric]}-{tag}", guard=False
    )
    st2 = study.open_study(req2)
    reporter.note(f"second stage: {', '.join(sp.describe())} for {SECOND[metric]}, over trial {best.number}'s settings")
    try:
        with reporter.trials(n_trials, SECOND[metric]) as show:
            loop.run_trials(
                st2,
                req2,
                n_trials,
                timeout=options.timeout,
                trial_timeout=options.trial_timeout,
                on_progress=show,
                patience=options.patience,
                min_trials=n_trials,
            )
    finally:
        reporter.trials_done(st2)
    if loop.best_value(st2) is None:  # no trial of the second stage completed
        return {}, st2
    chosen = Settings.from_dict(st2.best_trial.user_attrs["settings"])
    fields = [k.name for k in KNOBS if metric not in k.moves]
    return {k: getattr(chosen, k) for k in fields if getattr(chosen, k) != getattr(base, k)}, st2


@dataclass(frozen=True)
class DepthPoint:
    """The recommendation measured at one context depth; the speeds are None where the run failed (``error``)."""

    depth: int
    ok: bool
    error: str
    decode: float | None
    prefill: float | None
    ttft: float | None
    decode_tps: list[float]
    prefill_tps: list[float]

    def to_json(self) -> dict[str, Any]:
        """The row stored in the tuned record's evidence as ``depth_sweep`` (stable: keys are only ever added)."""
        return {
            "depth": self.depth,
            "ok": self.ok,
            "error": self.error,
            "decode": self.decode,
            "prefill": self.prefill,
            "ttft": self.ttft,
            "decode_tps": self.decode_tps,
            "prefill_tps": self.prefill_tps,
        }


def depth_sweep(
    model: str,
    settings: Settings,
    n_ctx: int,
    work: Workload,
    timeout: float,
    reporter: TuneReporter,
    engine: Engine,
    done: Measurement | None = None,
) -> tuple[DepthPoint, ...]:
    """The recommendation measured with an empty cache, at the searched depth and nearly full: placement and
    attention choices that win empty can lose deep in a conversation. ``done``: a run of these settings at
    the searched depth already made (the confirmation run), used for that row."""
    rows = []
    with reporter.step("measuring the recommendation against context depth ...") as status:
        for d in depths_to_report(n_ctx, work.depth, work):
            status(f"depth {d:,} ...")
            if done is not None and done.ok and d == work.depth and done.settings == settings:
                m = done
            else:
                deep = dataclasses.replace(work, depth=d)
                m = engine.measure(model, settings, deep, timeout=timeout)
                overhead.learn(bundled.build_key(), read_facts(model), m, deep)  # nearly full: the pool at its peak
            rows.append(
                DepthPoint(
                    depth=d,
                    ok=m.ok,
                    error=m.error,
                    decode=m.decode if m.ok else None,
                    prefill=m.prefill if m.ok else None,
                    ttft=m.ttft if m.ok else None,
                    decode_tps=m.decode_tps,
                    prefill_tps=m.prefill_tps,
                )
            )
    reporter.depth_sweep(tuple(rows))
    return tuple(rows)


def check_fits(req: request.StudyRequest) -> str | None:
    """Refuse up front, with the size of the gap, a model that no setting in the space can fit. Returns why
    it could not tell (the engine's dry run died on the leanest settings), or None."""
    try:
        lean = loop.leanest(req)
    except EngineDied as e:
        return str(e)
    if not lean.fits:
        within = " within the GPU budget" if req.hw.gpu_budget is not None else ""
        raise FitError(
            f"{req.facts.name} at context {req.n_ctx} cannot fit this machine{within} in any searched "
            f"setting: {lean.shortfall / MIB:,.0f} MiB short even at its leanest (try a smaller --ctx)"
        )
    return None


def _record(
    req: request.StudyRequest,
    st: optuna.Study,
    rec: recommend.Recommendation,
    verdict: health.Verdict,
    quality: kvgate.KvQuality,
    options: TuneOptions,
) -> TunedRecord:
    """The tuned-config record: the settings and every piece of evidence behind them."""
    facts: ModelFacts = req.facts
    return TunedRecord(
        rec.chosen.settings,
        model={
            "path": req.model_path,
            "sha256": file_sha256(req.model_path),
            "architecture": facts.architecture,
            "name": facts.name,
        },
        hardware=req.hw.to_dict(),
        metrics=rec.metrics(),
        memory=rec.predicted,
        engine={}
        if req.engine is bundled
        else {
            "name": req.engine.name,
            "version": req.engine.build_info().version,
            "backend": req.engine.build_info().backend,
        },
        evidence={
            "study": {
                "name": st.study_name,
                "storage": storage.storage_url(options.storage),
                "objective": "pareto" if options.pareto else options.objective,
            },
            "workload": dataclasses.asdict(req.workload),
            "engine_health": dataclasses.asdict(verdict),
            "recommendation": rec.to_json(),
            "kv_quality": quality.to_json(),
        },
    )
