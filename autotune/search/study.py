"""The Optuna study: real engine runs over the search space, stored in a database and resumed.

Each trial is asked for, checked against the memory model (a configuration that cannot fit is recorded
as pruned with the reason and never run), measured by the engine in its own process, and told back:
complete with its objective value(s), or failed with the engine's reason. A failure is never scored as
0 tok/s, which would teach the sampler something false.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc
from optuna.storages._rdb import models as optuna_models
from optuna.trial import TrialState

from .. import engine, memory
from ..engine import Measurement, Workload
from ..facts.gguf_model import ModelFacts, file_sha256
from ..facts.probe import Hardware
from ..memory import overhead
from ..vocabulary.errors import ConfigError, EngineDied, EngineRefused, StudyError
from ..vocabulary.settings import Settings
from . import space
from .space import SearchSpace, kv_pairs, leanest_attention

OBJECTIVES = ("decode", "prefill", "ttft", "balanced")
DEFAULT_STORAGE_DIR = Path("studies")

# Optuna would log every failed trial as a warning; the reasons are recorded and shown by autotune itself.
optuna.logging.set_verbosity(optuna.logging.ERROR)
# A running trial's tuner records a heartbeat this often; one silent for GRACE_S seconds is dead and its
# trial is failed (Optuna's heartbeat: works for tuners on other machines sharing the storage, too).
HEARTBEAT_S = 10
GRACE_S = 60


def heartbeat() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds; AUTOTUNE_HEARTBEAT_S / AUTOTUNE_GRACE_S shorten them
    (tests, or a fleet that wants dead workers noticed sooner)."""
    return (int(os.environ.get("AUTOTUNE_HEARTBEAT_S", HEARTBEAT_S)), int(os.environ.get("AUTOTUNE_GRACE_S", GRACE_S)))


def worker_host() -> str:
    """The name this worker records on its trials. AUTOTUNE_WORKER_HOST stands in for another machine's name
    (one seam, for tests: a worker "elsewhere" can only be caught by its stopped heartbeat)."""
    return os.environ.get("AUTOTUNE_WORKER_HOST") or socket.gethostname()
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def objective_samples(m: Measurement, objective: str, workload: Workload) -> list[float]:
    """One objective value per repetition of a run (``balanced``: end-to-end tok/s of prompt + reply)."""
    if objective == "prefill":
        return list(m.prefill_tps)
    if objective == "ttft":
        return list(m.ttft_s)
    if objective == "balanced":
        n = workload.prompt_tokens + workload.gen_tokens
        return [n / (t + (workload.gen_tokens - 1) / d) for t, d in zip(m.ttft_s, m.decode_tps) if d > 0]
    return list(m.decode_tps)


def objective_value(m: Measurement, objective: str, workload: Workload) -> float:
    """The number the study optimizes: the median over the run's repetitions."""
    values = objective_samples(m, objective, workload)
    return statistics.median(values) if values else 0.0


def pruner() -> optuna.pruners.BasePruner:
    """Stop a trial after its first repetition when that is worse than the median of earlier trials' first
    repetitions: on a small CPU the configs that matter differ by far more than one repetition's noise (one
    decode thread instead of two halves decode), and a pruned trial costs one repetition instead of all."""
    return optuna.pruners.MedianPruner(n_startup_trials=6, n_warmup_steps=0)


def directions(objective: str, pareto: bool) -> list[str]:
    if pareto:
        return ["maximize", "maximize", "minimize"]  # decode tok/s, prefill tok/s, peak memory
    return ["minimize" if objective == "ttft" else "maximize"]


def sensible(hw: Hardware, facts: ModelFacts, n_ctx: int) -> Settings:
    """The probe's advice without measuring: physical cores, flash attention, everything on the GPU."""
    return Settings(
        n_ctx=n_ctx,
        n_threads=hw.physical_cores,
        n_threads_batch=hw.logical_cores,
        flash_attn=True,
        n_gpu_layers=facts.n_layer + 1 if hw.offload_gpus else 0,
    )


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
    engine: str = ""  # the engine measuring, when not the bundled one: its kind and build key
    stage: str = ""  # a second stage's tag: the knobs the first left alone, over its best (``pipeline``)
    guard: bool = False  # steer the sampler away from configs slower than the best baseline on another speed

    @property
    def n_ctx(self) -> int:
        return self.space.base.n_ctx

    def name(self) -> str:
        sha = file_sha256(self.model_path)[:12]
        goal = "pareto" if self.pareto else self.objective
        w = self.workload
        parts = [Path(self.model_path).stem, sha, self.hw.fingerprint(), f"ctx{self.n_ctx}", goal,
                 f"p{w.prompt_tokens}g{w.gen_tokens}" + (f"d{w.depth}" if w.depth else "")]
        if self.engine:
            parts.append(self.engine)
        if self.stage:
            parts.append(self.stage)
        for label, pinned in (("pins", self.pins), ("forced", self.forced)):
            if pinned:
                parts.append(label + hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()[:8])
        return "-".join(parts)


