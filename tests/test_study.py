"""The study: real runs of a tiny model, gated by the memory model, stored, resumed, and recommended."""

from __future__ import annotations

import dataclasses
import multiprocessing
import sqlite3
import subprocess
import sys
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from autotune import engine
from autotune.engine import Measurement, Workload, bundled
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import probe
from autotune.output import printers
from autotune.search import kvgate, loop, recommend, request, space, storage, study
from autotune.vocabulary.errors import StudyError

WORK = Workload(prompt_tokens=32, gen_tokens=8, reps=2)


@pytest.fixture(scope="module")
def hw():
    return probe(bundled, measure_bandwidth=False)


def make_request(model, hw, storage, **kw) -> request.StudyRequest:
    facts = read_facts(model)
    pins = kw.pop("pins", {})
    sp = space.build_space(hw, facts, 256, pins)
    return request.StudyRequest(model_path=str(model), facts=facts, hw=hw, space=sp, workload=WORK,
                              storage=storage, pins=pins, **kw)


def states(st: optuna.Study) -> list[TrialState]:
    return [t.state for t in st.get_trials(deepcopy=False)]


@pytest.mark.engine
def test_study_measures_baselines_first_and_resumes(tiny_model, hw, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    req = make_request(tiny_model, hw, url)
    st = study.open_study(req)
    loop.run_trials(st, req, 3, trial_timeout=120)
    trials = st.get_trials()
    assert [t.user_attrs.get("role") for t in trials[:3]] == ["llama.cpp defaults", "defaults", "sensible"]
    llama = engine.llama_cpp_defaults(256)  # as the space spells it (n_batch within the context, no SWA cache here)
    assert trials[0].user_attrs["settings"] == req.space.settings_from(req.space.params_of(llama)).to_dict()
    assert trials[1].user_attrs["settings"] == engine.defaults(256).to_dict()
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert all(t.value == pytest.approx(request.objective_value(
        Measurement.from_dict(t.user_attrs["measurement"]), "decode", WORK)) for t in trials)

    again = study.open_study(req)  # a second run of the same command resumes the same study
    assert again.study_name == st.study_name and len(again.trials) == 3
    loop.run_trials(again, req, 2, trial_timeout=120)
    assert len(again.trials) == 5
    assert [t.user_attrs.get("role") for t in again.trials].count("defaults") == 1


def test_configs_that_cannot_fit_are_pruned_not_run(tiny_model, hw, tmp_path):
    tiny_ram = dataclasses.replace(hw, ram_available=64 * 2**20)
    req = make_request(tiny_model, tiny_ram, f"sqlite:///{tmp_path / 's.db'}")
    st = study.open_study(req)
    loop.run_trials(st, req, 3)
    for t in st.trials:
        assert t.state == TrialState.PRUNED
        assert t.user_attrs["reason"].startswith("does not fit")
        assert "measurement" not in t.user_attrs


@pytest.mark.engine
def test_failures_are_recorded_with_reasons_never_as_zero(tiny_model, hw, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_FAULT", "exit,segfault")
    monkeypatch.setenv("AUTOTUNE_FAULT_EVERY", "2")
    req = make_request(tiny_model, hw, f"sqlite:///{tmp_path / 's.db'}")
    st = study.open_study(req)
    p = loop.run_trials(st, req, 4, trial_timeout=120)
    assert (p.complete, p.failed, p.pruned) == (2, 2, 0)
    failed = st.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [1, 3]
    assert "exit code 3" in failed[0].user_attrs["reason"] and "SIGSEGV" in failed[1].user_attrs["reason"]
    assert all(t.values is None for t in failed)


def test_trial_left_running_by_a_dead_tuner_is_marked_failed(tiny_model, hw, tmp_path):
    req = make_request(tiny_model, hw, f"sqlite:///{tmp_path / 's.db'}")
    st = study.open_study(req)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    t = st.ask()
    t.set_user_attr("pid", int(dead.stdout))
    t.set_user_attr("host", __import__("socket").gethostname())
    live = st.ask()
    live.set_user_attr("pid", __import__("os").getpid())
    live.set_user_attr("host", __import__("socket").gethostname())
    assert storage.fail_orphans(st, storage.open_storage(req.storage)) == [t.number]
    assert st.trials[t.number].state == TrialState.FAIL and "died" in st.trials[t.number].user_attrs["reason"]
    assert st.trials[live.number].state == TrialState.RUNNING


def test_foreign_and_corrupt_databases_are_refused(tiny_model, hw, tmp_path):
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as con:
        con.execute("create table recipes (name text)")
    with pytest.raises(StudyError, match="something else"):
        study.open_study(make_request(tiny_model, hw, f"sqlite:///{foreign}"))
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    with pytest.raises(StudyError, match="not a usable study database"):
        study.open_study(make_request(tiny_model, hw, f"sqlite:///{corrupt}"))


def test_a_schema_another_tuner_is_creating_is_not_taken_for_a_foreign_database(tmp_path):
    """Optuna creates its tables one by one, so a second tuner can find only ``studies`` there; CI once refused
    that file as "a SQLite database of something else". It is opened, and the schema completed."""
    whole = tmp_path / "whole.db"
    optuna.storages.RDBStorage(f"sqlite:///{whole}").engine.dispose()
    with sqlite3.connect(whole) as con:
        (create,) = con.execute("select sql from sqlite_master where name='studies'").fetchone()
    path = tmp_path / "half.db"
    with sqlite3.connect(path) as con:
        con.execute(create)
    storage.open_storage(f"sqlite:///{path}")
    assert {"studies", "trials", "version_info"} <= tables_of(path)


def tables_of(path) -> set[str]:
    with sqlite3.connect(path) as con:
        return {r[0] for r in con.execute("select name from sqlite_master where type='table'")}


def test_optunas_own_schema_is_known_and_one_table_more_is_not(tmp_path):
    """The schema is read from Optuna itself (no private module): every table a real Optuna storage writes is
    one it knows, so that file opens; the same file with one more table belongs to something else."""
    path = tmp_path / "s.db"
    optuna.storages.RDBStorage(f"sqlite:///{path}").engine.dispose()
    assert tables_of(path) == storage.optuna_tables()
    storage.open_storage(f"sqlite:///{path}")
    with sqlite3.connect(path) as con:
        con.execute("create table invoices (id integer)")
    with pytest.raises(StudyError, match="a SQLite database of something else"):
        storage.open_storage(f"sqlite:///{path}")


def _call_after(barrier, fn, arg, results) -> None:
    barrier.wait()
    try:
        fn(arg)
        results.put("ok")
    except Exception as e:
        results.put(f"{type(e).__name__}: {e}")


def released_together(fn, arg, n: int = 4) -> list[str]:
    """Call ``fn(arg)`` in ``n`` processes released at the same moment; each one's "ok" or error."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_call_after, args=(barrier, fn, arg, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [results.get(timeout=5) for _ in procs]


def test_tuners_started_together_on_a_fresh_storage_all_open_it(tmp_path):
    """Optuna creates the schema on first open; 4 openers released at once collide on it (about half of them
    failed before open_storage retried the collision). 5 fresh databases, 4 processes each, all must open."""
    for i in range(5):
        assert released_together(storage.open_storage, f"sqlite:///{tmp_path / f's{i}.db'}") == ["ok"] * 4


def test_tuners_opening_one_new_study_together_seed_the_baselines_once(tiny_model, hw, tmp_path):
    """4 tuners released at once on a new study (its storage created first): exactly one creates it and
    enqueues the baselines; the others load it. 5 studies."""
    for i in range(5):
        url = f"sqlite:///{tmp_path / f's{i}.db'}"
        storage.open_storage(url)
        req = make_request(tiny_model, hw, url)
        assert released_together(study.open_study, req) == ["ok"] * 4
        roles = [t.user_attrs.get("role") for t in study.open_study(req).trials]
        assert roles == ["llama.cpp defaults", "defaults", "sensible"]


def test_unwritable_studies_directory(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setattr(storage, "DEFAULT_STORAGE_DIR", ro / "studies")
    if __import__("os").geteuid() == 0:  # root writes anywhere: make the path a file instead
        ro.chmod(0o700)
        (ro / "studies").write_text("not a directory")
    with pytest.raises(StudyError, match="cannot write study databases"):
        storage.storage_url(None)


@pytest.mark.engine
def test_recommendation_is_confirmed_and_honest(tiny_model, hw, tmp_path):
    req = make_request(tiny_model, hw, f"sqlite:///{tmp_path / 's.db'}", pins={"n_threads": 2, "n_threads_batch": 2})
    st = study.open_study(req)
    loop.run_trials(st, req, 3, trial_timeout=120)
    rec = recommend.recommend(st, req, top_k=2, rounds=2, trial_timeout=120)
    assert rec.confirmation is not None and rec.confirmation.ok
    assert rec.baseline in rec.baselines and len(rec.baseline.runs) >= 2
    assert rec.baseline.spread("decode", WORK).median == max(b.spread("decode", WORK).median for b in rec.baselines)
    chosen, base = rec.chosen.spread("decode", WORK), rec.baseline.spread("decode", WORK)
    if rec.supported:
        assert chosen.q25 > base.q75 and rec.chosen is not rec.baseline
    else:
        assert rec.chosen in rec.baselines
    assert rec.metrics()["decode"]["n"] == len(rec.metrics()["decode"]["samples"]) >= 2


@pytest.mark.engine
def test_failed_confirmation_falls_back_to_the_next_confirmed_config(tiny_model, hw, tmp_path, monkeypatch):
    req = make_request(tiny_model, hw, f"sqlite:///{tmp_path / 's.db'}")
    st = study.open_study(req)
    loop.run_trials(st, req, 3, trial_timeout=120)
    monkeypatch.setenv("AUTOTUNE_FAULT", "exit")
    monkeypatch.setenv("AUTOTUNE_FAULT_EVERY", str(recommend.CONFIRM + 1))  # only the first confirmation fails
    rec = recommend.recommend(st, req, top_k=2, rounds=1, trial_timeout=120)
    assert rec.confirmation is not None and rec.confirmation.ok
    assert "confirmation run of" in rec.verdict and "failed" in rec.verdict
    first_choice = [c for c in rec.candidates if any("confirmation run failed" in f for f in c.failures)]
    assert len(first_choice) == 1 and first_choice[0] is not rec.chosen


def test_no_win_is_claimed_from_too_few_samples():
    from autotune.engine import Measurement
    from autotune.vocabulary.settings import Settings

    fast = recommend.Candidate("trial 7", Settings(n_threads=2), [Measurement(Settings(), True, decode_tps=[30.0, 31.0])])
    slow = recommend.Candidate("defaults", Settings(), [Measurement(Settings(), True, decode_tps=[10.0, 11.0])])
    supported, verdict = recommend._judge(fast, slow, "decode", WORK)
    assert not supported and "fewer than" in verdict
    fast.runs.append(Measurement(Settings(), True, decode_tps=[30.5, 29.5]))
    slow.runs.append(Measurement(Settings(), True, decode_tps=[10.5, 9.5]))
    assert recommend._judge(fast, slow, "decode", WORK)[0]


@pytest.mark.engine
def test_crashing_defaults_are_a_result_and_the_best_working_baseline_is_the_bar_fake_amx_crash(
        tiny_model, hw, tmp_path, monkeypatch):
    """Extra buffers on crash (injected); the self-check pinned them off for the study. The engine defaults are
    still measured, crash, and are reported; the claim is made against the defaults with the switch."""
    monkeypatch.setenv("AUTOTUNE_FAKE_AMX_CRASH", "1")
    forced = {"use_extra_bufts": False}
    facts = read_facts(tiny_model)
    req = request.StudyRequest(model_path=str(tiny_model), facts=facts, hw=hw, space=space.build_space(hw, facts, 256, forced),
                             workload=WORK, storage=f"sqlite:///{tmp_path / 's.db'}", forced=forced)
    assert req.name() != dataclasses.replace(req, forced={}).name()  # its own study
    st = study.open_study(req)
    loop.run_trials(st, req, 3, trial_timeout=120)
    assert states(st) == [TrialState.COMPLETE] * 3  # every trial runs with the switch
    rec = recommend.recommend(st, req, top_k=1, rounds=2, trial_timeout=120)
    by = {b.label: b for b in rec.baselines}
    assert not by["defaults"].runs and all("SIGSEGV" in f for f in by["defaults"].failures)
    assert rec.baseline.label.endswith(" with use_extra_bufts=False") and len(rec.baseline.runs) == 2
    assert "The engine defaults crash on this machine" in rec.verdict
    assert rec.baseline_report()["defaults"]["ran"] is False


def _ask_after(barrier, url, results) -> None:
    warnings.simplefilter("ignore")  # Optuna: "heartbeat ... supposed to be used with Study.optimize"
    st = optuna.load_study(study_name="queue", storage=storage.open_storage(url))
    barrier.wait()
    results.put(st.ask().number)


def test_tuners_asking_together_never_take_the_same_queued_trial(tmp_path):
    """Optuna takes a queued trial by reading it WAITING, then writing RUNNING; on SQLite that was two steps, and
    two tuners took the same queued baseline (measured: 26 duplicates in 20 rounds of 4 tuners), the second one's
    tell then failing with "Cannot tell a COMPLETE trial". 10 rounds of 4 tuners on 4 queued trials: 4 distinct."""
    ctx = multiprocessing.get_context("fork")
    for i in range(10):
        url = f"sqlite:///{tmp_path / f'q{i}.db'}"
        st = optuna.create_study(study_name="queue", storage=storage.open_storage(url))
        for k in range(4):
            st.enqueue_trial({"x": k})
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_ask_after, args=(barrier, url, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert sorted(results.get(timeout=5) for _ in procs) == [0, 1, 2, 3]


def test_a_study_summary_is_the_row_autotune_studies_json_has_always_printed(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    st = optuna.create_study(study_name="s1", storage=url, direction="maximize")
    st.set_user_attr("model", {"name": "tiny", "path": "/models/tiny.gguf"})
    st.set_user_attr("hardware", {"fingerprint": "abc123"})
    st.set_user_attr("objective", "decode")
    st.add_trial(optuna.trial.create_trial(value=12.5))
    st.enqueue_trial({})  # queued: not counted
    (row,) = storage.summaries(url)
    assert row == storage.StudySummary("s1", "tiny", "abc123", "llama-cpp-python", "decode", 1, 12.5, False)
    assert list(row.to_json().items()) == [("name", "s1"), ("model", "tiny"), ("fingerprint", "abc123"),
                                           ("engine", "llama-cpp-python"), ("objective", "decode"), ("trials", 1),
                                           ("best", 12.5), ("recommendation", False)]
    printers.studies([row], url)
    assert "12.50" in capsys.readouterr().out


def test_the_kv_quality_report_reads_back_as_stored_with_the_verdict_added(tiny_model, hw, tmp_path, capsys):
    """The gate's report, stored in a tuned config's evidence, is the engine's measurement per pair plus
    ``excluded``, key for key; a pair stored before ``max_kl`` existed keeps its shorter record."""
    req = make_request(tiny_model, hw, f"sqlite:///{tmp_path / 's.db'}")
    pairs = [f"{k}/{v}" for k, v in space.kv_pairs(req.space)]
    stored = {p: {"top1_agreement": 0.99, "mean_kl": 0.001, "max_kl": 0.02, "tokens": 48} for p in pairs}
    stored[pairs[0]] = {"error": "the engine refused it"}
    stored[pairs[-1]] = {"top1_agreement": 0.5, "mean_kl": 0.3, "tokens": 48}
    st = study.open_study(req)
    st.set_user_attr("kv_quality", stored)
    sp, quality = kvgate.kv_quality(st, req, "strict")  # all measured already: no engine run
    assert quality.to_json() == {p: {**r, "excluded": p in (pairs[0], pairs[-1])} for p, r in stored.items()}
    assert [list(r) for r in quality.to_json().values()] == [[*r, "excluded"] for r in stored.values()]
    assert quality.excluded() == [pairs[0], pairs[-1]] and len(sp.params["attention"]) < len(
        req.space.params["attention"])
    assert kvgate.kv_quality(st, req, "off")[1] == kvgate.KvQuality()
    printers.kv_quality(quality, {})
    out = capsys.readouterr().out
    assert "excluded: the engine refused it" in out and "0.990" in out and "0.3000" in out
