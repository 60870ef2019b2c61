"""Plots and the report, on hand-made data: what each figure contains (axes, lines, markers, notes), not pixels."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState

from autotune import memory
from autotune.engine import Measurement
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import GPU, Hardware
from autotune.output import plots, report
from autotune.search.config import TunedRecord
from autotune.stages import speculation
from autotune.vocabulary.settings import Settings

GIB = 2**30
MIB = 2**20


def machine(ram_available: int = 12 * GIB, gpus: tuple[GPU, ...] = ()) -> Hardware:
    return Hardware(cpu_model="test cpu", physical_cores=2, logical_cores=2, ram_total=16 * GIB,
                    ram_available=ram_available, gpus=gpus, backend="cuda" if gpus else "cpu",
                    can_offload=bool(gpus), bandwidth_gbs=20.0)


@pytest.fixture(scope="module")
def facts(tiny_model):
    return read_facts(tiny_model)


def labels(ax: Any) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def fig_labels(fig: Any) -> list[str]:
    return [lab for ax in fig.axes for lab in labels(ax)]


# ------------------------------------------------------------------------------------------- memory


def test_memory_vs_context_budget_line_and_max_ctx_markers(facts):
    s = Settings(n_ctx=4096, flash_attn=True)
    # a budget the f16 cache runs into at about 64k tokens: the crossing is on the plot
    at = memory.estimate(facts, s.replace(n_ctx=65536), machine()).total
    hw = machine(ram_available=at + memory.MARGIN_MIN)
    fig = plots.memory_vs_context(facts, s, hw, ctx_limit=2**20)
    (ax,) = fig.axes  # the budget is within reach: one axis, no cut
    found = labels(ax)
    pairs = memory.cache_pairs(("f16", "q8_0", "q4_0"), True)
    assert [lab for lab in found if lab.startswith("total")] == [f"total, K {k} / V {v}" for k, v in pairs]
    budget = [line for line in ax.get_lines() if line.get_label().startswith("host budget")]
    assert len(budget) == 1 and budget[0].get_ydata()[0] == pytest.approx(hw.ram_available / MIB)
    for k, v in pairs:
        n = memory.max_ctx(facts, s.replace(type_k=k, type_v=v), hw, limit=2**20)
        assert 0 < n < 2**20
        marker = [line for line in ax.get_lines() if line.get_label().startswith(f"max context {k}/{v}: {n:,}")]
        assert len(marker) == 1 and marker[0].get_xdata()[0] == n
    f16 = memory.max_ctx(facts, s.replace(type_k="f16", type_v="f16"), hw, limit=2**20)
    q4 = memory.max_ctx(facts, s.replace(type_k="q4_0", type_v="q4_0"), hw, limit=2**20)
    assert 60000 < f16 < q4  # a smaller cache type reaches further
    assert len(ax.collections) >= 4  # weights, KV, compute, overhead stacked
    assert {c.get_label() for c in ax.collections} >= {"weights (+ CPU repack)", "KV cache", "compute buffer"}
    assert ax.get_xlabel().startswith("context length") and ax.get_ylabel() == "predicted memory (MiB)"
    assert fig.legends and "beyond the trained context" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_memory_vs_context_far_budget_gets_a_cut_axis(facts):
    fig = plots.memory_vs_context(facts, Settings(n_ctx=2048), machine())
    strip, main = sorted(fig.axes, key=lambda a: a.get_position().y0, reverse=True)
    assert any(lab.startswith("host budget") for lab in labels(strip))
    assert strip.get_ylim()[1] > 10 * main.get_ylim()[1]
    markers = [lab for lab in labels(main) if lab.startswith("max context")]
    # without flash attention a quantized V is impossible: V stays f16
    assert [m.split(":")[0] for m in markers] == ["max context f16/f16", "max context q8_0/f16", "max context q4_0/f16"]
    assert all(lab.endswith("4,096 = trained context") for lab in markers)


def test_memory_vs_context_one_panel_per_device(facts):
    hw = machine(gpus=(GPU(0, "Test GPU", "cuda", 8 * GIB, 6 * GIB),))
    fig = plots.memory_vs_context(facts, Settings(n_ctx=2048, n_gpu_layers=3), hw)
    budgets = [lab for lab in fig_labels(fig) if "budget (free memory)" in lab]
    assert [b.split()[0] for b in budgets] == ["host", "gpu0"]


def test_memory_vs_engine_lines_and_markers():
    rows = []
    for n in (512, 1024, 2048):
        pred = {"weights": 90 * MIB, "kv": n * 1000, "compute": 50 * MIB, "output": MIB}
        pred["total"] = sum(pred.values())
        real = {k: int(v * 1.01) for k, v in pred.items()}
        rows.append({"settings": Settings(n_ctx=n), "predicted": pred, "engine": real,
                     "error_pct": {k: -1.0 for k in pred}, "error": None})
    rows.append({"settings": Settings(n_ctx=4096), "predicted": None, "engine": None, "error_pct": None, "error": "x"})
    fig = plots.memory_vs_engine(rows)
    found = fig_labels(fig)
    assert len([lab for lab in found if "predicted (max error 1.00 %)" in lab]) == len(memory.COMPONENTS)
    assert len([lab for lab in found if lab.endswith("engine dry run")]) == len(memory.COMPONENTS)
    with pytest.raises(plots.NoData):
        plots.memory_vs_engine(rows[-1:])


# --------------------------------------------------------------------------------------------- knobs


def run(s: Settings, decode: list[float], prefill: list[float] | None = None) -> Measurement:
    prefill = prefill or [d * 3 for d in decode]
    return Measurement(s, True, decode_tps=decode, prefill_tps=prefill, ttft_s=[64 / p for p in prefill],
                       peak_rss=300 * MIB + int(decode[0]) * MIB)


MEASURED = [
    run(Settings(n_ctx=512, n_threads=1, n_threads_batch=2), [40.0, 42.0, 38.0]),
    run(Settings(n_ctx=512, n_threads=2, n_threads_batch=2, flash_attn=True), [50.0, 55.0]),
    run(Settings(n_ctx=512, n_threads=2, n_threads_batch=2, flash_attn=True, type_k="q8_0", type_v="q8_0"),
        [60.0, 61.0]),
    Measurement(Settings(n_ctx=512, n_threads=1, n_ubatch=64), False, "aborted (SIGABRT)"),
]


def test_knobs_one_row_per_varied_knob_with_spread_and_highlight():
    fig = plots.knobs(MEASURED, roofline_tps=80.0, highlight={"recommended": MEASURED[2].settings})
    assert [ax.get_xlabel() for ax in fig.axes[::2]] == ["decode threads (n_threads)", "flash attention",
                                                         "K/V cache type"]
    assert [ax.get_ylabel() for ax in fig.axes[:2]] == ["decode (tok/s)", "prefill (tok/s)"]
    decode_ax = fig.axes[0]
    # per run: a min-max bar, the repetitions, the median marker
    assert len([lab for lab in labels(decode_ax) if lab == "recommended"]) == 1
    assert sorted(len(line.get_xdata()) for line in decode_ax.get_lines() if line.get_linestyle() == "None"
                  and line.get_marker() == ".") == [2, 2, 3]
    roof = [line for line in decode_ax.get_lines() if line.get_label().startswith("roofline")]
    assert len(roof) == 1 and roof[0].get_ydata()[0] == 80.0
    assert not [lab for lab in labels(fig.axes[1]) if lab.startswith("roofline")]  # prefill has no roofline
    assert "constant:" in fig.get_suptitle() and "n_ubatch=512" in fig.get_suptitle()


def test_knobs_far_roofline_is_stated_not_squashed():
    fig = plots.knobs(MEASURED, roofline_tps=5000.0)
    assert not [lab for lab in fig_labels(fig) if lab.startswith("roofline")]
    assert "roofline (memory-bandwidth limit) 5,000 tok/s is off this scale" in fig.get_suptitle()
    assert fig.axes[0].get_ylim()[1] < 100


def test_knobs_without_data():
    with pytest.raises(plots.NoData, match="no successful"):
        plots.knobs(MEASURED[3:])
    with pytest.raises(plots.NoData, match="no knob varied"):
        plots.knobs(MEASURED[:1] * 2)


def tuned_config(model: str, settings: Settings, **extra: Any) -> TunedRecord:
    def spread(values: list[float]) -> dict[str, Any]:
        return {"median": sorted(values)[len(values) // 2], "q25": min(values), "q75": max(values), "low": min(values),
                "high": max(values), "n": len(values), "samples": values}

    metrics = {"decode": spread([60.0, 61.0]), "prefill": spread([180.0, 183.0]), "ttft": spread([0.35, 0.36]),
               "balanced": spread([90.0, 91.0])}
    base = {"decode": spread([40.0, 41.0]), "prefill": spread([80.0, 81.0]), "ttft": spread([0.8, 0.9]),
            "balanced": spread([50.0, 51.0])}
    return TunedRecord(
        settings, {"path": model, "sha256": "0" * 64, "architecture": "llama", "name": "tiny"}, machine().to_dict(),
        metrics=metrics,
        evidence={"recommendation": {"supported": True, "verdict": "trial 2 beats the engine defaults on decode.",
                                  "speedup": 1.5, "chosen": "trial 2", "baseline_metrics": base,
                                  "roofline": {"bandwidth_gbs": 20.0, "bytes_per_token": 2 * 10**8, "limit_tps": 100.0,
                                               "decode_tps": 60.0, "fraction": 0.6}},
               "workload": {"prompt_tokens": 64, "gen_tokens": 16, "reps": 2, "prompt_kind": "prose"}, **extra})


def test_recommendation_against_defaults(tiny_model):
    fig = plots.recommendation(tuned_config(str(tiny_model), MEASURED[2].settings))
    assert [ax.get_ylabel() for ax in fig.axes] == ["decode (tok/s)", "prefill (tok/s)", "time to first token (s)"]
    assert [lab for lab in labels(fig.axes[0]) if lab.startswith("roofline")] == ["roofline 100 tok/s"]
    assert all(len(ax.patches) == 2 for ax in fig.axes)  # a median bar per candidate
    assert "x1.50 (supported)" in fig.get_suptitle()
    defaults = tuned_config(str(tiny_model), MEASURED[0].settings)
    defaults.evidence["recommendation"]["chosen"] = "defaults"
    fig = plots.recommendation(defaults)  # the defaults won: they stand alone
    assert all(len(ax.patches) == 1 for ax in fig.axes)
    assert fig.get_suptitle().startswith("the engine defaults are the recommendation")
    with pytest.raises(plots.NoData):
        plots.recommendation(TunedRecord(Settings(), {}))


def test_recommendation_shows_every_baseline_that_ran(tiny_model):
    config = tuned_config(str(tiny_model), MEASURED[2].settings)
    spread = {"median": 300.0, "q25": 290.0, "q75": 310.0, "n": 6}
    config.evidence["recommendation"]["side_by_side"] = [
        {"label": "llama.cpp defaults", "baseline": True, "ran": True, "decode": spread, "prefill": spread,
         "ttft": {**spread, "median": 0.2, "q25": 0.19, "q75": 0.21}},
        {"label": "sensible", "baseline": True, "ran": False, "decode": None, "prefill": None, "ttft": None},
        {"label": "trial 3", "baseline": False, "ran": True, "decode": spread, "prefill": spread, "ttft": spread}]
    fig = plots.recommendation(config)
    assert all(len(ax.patches) == 3 for ax in fig.axes)  # the bar, llama.cpp's defaults, the recommendation
    assert "llama.cpp defaults" in [t.get_text() for t in fig.axes[1].get_xticklabels()]


# --------------------------------------------------------------------------------------------- study

DISTRIBUTIONS = {"n_threads": IntDistribution(1, 2),
                 "attention": CategoricalDistribution(("fa-off:f16:f16", "fa-on:f16:f16"))}


def make_study(storage: Any = None, name: str = "toy", directions: tuple[str, ...] = ("maximize",),
               model: str = "", complete: int = 4) -> optuna.Study:
    st = optuna.create_study(study_name=name, storage=storage, directions=list(directions))
    st.set_user_attr("objective", "pareto" if len(directions) > 1 else "decode")
    st.set_user_attr("model", {"path": model, "sha256": "0" * 64, "architecture": "llama", "name": "tiny"})
    st.set_user_attr("hardware", machine().to_dict())
    st.set_user_attr("workload", {"prompt_tokens": 64, "gen_tokens": 16, "reps": 2, "prompt_kind": "prose"})
    st.set_user_attr("n_ctx", 512)
    for i in range(complete + 3):
        threads, fa = 1 + i % 2, i % 3 == 0
        s = Settings(n_ctx=512, n_threads=threads, flash_attn=fa)
        params = {"n_threads": threads, "attention": f"fa-{'on' if fa else 'off'}:f16:f16"}
        attrs: dict[str, Any] = {"settings": s.to_dict()}
        if i == 0:
            attrs["role"] = "defaults"
        if i < complete:
            m = run(s, [30.0 + 7 * i, 31.0 + 7 * i], [100.0 - 9 * i, 104.0 - 9 * i])
            attrs["measurement"] = m.to_dict()
            values = [m.decode] if len(directions) == 1 else [m.decode, m.prefill, float(m.peak_rss)]
            st.add_trial(optuna.trial.create_trial(values=values, params=params, distributions=DISTRIBUTIONS,
                                                   user_attrs=attrs))
        else:
            state = TrialState.PRUNED if i == complete else TrialState.FAIL
            pruned = state == TrialState.PRUNED
            attrs["reason"] = "does not fit: predicted 12 MiB over" if pruned else "aborted (SIGABRT)"
            st.add_trial(optuna.trial.create_trial(state=state, params=params, distributions=DISTRIBUTIONS,
                                                   user_attrs=attrs))
    return st


def test_history_shows_pruned_and_failed_trials():
    fig = plots.history(make_study())
    (ax,) = fig.axes
    found = labels(ax)
    assert "pruned (1 trials, no value)" in found and "failed (2 trials, no value)" in found
    assert ax.get_xlabel() == "trial number" and ax.get_ylabel().startswith("decode (tok/s")
    notes = "\n".join(t.get_text() for t in fig.texts)
    assert "#4 pruned: does not fit" in notes and "#5 failed: aborted (SIGABRT)" in notes
    with pytest.raises(plots.NoData, match="no completed trial"):
        plots.history(make_study(complete=0))


def test_importances_and_small_studies():
    fig = plots.importances(make_study())
    (ax,) = fig.axes
    assert len(ax.patches) == len(DISTRIBUTIONS)
    assert ax.get_xlabel().startswith("relative importance")
    with pytest.raises(plots.NoData, match="at least 2 completed trials"):
        plots.importances(make_study(complete=1))


def test_pareto_front_labels_trials_and_works_for_both_study_kinds():
    for directions in (("maximize",), ("maximize", "maximize", "minimize")):
        st = make_study(directions=directions)
        fig = plots.pareto(st, "decode", "prefill")
        (ax,) = fig.axes
        assert ax.get_xlabel() == "decode (tok/s)" and ax.get_ylabel() == "prefill (tok/s)"
        # decode rises and prefill falls trial by trial: every completed trial is on the front
        assert sorted(t.get_text() for t in ax.texts) == ["#0", "#1", "#2", "#3"]
        fig = plots.pareto(st, "decode", "memory")  # faster trials here also take more memory: a trade-off
        assert fig.axes[0].get_ylabel().startswith("peak memory (MiB")
        assert sorted(t.get_text() for t in fig.axes[0].texts) == ["#0", "#1", "#2", "#3"]
        assert plots.history(st).axes and plots.importances(st).axes


def test_timeline_and_no_leaks_into_pyplot_or_global_style():
    before_style = dict(matplotlib.rcParams)
    before = plt.get_fignums()
    st = make_study()
    for fig in (plots.timeline(st), plots.history(st), plots.importances(st), plots.pareto(st), plots.knobs(MEASURED)):
        assert fig.axes
    assert plt.get_fignums() == before
    assert matplotlib.rcParams["axes.facecolor"] == before_style["axes.facecolor"]


# --------------------------------------------------------------------------------------- speculation


def spec_report() -> speculation.SpecReport:
    """A speculation report made from rounds whose speeds are given."""
    from test_speculation import rows_for

    rows = rows_for(edit_gain=1.4, code_gain=0.9)
    plan = speculation.Plan(rounds=4)
    return speculation.SpecReport("m.gguf", Settings(), [speculation.NONE], [("draft-mtp", "no MTP layers")], plan, [],
                                  rows, speculation.verdicts(rows, plan), None, 1.0)


def test_speculation_speedup_and_acceptance_per_kind_and_work():
    fig = plots.speculation(spec_report())
    speed_ax, acc_ax, note_ax = fig.axes
    assert speed_ax.get_xlabel().startswith("decode speed-up over no speculation")
    assert acc_ax.get_xlabel() == "draft tokens accepted (%)"
    assert [t.get_text() for t in speed_ax.get_yticklabels()] == ["ngram-map-k4v n=12"]
    widths = sorted(round(p.get_width(), 2) for p in speed_ax.patches)
    assert widths == [0.9, 1.0, 1.4]  # code, prose, edit
    assert "no speculation (x1)" in labels(speed_ax)
    notes = note_ax.texts[0].get_text()
    assert "edit: speculate with ngram-map-k4v" in notes and "not measured: draft-mtp" in notes
    with pytest.raises(plots.NoData, match="no kind of speculation was measured"):
        plots.speculation(dataclasses.replace(spec_report(), rows=spec_report().rows[:1]))


# -------------------------------------------------------------------------------------------- report


@pytest.fixture()
def stored(tmp_path, tiny_model) -> dict[str, Any]:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    st = make_study(storage=url, name="toy-study", model=str(tiny_model))
    config = tuned_config(str(tiny_model), Settings.from_dict(st.trials[3].user_attrs["settings"]),
                          study={"name": "toy-study", "storage": url, "objective": "decode"})
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(config.to_json()))
    return {"url": url, "config": path, "tmp": tmp_path}


def test_report_from_a_config_and_its_study(stored):
    done = report.build(str(stored["config"]), stored["tmp"] / "out")
    names = [p.name for p in done.images]
    assert names == ["recommendation.png", "memory.png", "knobs.png", "history.png", "importances.png",
                     "pareto_decode_prefill.png", "pareto_decode_memory.png", "timeline.png"]
    page = done.index.read_text()
    assert page.count("<img ") == len(names) and page.count("data:image/png;base64,") == len(names)
    assert all(p.stat().st_size > 5000 and f"href='{p.name}'" in page for p in done.images)
    assert "Tuned configuration" in page and "llama-server" in page and "trial 2 beats the engine defaults" in page
    assert "<tr class=changed><td>n_threads</td>" in page or "<tr class=changed><td>flash_attn</td>" in page
    assert done.notes == []


def test_report_from_a_study_name_and_from_a_config_alone(stored, tmp_path):
    done = report.build("toy-study", tmp_path / "a", storage=stored["url"])
    assert "recommendation.png" not in [p.name for p in done.images]
    assert any("no recommendation yet" in n for n in done.notes)
    assert "no recommendation yet" in done.index.read_text()
    alone = json.loads(stored["config"].read_text())
    alone["study"]["storage"] = f"sqlite:///{tmp_path / 'moved.db'}"
    alone["speculation"] = spec_report().to_json()  # what search --spec adds
    (tmp_path / "alone.json").write_text(json.dumps(alone))
    done = report.build(str(tmp_path / "alone.json"), tmp_path / "b")
    assert [p.name for p in done.images] == ["recommendation.png", "memory.png", "speculation.png"]
    assert any("knob and study plots left out" in n for n in done.notes)
    assert not (tmp_path / "moved.db").exists()  # looking for a study never creates a database


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_report_cli(stored):
    tmp = stored["tmp"]
    done = cli("report", str(stored["config"]), "--out", str(tmp / "cli"), cwd=tmp)
    assert done.returncode == 0, done.stderr
    assert (tmp / "cli" / "index.html").is_file() and "8 plots" in " ".join(done.stdout.split())  # rich wraps long paths
    for args, fragment in ((("report", "missing.json", "--out", "x"), "missing.json: no such file"),
                           (("report", "nope", "--out", "x", "--storage", stored["url"]), "no study named 'nope'"),
                           (("report", "nope", "--out", "x"), "no study database at studies/autotune.db")):
        bad = cli(*args, cwd=tmp)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and fragment in bad.stderr, bad.stderr
    assert not (tmp / "studies").exists()