def default_url() -> str:
    """Where studies are stored unless told otherwise (read only: ``storage_url`` checks it is writable)."""
    return f"sqlite:///{DEFAULT_STORAGE_DIR / 'autotune.db'}"


def storage_url(storage: str | None) -> str:
    """The Optuna storage URL; by default SQLite in ./studies, which must be writable."""
    if storage:
        return storage
    try:
        DEFAULT_STORAGE_DIR.mkdir(parents=True, exist_ok=True)
        probe_file = DEFAULT_STORAGE_DIR / f".write-test-{os.getpid()}"
        probe_file.touch()
        probe_file.unlink()
    except OSError as e:
        raise StudyError(f"cannot write study databases to {DEFAULT_STORAGE_DIR.resolve()}: {e.strerror}") from None
    return default_url()


# Every table of Optuna's schema. A file holding only some of them is a schema another tuner is creating at this
# moment (Optuna creates the tables one by one), not a database of something else.
_OPTUNA_TABLES = frozenset(optuna_models.BaseModel.metadata.tables) | {"alembic_version"}


def _check_sqlite(url: str) -> None:
    """Refuse a SQLite file that is corrupt or belongs to something else, before Optuna writes to it."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url[len("sqlite:///"):])
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    except sqlite3.DatabaseError as e:
        raise StudyError(f"{path}: not a usable study database ({e})") from None
    if tables - _OPTUNA_TABLES:
        raise StudyError(f"{path}: a SQLite database of something else (tables: {', '.join(sorted(tables)[:5])}); "
                         "not touching it — pass another --storage")


def open_storage(storage: str | None) -> optuna.storages.BaseStorage:
    url = storage_url(storage)
    _check_sqlite(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # wait on another tuner's write lock
    for attempt in range(5):
        try:
            beat, grace = heartbeat()
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=beat, grace_period=grace, **kwargs)
            if url.startswith("sqlite"):
                _serialize_sqlite(storage.engine)
            return storage
        except Exception as e:  # sqlalchemy / alembic errors: corrupt or foreign databases, or a schema race
            error = e
            if not _schema_race(e):
                break
            time.sleep(0.1 * attempt)
    raise StudyError(f"cannot open study storage {url}: {type(error).__name__}: {str(error).splitlines()[0]}")


def _serialize_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """Make each of the storage's SQLite transactions take the write lock when it begins (BEGIN IMMEDIATE).

    Python's sqlite3 runs a transaction's SELECTs before its BEGIN, so Optuna's "take a queued trial if it is
    still WAITING" (a row lock on PostgreSQL) is a read and a later write there: two tuners both read WAITING,
    both run the same queued trial, and the second one's tell fails ("Cannot tell a COMPLETE trial"). With the
    lock taken first, the read and the write are one step. SQLAlchemy's documented recipe for SQLite."""
    @sqlalchemy.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit BEGIN from the driver: ours below

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(connection: sqlalchemy.engine.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the hooks (creating the schema) are not reused


def _schema_race(e: Exception) -> bool:
    """Did another process (a second tuner started at the same moment) create the schema while we did?

    Optuna creates its tables and stamps their version on first open; two openers of a fresh storage
    collide on a table that "already exists" or on the version row. The schema is whole by then, so
    opening again succeeds."""
    return isinstance(e, sqlalchemy.exc.IntegrityError) or (
        isinstance(e, sqlalchemy.exc.DatabaseError) and "already exists" in str(e))


def load_existing(name: str, url: str) -> optuna.Study:
    """Load study ``name`` to read it (report, export); a SQLite file that is not there is an error here, not
    a new empty database."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise StudyError(f"no study database at {url[len('sqlite:///'):]} (pass --storage, or run this "
                         "where autotune search ran)")
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise ConfigError(f"no study named {name!r} in {url}; stored studies: {', '.join(names) or 'none'}") from None


# Trials (the baselines among them) before TPE models the results: the first stage's space is a few dozen
# configs, so the model takes over early.
STARTUP_TRIALS = 5


def sampler(seed: int) -> optuna.samplers.TPESampler:
    """The studies' sampler: seeded multivariate TPE, modelling from the ``STARTUP_TRIALS``-th trial; the
    constant liar keeps workers sharing a study from sampling the same point."""
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS, multivariate=True,
                                      constant_liar=True)


def open_named(name: str, storage: str | None, seed: int, goals: list[str], hw: Hardware, engine_of: dict[str, str],
               describe: Callable[[optuna.Study], None]) -> optuna.Study:
    """Create study ``name``, or load it to resume: a worker joins only on the same kind of machine and engine
    build (``engine_of``: its name and build key), and the trials a dead tuner of this host left running are
    failed. Only the tuner whose ``create_study`` succeeds (the database's unique study name decides, however
    many tuners start at once) records the machine and engine and calls ``describe`` (attributes, first trials),
    so they are written once."""
    store = open_storage(storage)
    try:
        study = optuna.create_study(study_name=name, storage=store, sampler=sampler(seed), pruner=pruner(),
                                    directions=goals)
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
    mine = {"name": engine.current().name, "build": engine.current().build_key()}
    return open_named(req.name(), req.storage, req.seed, directions(req.objective, req.pareto), req.hw, mine,
                      lambda study: _describe(study, req))


def _describe(study: optuna.Study, req: StudyRequest) -> None:
    study.set_user_attr("model", {"path": req.model_path, "sha256": file_sha256(req.model_path),
                                  "architecture": req.facts.architecture, "name": req.facts.name})
    study.set_user_attr("workload", req.workload.__dict__)
    study.set_user_attr("objective", "pareto" if req.pareto else req.objective)
    study.set_user_attr("n_ctx", req.n_ctx)
    study.set_user_attr("pins", req.pins)
    study.set_user_attr("forced", req.forced)
    study.set_user_attr("space", req.space.describe())
    study.set_user_attr("stage", req.stage)
    seeds = ([("stage 1's best", req.space.base, False)] if req.stage else []) + [
        (role, s, True) for role, s in baselines(req)]
    enqueued: list[dict[str, Any]] = []
    for role, s, baseline in seeds:  # each baseline is a trial too; one whose parameters are already queued is not
        params = req.space.params_of(s)
        if params not in enqueued:
            enqueued.append(params)
            same = all(getattr(req.space.settings_from(params), k) == getattr(s, k) for k in PLACEMENT_KNOBS)
            # a baseline placed outside the space seeds the nearest trial, which is not that baseline (the
            # side-by-side measures the baseline itself)
            study.enqueue_trial(params, user_attrs={"role": role if same else f"{role}, placed as the space allows",
                                                    "baseline": baseline and same})


def recommendation(name: str, url: str) -> dict[str, Any]:
    """The tuned config a finished study stored (``autotune export --study``); ConfigError before it has one."""
    st = load_existing(name, url)
    if "recommendation" not in st.user_attrs:
        raise ConfigError(f"study {name} has no recommendation yet: run autotune search to finish it")
    return st.user_attrs["recommendation"]


def baselines(req: StudyRequest) -> list[tuple[str, Settings]]:
    """What a user would run without us, each with the user's pins: the command line they run today (when
    given), llama.cpp's own tools' defaults (the first trial, so a search never reports less), the engine's
    defaults and the probe's sensible config. On GPUs each gets its own placement, decided by the memory model at
    its own settings (``placed``): llama.cpp's defaults the one its --fit picks, and beside them "max layers on
    the GPU", what LM Studio and KoboldCpp users do. One config under two names is measured once, under the
    first."""
    mine = engine.defaults(req.n_ctx).replace(**req.pins)
    llama = engine.llama_cpp_defaults(req.n_ctx).replace(**req.pins)
    named = ([("your command line", req.start)] if req.start is not None else []) + (
        [("llama.cpp defaults", placed(req, llama, "fit"))] if llama != mine else []) + (  # an external llama.cpp tool
        [("max layers on the GPU", placed(req, llama, "max"))] if req.hw.offload_gpus else []) + [
        ("defaults", placed(req, mine, "fit" if llama == mine else "space")),  # llama.cpp's own: its --fit
        ("sensible", placed(req, sensible(req.hw, req.facts, req.n_ctx).replace(**req.pins)))]
    out: list[tuple[str, Settings]] = []
    for role, s in named:
        if all(s != t for _, t in out):
            out.append((role, s))
    return out


PLACEMENT_KNOBS = ("n_gpu_layers", "n_cpu_moe", "moe_host_from", "moe_host_layers", "n_cpu_ffn")


def placed(req: StudyRequest, s: Settings, rule: str = "space") -> Settings:
    """``s`` with its own placement on this machine's GPUs, from the memory model at ``s``'s own cache and
    micro-batch (never another config's): ``fit``, llama.cpp's --fit (``space.llama_fit``); ``max``, the most
    layers with no overrides (``space.max_layers``); ``space``, the rule the search space uses. Without GPUs, or
    where the user pinned the placement, ``s`` as it is; where the memory model cannot tell (its dry run died),
    the space's placement."""
    if not req.hw.offload_gpus or set(PLACEMENT_KNOBS) & set(req.pins):
        return s
    try:
        if rule == "fit":
            where = space.llama_fit(req.facts, req.hw, s)[0]
        elif rule == "max":
            where = space.max_layers(req.facts, req.hw, s)
        else:
            where = space.gpu_placement(req.facts, req.hw, s)[0] or req.space.placement
    except EngineDied:
        where = req.space.placement
    return s.replace(**where)


def _check_same_kind(study: optuna.Study, hw: Hardware, build: str) -> None:
    """A worker joins a study only on the same kind of machine and engine build: timings from different ones
    are not comparable, and one study would mix them."""
    theirs = study.user_attrs.get("hardware", {}).get("fingerprint")
    if theirs and theirs != hw.fingerprint():
        raise StudyError(f"study {study.study_name} was made on hardware {theirs}; this machine is "
                         f"{hw.fingerprint()}: its timings would not be comparable (run a study of its own)")
    recorded = study.user_attrs.get("engine", {}).get("build")
    if recorded and recorded != build:
        raise StudyError(f"study {study.study_name} was measured with engine build {recorded}; this worker's is "
                         f"{build}: its timings would not be comparable")


def summaries(storage: str | None) -> list[dict[str, Any]]:
    """Every study in a storage, for ``autotune studies``: model, machine, engine, trials, best, and whether
    a recommendation (an exportable tuned config) exists."""
    url = storage_url(storage)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise StudyError(f"no study database at {url[len('sqlite:///'):]} (pass --storage)")
    out = []
    storage = open_storage(url)
    for st in optuna.get_all_study_summaries(storage, include_best_trial=True):
        attrs = st.user_attrs
        finished = optuna.load_study(study_name=st.study_name, storage=storage).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))  # not the queued
        best = st.best_trial.values if st.best_trial is not None and st.best_trial.values else None
        out.append({
            "name": st.study_name,
            "model": attrs.get("model", {}).get("name") or attrs.get("model", {}).get("path"),
            "fingerprint": attrs.get("hardware", {}).get("fingerprint"),
            "engine": attrs.get("engine", {}).get("name", "llama-cpp-python"),
            "objective": attrs.get("objective"),
            "trials": len(finished),
            "best": best[0] if best and len(best) == 1 else None,
            "recommendation": "recommendation" in attrs,
        })
    return out


