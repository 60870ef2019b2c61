"""Recommendations that lose no speed a user feels: every baseline, per-metric comparison, the second stage over
the knobs that cannot move the objective, pruning a clearly bad run after one repetition, and stopping a
study whose best has stopped moving."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from autotune import engine
from autotune.engine import Measurement, Workload, bundled, history
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import probe
from autotune.search import baselines, guard, loop, pipeline, recommend, request, space, study
from autotune.vocabulary.settings import Settings

WORK = Workload(prompt_tokens=32, gen_tokens=8, reps=2)


def candidate(label: str, decode: list[float], prefill: list[float], **settings) -> recommend.Candidate:
    """A candidate with these per-repetition speeds (two repetitions a run); TTFT follows from the prompt."""
    s = Settings(**settings)
    runs = [Measurement(s, True, decode_tps=decode[i:i + 2], prefill_tps=prefill[i:i + 2],
                        ttft_s=[WORK.prompt_tokens / p for p in prefill[i:i + 2]]) for i in range(0, len(decode), 2)]
    return recommend.Candidate(label, s, runs)


def test_the_fastest_config_is_not_taken_when_it_loses_prefill_to_a_baseline():
    """The measured case on the Intel machine: a q8_0 cache nearly doubles decode but costs a third of prefill."""
    lcp = candidate("defaults", [44, 45, 44, 43], [290, 288, 291, 289], n_threads=1)
    llama = candidate("llama.cpp defaults", [47, 46, 47, 48], [302, 303, 301, 304], flash_attn=True)
    q8 = candidate("trial 2", [87, 86, 88, 87], [205, 204, 206, 203], type_k="q8_0", type_v="q8_0", flash_attn=True)
    q8k = candidate("trial 11", [80, 81, 82, 80], [300, 303, 302, 304], type_k="q8_0")
    d = recommend.decide([lcp, llama, q8, q8k], [lcp, llama], "decode", WORK)
    assert d.order[0] is q8k and d.supported
    assert d.best_bases == {"decode": llama, "prefill": llama, "ttft": llama}
    assert "trial 2 measured best on decode but loses prefill" in d.verdict and "--objective decode" in d.verdict
    assert recommend.losses(q8, d.best_bases, WORK) == ["prefill", "ttft"]
    assert recommend.losses(q8k, d.best_bases, WORK) == []

    traded = recommend.decide([lcp, llama, q8, q8k], [lcp, llama], "decode", WORK, trade=True)
    assert traded.order[0] is q8 and traded.supported  # the user named the objective: the trade is theirs


def test_among_configs_the_noise_cannot_tell_apart_the_one_that_gives_least_away_wins():
    """Measured with --objective decode on SmolLM2: the fastest gave a third of prefill away, the next was as
    fast within the noise and gave 3 % away."""
    llama = candidate("sensible", [45, 44, 45, 46], [298, 297, 299, 296], flash_attn=True)
    q8 = candidate("trial 6", [70, 73, 68, 71], [199, 192, 205, 198], type_k="q8_0", type_v="q8_0", flash_attn=True)
    q8k = candidate("trial 8", [69, 71, 70, 68], [288, 289, 287, 290], type_k="q8_0")
    d = recommend.decide([llama, q8, q8k], [llama], "decode", WORK, trade=True)
    assert d.order[0] is q8k and d.supported
    assert "trial 8 measures the same as trial 6 on decode within the noise and better on prefill" in d.verdict
    assert "not taken" not in d.verdict  # nothing was left out: the tie rule chose
    kept = recommend.decide([llama, q8, q8k], [llama], "decode", WORK)  # not told to trade: both give prefill away
    assert kept.order[0] is llama and not kept.supported


def test_without_a_config_that_loses_nothing_the_best_baseline_is_kept():
    lcp = candidate("defaults", [44, 45, 44, 43], [200, 201, 199, 200], n_threads=1)
    llama = candidate("llama.cpp defaults", [47, 46, 47, 48], [302, 303, 301, 304], flash_attn=True)
    q8 = candidate("trial 2", [87, 86, 88, 87], [205, 204, 206, 203], type_k="q8_0", type_v="q8_0", flash_attn=True)
    d = recommend.decide([lcp, llama, q8], [lcp, llama], "decode", WORK)
    assert d.order[0] is llama and not d.supported
    assert "loses prefill to llama.cpp defaults (x0.68)" in d.verdict


def test_each_metric_is_compared_with_its_own_best_baseline():
    """One baseline is best on decode, another on prefill: a config beating the first on decode must still
    match the second on prefill."""
    decode_base = candidate("defaults", [50, 51, 50, 49], [100, 101, 99, 100], n_threads=1)
    prefill_base = candidate("llama.cpp defaults", [30, 31, 30, 29], [300, 301, 299, 300], flash_attn=True)
    mixed = candidate("trial 4", [70, 71, 70, 69], [298, 302, 301, 299], n_threads=2)
    d = recommend.decide([decode_base, prefill_base, mixed], [decode_base, prefill_base], "decode", WORK)
    assert d.best_bases["decode"] is decode_base and d.best_bases["prefill"] is prefill_base
    assert d.order[0] is mixed and d.supported and d.baseline is decode_base
    rec = recommend.Recommendation("decode", WORK, mixed, d.baseline, [decode_base, prefill_base, mixed], True, "",
                                   None, {}, {}, [decode_base, prefill_base], d.best_bases)
    versus = rec.versus()
    assert versus["decode"]["baseline"] == "defaults" and versus["decode"]["verdict"] == "better"
    assert versus["prefill"]["baseline"] == "llama.cpp defaults" and versus["prefill"]["verdict"] == "same"
    assert rec.speedup == pytest.approx(70 / 50)
    rows = {r["label"]: r for r in rec.side_by_side()}
    assert rows["defaults"]["loses"] == ["prefill", "ttft"] and rows["trial 4"]["chosen"]


def test_racing_rules_out_only_what_the_rounds_so_far_decided():
    lcp = candidate("defaults", [44, 45, 44, 43], [290, 288, 291, 289], n_threads=1)
    llama = candidate("llama.cpp defaults", [47, 46, 47, 48], [302, 303, 301, 304], flash_attn=True)
    q8 = candidate("trial 2", [87, 86, 88, 87], [205, 204, 206, 203], type_k="q8_0", type_v="q8_0", flash_attn=True)
    q8k = candidate("trial 11", [80, 81, 82, 80], [300, 303, 302, 304], type_k="q8_0")
    everyone, bases = [lcp, llama, q8, q8k], [lcp, llama]
    out = {c.label for c in everyone if recommend.out_of_running(c, everyone, bases, "decode", WORK)}
    assert out == {"defaults", "trial 2"}  # beaten everywhere by a baseline; loses prefill, so never taken
    traded = {c.label for c in everyone if recommend.out_of_running(c, everyone, bases, "decode", WORK, trade=True)}
    assert traded == {"defaults", "trial 11"}  # the trade takes the fastest; the best baseline stays the yardstick
    one_run = candidate("trial 5", [30, 31], [100, 101])  # too few samples to call anything
    assert not recommend.out_of_running(one_run, [*everyone, one_run], bases, "decode", WORK)


def test_only_trials_within_reach_of_the_best_baseline_trial_are_re_measured():
    reach = recommend.within_reach([14.2, 20.7, 20.5], "decode")
    assert reach(26.4) and reach(20.0) and not reach(11.2)  # 20.0 is within 5 % of 20.7; 11.2 cannot win
    ttft = recommend.within_reach([1.20, 1.10], "ttft")
    assert ttft(1.0) and ttft(1.15) and not ttft(1.5)
    assert recommend.within_reach([], "decode") is None  # no baseline trial completed: every trial may win


def test_a_candidate_ruled_out_after_two_rounds_sits_out_the_third_scripted_engine(scripted_engine):
    """The engine handed in is scripted: this is about which runs happen."""
    speeds = {1: (44.0, 290.0), 2: (47.0, 302.0)}  # n_threads -> (decode, prefill)
    ran: list[int] = []

    def scripted(model, s, work, timeout=300.0, index=0, **_):
        ran.append(s.n_threads)
        d, p = speeds[s.n_threads]
        jitter = len(ran) % 3 * 0.1
        return Measurement(s, True, decode_tps=[d + jitter, d - jitter], prefill_tps=[p + jitter, p - jitter],
                           ttft_s=[WORK.prompt_tokens / p] * 2)

    slow, fast = recommend.Candidate("defaults", Settings(n_threads=1)), recommend.Candidate("sensible", Settings(n_threads=2))
    recommend.measure_rounds(scripted_engine(scripted), "model.gguf", [slow, fast], WORK, rounds=4,
                             settled=lambda c: recommend.out_of_running(c, [slow, fast], [slow, fast], "decode", WORK))
    assert (len(slow.runs), len(fast.runs)) == (2, 4)


def test_every_study_has_llama_cpp_defaults_and_sensible_as_baselines(tiny_model, tmp_path):
    hw = probe(bundled, measure_bandwidth=False)
    facts = read_facts(tiny_model)
    req = request.StudyRequest(model_path=str(tiny_model), facts=facts, hw=hw, space=space.build_space(hw, facts, 1024),
                             workload=WORK, storage=f"sqlite:///{tmp_path / 's.db'}")
    named = dict(baselines.baselines(req))
    llama = named["llama.cpp defaults"]
    assert (llama.n_batch, llama.n_ubatch, llama.flash_attn, llama.use_mmap) == (2048, 512, True, True)
    assert llama.n_threads == llama.n_threads_batch == hw.physical_cores
    assert named["defaults"] == engine.defaults(1024)
    assert named["sensible"].n_batch != llama.n_batch  # never one config with llama.cpp's: both are measured
    roles = [t.user_attrs["role"] for t in study.open_study(req).trials]
    assert roles[:2] == ["llama.cpp defaults", "defaults"]
    tool = tmp_path / "llama-bench"  # never run: only its defaults are asked for
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    bench = dataclasses.replace(req, engine=engine.make(f"llama-bench:{tool}"))  # its defaults are llama.cpp's
    labels = [label for label, _ in baselines.baselines(bench)]
    assert "llama.cpp defaults" not in labels and labels[0] == "defaults"


def test_the_first_stage_holds_what_cannot_move_the_objective_and_the_second_tunes_it(tiny_model):
    hw = probe(bundled, measure_bandwidth=False)
    sp = space.build_space(hw, read_facts(tiny_model), 1024)
    decode_knobs = set(sp.moving("decode").describe())
    assert {"n_ubatch", "batch_factor", "n_threads_batch"}.isdisjoint(decode_knobs)
    assert "attention" in decode_knobs
    base = Settings(n_ctx=1024, n_threads=1, flash_attn=True, type_k="q8_0")
    second = sp.neutral_to("decode", base)
    assert set(second.describe()) == {"n_ubatch", "batch_factor"} | ({"n_threads_batch"} if hw.logical_cores > 1 else set())
    assert second.settings_from({"n_ubatch": 128, "batch_factor": 2}) == base.replace(n_ubatch=128, n_batch=256)
    assert pipeline.moved_by("ttft", False) == "prefill" and pipeline.moved_by("balanced", False) is None
    assert pipeline.second_trials(sp, "decode", 30) == 4 and pipeline.second_trials(sp, None, 30) == 0


def test_a_run_whose_first_repetition_is_below_the_median_is_stopped(tmp_path):
    """The pruner hook alone, on a study of told trials: no engine runs."""
    st = optuna.create_study(storage=f"sqlite:///{tmp_path / 'p.db'}", direction="maximize", pruner=study.pruner())
    dist = {"x": CategoricalDistribution((0, 1))}
    for v in (40.0, 45.0, 50.0, 55.0, 60.0, 65.0):
        t = st.ask(dist)
        t.report(v, 0)
        t.report(v, 1)
        st.tell(t, v)
    req = request.StudyRequest(model_path="m.gguf", facts=None, hw=None, space=None, workload=WORK)  # type: ignore[arg-type]
    slow, fast = st.ask(dist), st.ask(dist)
    assert loop._reporter(slow, req)({"decode": 20.0, "prefill": 100.0, "ttft": 0.3}) is False
    on_rep = loop._reporter(fast, req)
    assert on_rep({"decode": 70.0, "prefill": 100.0, "ttft": 0.3}) is True
    assert on_rep({"decode": 10.0, "prefill": 100.0, "ttft": 0.3}) is True  # the last repetition always finishes
    assert fast.storage.get_trial(fast._trial_id).intermediate_values == {0: 70.0, 1: 10.0}


def test_a_study_stops_when_its_best_has_not_moved(tmp_path):
    st = optuna.create_study(direction="maximize")
    dist = {"x": CategoricalDistribution((0, 1))}
    values = [10.0, 20.0, 30.0, 30.0] + [30.5] * 8  # a gain of 1.7 % over the last 8 trials
    for i, v in enumerate(values):
        st.add_trial(optuna.trial.create_trial(params={"x": 0}, distributions=dist, value=v))
        if i < len(values) - 1:
            assert loop.stalled(st, patience=8, min_trials=12) == ""
    assert "the last 8 trials moved the best by 1.7 %" in loop.stalled(st, patience=8, min_trials=12)
    assert loop.stalled(st, patience=0) == ""
    st.add_trial(optuna.trial.create_trial(params={"x": 0}, distributions=dist, value=40.0))
    assert loop.stalled(st, patience=8, min_trials=12) == ""  # a real gain: go on

    ttft = optuna.create_study(direction="minimize")  # smaller is better: the same rule, the other way
    for v in [1.0] * 10:
        ttft.add_trial(optuna.trial.create_trial(params={"x": 0}, distributions=dist, value=v))
    assert loop.stalled(ttft, patience=loop.PATIENCE).startswith("stopped early")


@pytest.mark.engine
def test_a_run_stopped_after_its_first_repetition_keeps_what_it_measured(tiny_model):
    work = Workload(prompt_tokens=32, gen_tokens=8, reps=3)
    told: list[dict[str, float]] = []
    m = engine.measure(str(tiny_model), Settings(n_ctx=256), work, timeout=120,
                       on_rep=lambda rep: told.append(rep) is not None)  # False: stop after the first
    assert m.ok and m.stopped and len(told) == 1
    assert (m.decode_tps, m.prefill_tps, m.ttft_s) == ([told[0]["decode"]], [told[0]["prefill"]], [told[0]["ttft"]])

    told.clear()
    whole = engine.measure(str(tiny_model), Settings(n_ctx=256), work, timeout=120,
                           on_rep=lambda rep: told.append(rep) is None)  # True: go on
    assert whole.ok and not whole.stopped and whole.decode_tps == [r["decode"] for r in told] and len(told) == 3
    assert whole.peak_rss > 0 and whole.output_tokens


@pytest.mark.engine
def test_a_history_evaluated_once_is_loaded_by_later_runs_with_the_same_cache_layout(demo_model, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(history, "_dir", str(tmp_path))
    work = Workload(prompt_tokens=32, gen_tokens=8, reps=1, depth=256)
    s = Settings(n_ctx=512, n_threads=1, n_threads_batch=1, flash_attn=True, use_extra_bufts=False)
    first = engine.measure(str(demo_model), s, work, timeout=120)
    again = engine.measure(str(demo_model), s.replace(use_mmap=False), work, timeout=120)  # the same cache
    other = engine.measure(str(demo_model), s.replace(flash_attn=False), work, timeout=120)  # another V layout
    assert first.ok and again.ok and other.ok
    assert (first.history_loaded, again.history_loaded, other.history_loaded) == (False, True, False)
    assert again.output_tokens == first.output_tokens  # the greedy reply after a loaded history is the same
    assert len(list(tmp_path.glob("*.kv"))) == 2

    for f in tmp_path.glob("*.kv"):  # a file that does not hold this history is not used
        f.write_bytes(b"not a saved state")
    broken = engine.measure(str(demo_model), s, work, timeout=120)
    assert broken.ok and not broken.history_loaded and broken.output_tokens == first.output_tokens


def test_the_sampler_is_told_which_trials_gave_another_speed_away():
    """Optuna constraint values from told trials (no engine): positive where a trial's prefill or TTFT fell more
    than the tolerance below the best baseline trial's."""
    st = optuna.create_study(direction="maximize")
    dist = {"x": CategoricalDistribution((0, 1))}

    def run(decode: float, prefill: float) -> Measurement:
        return Measurement(Settings(), True, decode_tps=[decode] * 2, prefill_tps=[prefill] * 2,
                           ttft_s=[WORK.prompt_tokens / prefill] * 2)

    for role, m in (("defaults", run(40, 250)), ("llama.cpp defaults", run(45, 300)), (None, run(90, 100))):
        attrs = {"measurement": m.to_dict(), **({"role": role, "baseline": True} if role else {})}
        st.add_trial(optuna.trial.create_trial(params={"x": 0}, distributions=dist, value=m.decode, user_attrs=attrs))
    req = request.StudyRequest(model_path="m.gguf", facts=None, hw=None, space=None, workload=WORK)  # type: ignore[arg-type]
    gave_away = guard.guard_values(st, req, run(90, 200))
    tol = guard.GUARD_TOLERANCE
    assert gave_away == pytest.approx({"prefill": 100 / 300 - tol, "ttft": (0.16 - 32 / 300) / (32 / 300) - tol})
    assert all(v <= 0 for v in guard.guard_values(st, req, run(60, 290)).values())  # within the tolerance
    assert guard.guard_values(st, dataclasses.replace(req, objective="prefill"), run(40, 400)) == \
        pytest.approx({"decode": (45 - 40) / 45 - tol})  # a prefill study guards decode
    t = st.ask()
    for metric, value in gave_away.items():
        t.set_constraint(metric, value)
    st.tell(t, 90.0)
    assert not guard.guarded(st.trials[-1]) and guard.guarded(st.trials[0])
