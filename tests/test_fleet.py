"""Many workers, one study, on SQLite and on a real PostgreSQL server (a throwaway cluster on loopback):
real ``autotune search`` processes, one of them killed with SIGKILL mid-trial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

pytestmark = pytest.mark.engine

FAST = ["--ctx", "256", "--prompt-tokens", "16", "--gen-tokens", "4", "--reps", "1", "--kv-quality", "off",
        "--no-recommend"]
BEAT = {"AUTOTUNE_HEARTBEAT_S": "1", "AUTOTUNE_GRACE_S": "3"}


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 's.db'}"
    return request.getfixturevalue("pg_url")


def worker(model: Path, url: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "autotune.cli", "search", str(model), "--storage", url, *FAST,
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **BEAT, **(env or {})})


def trials(url: str) -> list[FrozenTrial]:
    try:
        storage = optuna.storages.RDBStorage(url)
        (name,) = [n for n in optuna.get_all_study_names(storage) if "-then-" not in n]  # the first stage's
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except (ValueError, RuntimeError, KeyError):  # not created yet
        return []


def poll(predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` holds (checked every 0.1 s); AssertionError after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"condition not reached in {timeout:.0f} s")


def test_three_workers_one_killed_mid_trial_fake_other_host(tiny_model, url):
    """Worker C says it runs on another machine (AUTOTUNE_WORKER_HOST, the one faked seam), so the others
    cannot check its pid: only its stopped heartbeat tells them it died. Its trial is failed with a reason
    naming the worker; A and B finish; every finished trial is kept; the baselines are enqueued once. (No early
    stop: every worker runs its 26 first-stage trials, then 4 of a second stage.)"""
    a = worker(tiny_model, url, "--trials", "30", "--patience", "0")
    poll(lambda: len(trials(url)) > 0, timeout=120)  # A passed the self-check: B and C reuse its verdict
    b = worker(tiny_model, url, "--trials", "30", "--patience", "0")
    c = worker(tiny_model, url, "--trials", "30", "--patience", "0",
               env={"AUTOTUNE_FAULT": "hang", "AUTOTUNE_WORKER_HOST": "node-c"})

    def c_running() -> FrozenTrial | None:
        return next((t for t in trials(url) if t.state == TrialState.RUNNING and t.user_attrs.get("host") == "node-c"),
                    None)

    poll(lambda: c_running() is not None, timeout=120)
    orphan = c_running()
    assert orphan is not None
    c.kill()
    c.communicate()
    failed_after = poll(lambda: trials(url)[orphan.number].state == TrialState.FAIL, timeout=120)
    for p in (a, b):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    done = trials(url)
    assert done[orphan.number].user_attrs["reason"] == \
        f"tuner process {c.pid} on node-c died mid-trial (no heartbeat for 3 s)"
    # by the heartbeat, not before the grace period: 3 s after C's last beat, which came up to 1 s before the kill
    assert failed_after >= 3 - 1
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert len(complete) == 52 and len({t.number for t in done}) == len(done)
    assert [t.user_attrs.get("role") for t in done].count("defaults") == 1
    assert all(t.state != TrialState.RUNNING for t in done)
    print(json.dumps({"storage": url.split(":")[0], "trials": len(done), "workers": 3,
                      "seconds_from_death_to_failed": round(failed_after, 1)}))


def test_a_worker_with_another_engine_build_refuses_in_one_line(tiny_model, url):
    """Timings from another engine build are not comparable: the study remembers its build (here rewritten,
    as if another build had made it) and a worker with a different one refuses."""
    first = worker(tiny_model, url, "--trials", "1")
    assert first.communicate(timeout=300) and first.returncode == 0
    storage = optuna.storages.RDBStorage(url)
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    study.set_user_attr("engine", {**study.user_attrs["engine"], "build": "0123456789ab"})
    second = worker(tiny_model, url, "--trials", "1")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2 and err.count("\n") == 1
    assert "was measured with engine build 0123456789ab" in err


def test_studies_lists_and_export_reads_a_storage(tiny_model, url, tmp_path):
    done = subprocess.run([sys.executable, "-m", "autotune.cli", "search", str(tiny_model), "--storage", url,
                           *FAST[:-1], "--trials", "2", "--top-k", "1", "--rounds", "1"], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = subprocess.run([sys.executable, "-m", "autotune.cli", "studies", "--storage", url, "--json"],
                            capture_output=True, text=True, timeout=120)
    (row,) = json.loads(listed.stdout)
    assert row["trials"] == 2 and row["recommendation"] is True and row["engine"] == "llama-cpp-python"
    exported = subprocess.run([sys.executable, "-m", "autotune.cli", "export", "--storage", url, "--study",
                               row["name"], "--format", "llama-server"], capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0 and exported.stdout.splitlines()[-1].startswith("llama-server -m ")