def fail_orphans(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Mark as failed the trials left RUNNING by a tuner process of this host that no longer exists (kill -9,
    power loss), through the storage's public API. Trials of a live process (another ``autotune search`` on
    the same study) are left alone. Tuners on other machines are caught by their stopped heartbeat (``GRACE_S``);
    on this one a dead pid says it at once."""
    host = worker_host()
    study_id = storage.get_study_id_from_name(study.study_name)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid, owner = t.user_attrs.get("pid"), t.user_attrs.get("host")
        if owner == host and pid is not None and not _alive(int(pid)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "reason", f"tuner process {pid} died mid-trial")
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            failed.append(t.number)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    return req.space.without_kv(excluded), {key: {**r, "excluded": tuple(key.split("/")) in excluded}
                                             for key, r in report.items() if tuple(key.split("/")) in set(pairs)}


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
    return run(study, n_trials, lambda trial: _evaluate(trial, req.space.suggest(trial), req, trial_timeout),
               timeout, on_progress, patience, min_trials)


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
        trial.set_user_attr("reason", f"tuner process {pid} on {host} died mid-trial (no heartbeat for "
                                      f"{heartbeat()[1]} s)")
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


def over_budget(m: Measurement, hw: Hardware) -> str:
    """Why a run broke the user's GPU budget ("" where it kept to it, recorded no peak, or there is none): each GPU's
    peak against its budget where the run reports one per budgeted GPU, else the peak of all GPUs together against
    their budgets' sum."""
    budgets = [g.budget for g in hw.offload_gpus]
    if hw.gpu_budget is None:
        return ""
    if len(m.gpu_peaks) == len(budgets):  # in order; one value for every GPU makes the order moot
        checks = [(f"{p.device} ", p.peak, b) for p, b in zip(m.gpu_peaks, budgets) if b is not None]
    else:
        checks = [("GPU ", m.peak_vram, hw.gpu_budget)] if m.peak_vram is not None else []
    for device, peak, budget in checks:
        if peak > budget:
            return f"{device}peak {peak / 2**20:,.0f} MiB over the {budget / 2**20:,.0f} MiB budget"
    return ""


