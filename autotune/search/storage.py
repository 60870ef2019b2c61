"""Where studies are kept and what they are called: the storage URL (SQLite in ./studies unless told), the
safeguards around a SQLite file (another program's database, a corrupt file, two tuners creating the schema at
once, queued trials taken twice), a stored study read back, every study in a storage, the trials a dead tuner
left running, and the one rule that names a study.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import sqlite3
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc
from optuna.trial import TrialState

from ..facts.gguf_model import file_sha256
from ..facts.probe import Hardware
from ..vocabulary.errors import ConfigError, StudyError

DEFAULT_STORAGE_DIR = Path("studies")

# Optuna would log every study it creates and every failed trial; the reasons are recorded and shown by autotune
# itself.
optuna.logging.set_verbosity(optuna.logging.ERROR)
# Optuna calls its heartbeat experimental; the studies rely on it on purpose.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

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


def study_name(model_path: str, hw: Hardware, *parts: str) -> str:
    """A study's name: the model file (its stem and content hash), the kind of machine, then what else sets the
    study apart (``parts``). Same request, same name: a second run of a command resumes its study, and a worker
    on another machine of the same kind joins it."""
    return "-".join([Path(model_path).stem, file_sha256(model_path)[:12], hw.fingerprint(), *parts])


def digest(value: Any) -> str:
    """A short stable tag for ``value`` (JSON-able) in a study's name, where the value itself is too long."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]


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


@functools.cache
def optuna_tables() -> frozenset[str]:
    """Every table of Optuna's schema, as Optuna itself creates it (in memory, through its public storage). A file
    holding only some of them is a schema another tuner is creating at this moment (Optuna creates the tables
    one by one), not a database of something else."""
    storage = optuna.storages.RDBStorage("sqlite://")
    try:
        return frozenset(sqlalchemy.inspect(storage.engine).get_table_names())
    finally:
        storage.engine.dispose()


def _check_sqlite(url: str) -> None:
    """Refuse a SQLite file that is corrupt or belongs to something else, before Optuna writes to it."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url[len("sqlite:///") :])
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    except sqlite3.DatabaseError as e:
        raise StudyError(f"{path}: not a usable study database ({e})") from None
    if tables - optuna_tables():
        raise StudyError(
            f"{path}: a SQLite database of something else (tables: {', '.join(sorted(tables)[:5])}); "
            "not touching it — pass another --storage"
        )


def open_storage(storage: str | None) -> optuna.storages.BaseStorage:
    url = storage_url(storage)
    _check_sqlite(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # wait on another tuner's write lock
    for attempt in range(5):
        try:
            beat, grace = heartbeat()
            store = optuna.storages.RDBStorage(url, heartbeat_interval=beat, grace_period=grace, **kwargs)
            if url.startswith("sqlite"):
                _serialize_sqlite(store.engine)
            return store
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
        isinstance(e, sqlalchemy.exc.DatabaseError) and "already exists" in str(e)
    )


def load_existing(name: str, url: str) -> optuna.Study:
    """Load study ``name`` to read it (report, export); a SQLite file that is not there is an error here, not
    a new empty database."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise StudyError(
            f"no study database at {url[len('sqlite:///') :]} (pass --storage, or run this where autotune search ran)"
        )
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise ConfigError(f"no study named {name!r} in {url}; stored studies: {', '.join(names) or 'none'}") from None


def recommendation(name: str, url: str) -> dict[str, Any]:
    """The tuned config a finished study stored (``autotune export --study``); ConfigError before it has one."""
    st = load_existing(name, url)
    if "recommendation" not in st.user_attrs:
        raise ConfigError(f"study {name} has no recommendation yet: run autotune search to finish it")
    return st.user_attrs["recommendation"]


@dataclass(frozen=True)
class StudySummary:
    """One study of a storage as ``autotune studies`` lists it."""

    name: str
    model: str | None  # the model's name, else its path
    fingerprint: str | None  # the machine's
    engine: str
    objective: str | None  # a metric's name or "pareto"
    trials: int  # finished: complete, pruned or failed
    best: float | None  # the best value of a single-objective study
    recommendation: bool  # whether a tuned config can be exported

    def to_json(self) -> dict[str, Any]:
        """One row of ``autotune studies --json``."""
        return {
            "name": self.name,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "engine": self.engine,
            "objective": self.objective,
            "trials": self.trials,
            "best": self.best,
            "recommendation": self.recommendation,
        }


def summaries(storage: str | None) -> list[StudySummary]:
    """Every study in a storage, for ``autotune studies``: model, machine, engine, trials, best, and whether
    a recommendation (an exportable tuned config) exists."""
    url = storage_url(storage)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise StudyError(f"no study database at {url[len('sqlite:///') :]} (pass --storage)")
    out = []
    store = open_storage(url)
    for st in optuna.get_all_study_summaries(store, include_best_trial=True):
        attrs = st.user_attrs
        finished = optuna.load_study(study_name=st.study_name, storage=store).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        )  # not the queued
        best = st.best_trial.values if st.best_trial is not None and st.best_trial.values else None
        out.append(
            StudySummary(
                name=st.study_name,
                model=attrs.get("model", {}).get("name") or attrs.get("model", {}).get("path"),
                fingerprint=attrs.get("hardware", {}).get("fingerprint"),
                engine=attrs.get("engine", {}).get("name", "llama-cpp-python"),
                objective=attrs.get("objective"),
                trials=len(finished),
                best=best[0] if best and len(best) == 1 else None,
                recommendation="recommendation" in attrs,
            )
        )
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
