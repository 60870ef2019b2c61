"""Studies survive engine faults, Ctrl-C, kill -9 and a second tuner on the same database: real processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autotune.engine import Workload, bundled
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import probe
from autotune.search import loop, request, space, study

pytestmark = pytest.mark.engine

FAST = ["--ctx", "256", "--prompt-tokens", "16", "--gen-tokens", "4", "--reps", "1", "--kv-quality", "off"]


def search(model: Path, db: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "autotune.cli", "search", str(model), "--storage", f"sqlite:///{db}", *FAST, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )


def load(db: Path) -> optuna.Study:
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def count(db: Path, state: TrialState) -> int:
    if not db.exists():
        return 0
    try:
        return len(load(db).get_trials(deepcopy=False, states=(state,)))
    except Exception:  # the study is not created yet
        return 0


def test_fifty_trials_with_a_third_faulty_are_all_accounted_for(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_FAULT", "abort,segfault,oom,garbage,exit,hang")
    monkeypatch.setenv("AUTOTUNE_FAULT_EVERY", "3")
    facts = read_facts(tiny_model)
    hw = probe(bundled, measure_bandwidth=False)
    sp = space.build_space(hw, facts, 256)
    req = request.StudyRequest(model_path=str(tiny_model), facts=facts, hw=hw, space=sp,
                             workload=Workload(16, 4, 1), storage=f"sqlite:///{tmp_path / 's.db'}")
    st = study.open_study(req)
    p = loop.run_trials(st, req, 51, trial_timeout=5, patience=0)  # a hang costs 5 s; a trial, 1-2 s
    trials = st.get_trials()
    assert len(trials) == 51 and p.done == 51
    assert p.complete + p.failed + p.pruned == 51
    assert p.failed == 17 and all(t.state == TrialState.FAIL for t in trials if t.number % 3 == 2)
    reasons = {t.user_attrs["reason"].split(":")[0].split(" (")[0] for t in trials if t.state == TrialState.FAIL}
    assert reasons == {"aborted", "crashed with SIGSEGV", "killed by SIGKILL", "no result from the engine process",
                       "exit code 3", "timeout"}
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number % 3 != 2)


def test_ctrl_c_stops_the_trial_and_leaves_the_study_consistent(tiny_model, tmp_path):
    db = tmp_path / "s.db"
    proc = search(tiny_model, db, "--trials", "200", env={"AUTOTUNE_FAULT": "hang", "AUTOTUNE_FAULT_EVERY": "4"})
    try:
        wait_for(lambda: count(db, TrialState.COMPLETE) >= 2 and count(db, TrialState.RUNNING) == 1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in out and "Traceback" not in err
    assert "best so far" in out
    st = load(db)
    assert not st.get_trials(states=(TrialState.RUNNING,))
    last = st.trials[-1]
    assert last.state == TrialState.FAIL and last.user_attrs["reason"] == "interrupted by the user"
    assert not _engine_children_alive()


def kill_9_mid_trial(model: Path, db: Path) -> None:
    """A tuner killed with SIGKILL while a trial runs (its engine hangs), after two finished trials."""
    proc = search(model, db, "--trials", "200", env={"AUTOTUNE_FAULT": "hang", "AUTOTUNE_FAULT_EVERY": "3"})
    try:
        wait_for(lambda: count(db, TrialState.COMPLETE) >= 2 and count(db, TrialState.RUNNING) == 1)
    finally:
        proc.kill()
        proc.communicate()


def test_kill_9_then_resume_keeps_every_finished_trial(tiny_model, tmp_path):
    db = tmp_path / "s.db"
    kill_9_mid_trial(tiny_model, db)
    wait_for(lambda: not _engine_children_alive(), timeout=10)  # the hung engine child follows its tuner
    before = load(db)
    finished = {t.number: t.values for t in before.get_trials(states=(TrialState.COMPLETE,))}
    (orphan,) = before.get_trials(states=(TrialState.RUNNING,))
    n_before = len(before.trials)

    again = search(tiny_model, db, "--trials", "1", "--no-recommend")
    out, err = again.communicate(timeout=180)
    assert again.returncode == 0, err
    after = load(db)
    assert {t.number: t.values for t in after.get_trials(states=(TrialState.COMPLETE,)) if t.number in finished} == finished
    assert after.trials[orphan.number].state == TrialState.FAIL
    assert "died mid-trial" in after.trials[orphan.number].user_attrs["reason"]
    assert len(after.trials) == n_before + 1


def test_two_tuners_on_one_sqlite_study(tiny_model, tmp_path):
    db = tmp_path / "s.db"
    first = search(tiny_model, db, "--trials", "5", "--no-recommend")  # both at once: one seeds the baselines
    second = search(tiny_model, db, "--trials", "5", "--no-recommend")
    for p in (first, second):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    st = load(db)
    assert len(st.trials) == 10
    assert all(t.state == TrialState.COMPLETE for t in st.trials)
    assert len({t.number for t in st.trials}) == 10
    assert [t.user_attrs.get("role") for t in st.trials].count("defaults") == 1
    with sqlite3.connect(db) as con:
        assert con.execute("pragma integrity_check").fetchone() == ("ok",)


def _engine_children_alive() -> bool:
    """Any engine child of this test's tuners still running? (They carry the test's fault setting.)"""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    pids = [int(line.split()[0]) for line in out.splitlines() if "autotune.engine" in line]
    for pid in pids:
        try:
            if b"AUTOTUNE_FAULT=hang" in Path(f"/proc/{pid}/environ").read_bytes():
                return True
        except OSError:
            pass
    return False


def test_a_tuner_killed_mid_trial_is_failed_by_its_stopped_heartbeat(tiny_model, tmp_path):
    """What a tuner on another machine gets (no pid to check there): the dead tuner's trial stops sending
    heartbeats, and Optuna's stale-trial check fails it with the reason the trial carried."""
    db = tmp_path / "s.db"
    kill_9_mid_trial(tiny_model, db)
    # a checker with a one-second grace period, as if the dead tuner had gone quiet long ago
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}", heartbeat_interval=1, grace_period=1)
    (name,) = optuna.get_all_study_names(storage)
    st = optuna.load_study(study_name=name, storage=storage)
    (orphan,) = st.get_trials(states=(TrialState.RUNNING,))

    def failed_by_heartbeat() -> bool:
        optuna.storages.fail_stale_trials(st)
        return st.trials[orphan.number].state == TrialState.FAIL

    wait_for(failed_by_heartbeat, timeout=30)
    assert "died mid-trial (no heartbeat" in st.trials[orphan.number].user_attrs["reason"]
    assert all(t.user_attrs["reason"] == "" for t in st.get_trials(states=(TrialState.COMPLETE,)))