def _evaluate(trial: optuna.Trial, s: Settings, req: StudyRequest, trial_timeout: float) -> tuple[TrialState, list[float] | None]:
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
            trial.set_user_attr("reason", f"does not fit: predicted {est.shortfall / 2**20:,.0f} MiB over the memory budget")
            return TrialState.PRUNED, None
    m = engine.measure(req.model_path, s, req.workload, timeout=trial_timeout, index=trial.number,
                       on_rep=None if req.pareto else _reporter(trial, req))
    overhead.learn(engine.build_key(), req.facts, m, req.workload)  # the GPU's fixed overhead, from its peak
    trial.set_user_attr("measurement", m.to_dict())
    if not m.ok:
        trial.set_user_attr("reason", m.error)
        return TrialState.FAIL, None
    broke = over_budget(m, req.hw)
    if broke:  # the run worked, but not within what the user lets us use: never a candidate
        trial.set_user_attr("reason", broke)
        return TrialState.FAIL, None
    if m.stopped:
        first = objective_value(m, req.objective, req.workload)
        trial.set_user_attr("reason", f"stopped after {len(m.decode_tps)} of {req.workload.reps} repetitions: "
                                      f"{req.objective} {first:.1f} is worse than the median of earlier trials")
        return TrialState.PRUNED, None
    if req.pareto:
        return TrialState.COMPLETE, [m.decode, m.prefill, float(m.peak_rss + (m.peak_vram or 0))]
    if req.guard:
        for metric, value in guard_values(trial.study, req, m).items():
            trial.set_constraint(metric, value)
    return TrialState.COMPLETE, [objective_value(m, req.objective, req.workload)]


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
    bases = [Measurement.from_dict(t.user_attrs["measurement"]) for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,)) if t.user_attrs.get("baseline")]
    speed = {"decode": "decode", "prefill": "prefill", "ttft": "prefill"}  # TTFT is the prompt's time
    out = {}
    for metric in ("decode", "prefill", "ttft"):
        if speed[metric] == speed.get(req.objective) or not bases:
            continue
        sign = -1 if metric == "ttft" else 1
        ref = max(objective_value(b, metric, req.workload) * sign for b in bases) * sign
        mine = objective_value(m, metric, req.workload)
        short = (ref - mine) / ref if sign > 0 else (mine - ref) / ref
        out[metric] = short - GUARD_TOLERANCE if ref else 0.0
    return out


def _reporter(trial: optuna.Trial, req: StudyRequest) -> Callable[[dict[str, float]], bool]:
    """Report each repetition's objective value to Optuna as it ends; False (stop the run) when the pruner
    says so before the last repetition."""
    reported: list[float] = []

    def on_rep(rep: dict[str, float]) -> bool:
        one = Measurement(Settings(), True, prefill_tps=[rep["prefill"]], decode_tps=[rep["decode"]],
                          ttft_s=[rep["ttft"]])
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
