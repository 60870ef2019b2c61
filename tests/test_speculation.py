"""Speculative decoding in llama-server: the verdicts from measured rounds (rounds made up here: no timing), and
the whole stage on the demo model with the reference llama-server (real servers, real drafts and n-grams), through
the CLI, its JSON and the export it leads to."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from autotune.facts import synth
from autotune.output import export, printers
from autotune.search.config import TunedRecord
from autotune.stages import speculation
from autotune.vocabulary.settings import Settings

PLAN = speculation.Plan(rounds=4)


def reply(tps: float, drafted: int = 0, accepted: int = 0, tokens: list[int] | None = None) -> dict[str, Any]:
    return {"decode_tps": tps, "predicted_n": 100, "predicted_ms": 100_000 / tps, "draft_n": drafted,
            "accepted": accepted, "tokens": tokens or [1, 2, 3], "mean_len": 1 + accepted / 10 if drafted else None}


def finalist(label: str, speeds: dict[str, list[float]], **kw: Any) -> speculation.Finalist:
    """Rounds of one finalist: per kind of work its decode speed each round (None: the server failed)."""
    s = Settings(spec_type=label.split()[0])
    runs = []
    for r in range(len(next(iter(speeds.values())))):
        if any(v[r] is None for v in speeds.values()):
            runs.append({"ok": False, "error": "llama-server died (SIGSEGV)"})
            continue
        runs.append({"ok": True, "replies": {w: [reply(v[r], **kw)] for w, v in speeds.items()}})
    return speculation.Finalist(label, s, runs)


def rows_for(edit_gain: float, code_gain: float, rounds: int = 4, **kw: Any) -> list[dict[str, Any]]:
    base = [100.0, 102.0, 98.0, 101.0][:rounds]
    none = finalist("none", {w: base for w in speculation.WORKLOADS})
    ngram = finalist("ngram-map-k4v n=12", {"code": [v * code_gain for v in base], "prose": base,
                                            "edit": [v * edit_gain for v in base]}, **{"drafted": 40, "accepted": 30, **kw})
    return speculation.summarize([none, ngram], speculation.Plan(rounds=rounds))


def test_a_win_on_edits_only_is_said_per_kind_of_work():
    rows = rows_for(edit_gain=1.4, code_gain=0.9)
    v = speculation.verdicts(rows, PLAN)
    assert v["edit"] == "edit: speculate with ngram-map-k4v n=12: decode x1.40 (x1.40-1.40), acceptance 75%"
    assert v["code"] == "code: no speculation; the best, ngram-map-k4v n=12, is x0.90 (slower beyond the noise)"
    assert v["prose"] == "prose: no speculation; the best, ngram-map-k4v n=12, is x1.00 (within the noise)"
    e = rows[1]["workloads"]["edit"]
    assert (e["acceptance"], e["accepted_per_step"], e["unchanged"]) == (0.75, 3.0, True)
    assert rows[0]["workloads"]["edit"]["acceptance"] is None  # no speculation drafts nothing
    # One config for a server: for all work it must slow none down; for edits alone it is the one.
    assert speculation.choose(rows, PLAN) is None
    assert speculation.choose(rows, speculation.Plan(target="edit"))["label"] == "ngram-map-k4v n=12"


def test_a_win_everywhere_goes_into_the_config():
    rows = rows_for(edit_gain=1.4, code_gain=1.2)
    chosen = speculation.choose(rows, PLAN)
    assert chosen is not None and chosen["spec_type"] == "ngram-map-k4v"


def test_three_rounds_claim_nothing():
    rows = rows_for(edit_gain=2.0, code_gain=2.0, rounds=3)
    v = speculation.verdicts(rows, speculation.Plan(rounds=3))
    assert v["edit"] == "edit: no speculation; the best, ngram-map-k4v n=12, is x2.00 (within the noise; 3 rounds a " \
                        "side, a win needs 4)"
    assert speculation.choose(rows, PLAN) is None


def test_a_changed_reply_and_a_dead_server_are_reported():
    base = [100.0, 102.0, 98.0, 101.0]
    none = finalist("none", {w: base for w in speculation.WORKLOADS})
    odd = finalist("draft-simple n_max=4", {w: [v * 1.5 for v in base] for w in speculation.WORKLOADS},
                   drafted=50, accepted=40, tokens=[1, 2, 4])
    dead = finalist("ngram-cache", {w: [None, 100.0, 100.0, 100.0] for w in speculation.WORKLOADS})
    rows = speculation.summarize([none, odd, dead], PLAN)
    assert rows[1]["workloads"]["code"]["unchanged"] is False
    assert speculation.verdicts(rows, PLAN)["code"].endswith("; its greedy reply differs from no speculation's")
    assert rows[2]["failures"] == ["llama-server died (SIGSEGV)"]
    assert rows[2]["workloads"]["code"]["decode"]["n"] == 3 and rows[2]["workloads"]["code"]["versus"] == "same"


def test_a_kind_that_accepted_nothing_cannot_win_however_fast_it_measured():
    """Seen on the 2-core EPYC: ngram-simple drafted nothing on code yet measured x1.15, IQRs apart (the machine
    drifts between one round's runs). Nothing accepted, nothing saved: no claim."""
    rows = rows_for(edit_gain=1.15, code_gain=1.15, drafted=0, accepted=0)
    e = rows[1]["workloads"]["code"]
    assert e["versus"] == "same" and e["ceiling"] == 1.0
    assert speculation.verdicts(rows, PLAN)["code"] == (
        "code: no speculation; the best, ngram-map-k4v n=12, is x1.15 (faster than its 0 accepted tokens allow "
        "(x1.00 at most): the machine's noise)")
    assert speculation.choose(rows, PLAN) is None


def test_a_speed_up_beyond_what_the_accepted_tokens_can_save_is_not_claimed():
    # 10 of every 100 tokens accepted: at most 100/90 = x1.11, measured x1.30 from the first quartile up
    rows = rows_for(edit_gain=1.3, code_gain=1.0, drafted=20, accepted=10)
    e = rows[1]["workloads"]["edit"]
    assert e["versus"] == "same" and round(e["ceiling"], 3) == 1.111 and "x1.11 at most" in e["doubt"]
    # the same speed-up from 30 accepted of 100 (x1.43 at most) is claimed
    assert rows_for(edit_gain=1.3, code_gain=1.0, drafted=40, accepted=30)[1]["workloads"]["edit"]["versus"] == "better"


def test_plan_refuses_what_it_cannot_measure():
    with pytest.raises(speculation.SpecError, match="kinds of work are code, prose, edit; got poetry"):
        speculation.Plan(workloads=("poetry",))
    with pytest.raises(speculation.SpecError, match="--spec-for edit"):
        speculation.Plan(workloads=("code",), target="edit")
    with pytest.raises(speculation.SpecError, match="--prompts is 1 or 2"):
        speculation.Plan(prompts=3)


def test_the_shipped_mix_has_two_messages_per_kind_and_edits_quote_their_text():
    texts = speculation.messages()
    assert {w: len(m) for w, m in texts.items()} == {"code": 2, "prose": 2, "edit": 2}
    assert all("\n\n" in m for m in texts["edit"])  # the text to rewrite is in the message


def test_a_report_saved_as_json_reads_back_the_same():
    rows = rows_for(edit_gain=1.4, code_gain=0.9)
    arms = [speculation.NONE, speculation.Arm("ngram-map-k4v"), speculation.Arm("draft-simple", "/m/drafts/d.gguf", 3)]
    plan = speculation.Plan(rounds=4, gpu_budget=(8192,))
    for chosen in (None, rows[1]):
        report = speculation.SpecReport("m.gguf", Settings(n_ctx=2048), arms, [("draft-mtp", "no MTP layers")], plan,
                                        [{"number": 0, "arm": "none"}], rows, speculation.verdicts(rows, plan), chosen,
                                        12.0)
        saved = json.loads(json.dumps(report.to_json()))
        assert speculation.SpecReport.from_json(saved) == report
        assert saved["recommendation"]["speculate"] is (chosen is not None)
    older = {k: v for k, v in saved.items() if k != "arms"}  # saved before the arms were written: kinds only
    assert [a.label for a in speculation.SpecReport.from_json(older).arms] == saved["kinds"]


def test_the_printed_table_and_verdicts(capsys, monkeypatch):
    rows = rows_for(edit_gain=1.4, code_gain=0.9)
    report = speculation.SpecReport("m.gguf", Settings(), [speculation.NONE], [("draft-mtp", "no MTP layers")], PLAN,
                                    [], rows, speculation.verdicts(rows, PLAN), None, 12.0)
    monkeypatch.setattr(printers.console, "width", 200)
    printers.spec_report(report)
    out = capsys.readouterr().out
    assert "x1.40 (1.40-1.40) faster" in out and "75% accepted, 3.0/step" in out
    assert "not measured: draft-mtp: no MTP layers" in out and "No speculation (12 s)" in out
    assert report.recommended.spec_type == "none"


# ------------------------------------------------------------------------------- real llama-server


@pytest.fixture(scope="module")
def server(reference_tool) -> Path:
    return reference_tool("llama-server")


@pytest.fixture(scope="module")
def random_draft(demo_model, tmp_path_factory) -> Path:
    """A one-layer random draft with the demo model's vocabulary: llama-server accepts it; it guesses badly."""
    return synth.write_model(tmp_path_factory.mktemp("spec") / "random-draft.gguf", demo_model, synth.Shape(n_layer=1))


@pytest.fixture(scope="module")
def twin_draft(demo_model, tmp_path_factory) -> Path:
    """The demo model under another name as its own draft: it proposes what the main model would say."""
    twin = tmp_path_factory.mktemp("twin") / "twin-draft.gguf"
    shutil.copyfile(demo_model, twin)
    return twin


@pytest.fixture(scope="module")
def stage(server, demo_model, twin_draft, tmp_path_factory) -> dict[str, Any]:
    """``autotune spec`` on the demo model with a draft: every kind's defaults once and two searched trials, one
    round (fast: no claim)."""
    tmp = tmp_path_factory.mktemp("stage")
    done = subprocess.run([sys.executable, "-m", "autotune.cli", "spec", str(demo_model), "--draft", str(twin_draft),
                           "--ctx", "1024", "--set", "n_threads=2", "--set", "n_threads_batch=2",
                           "--set", "use_extra_bufts=false", "--prompts", "1", "--gen-tokens", "32",
                           "--trials", "9", "--rounds", "1", "--storage", f"sqlite:///{tmp / 's.db'}", "--json"],
                          capture_output=True, text=True, timeout=900, cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.engine
def test_stage_reports_every_applicable_kind_on_every_kind_of_work(stage):
    assert stage["kinds"] == ["none", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache",
                              "draft-simple (twin-draft.gguf)"]
    assert [t["state"] for t in stage["trials"]] == ["COMPLETE"] * 9
    assert [t["arm"] for t in stage["trials"][:7]] == stage["kinds"]  # each kind's llama.cpp defaults, once
    # then the search: only kinds with something to set (none and ngram-cache were measured once)
    assert all(t["arm"] not in ("none", "ngram-cache") for t in stage["trials"][7:])
    kinds = {r["spec_type"] for r in stage["results"]}
    assert kinds == {"none", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache", "draft-simple"}
    rows = stage["results"]
    twin = [r for r in rows if r["spec_type"] == "draft-simple"]
    for w in speculation.WORKLOADS:
        assert rows[0]["workloads"][w]["drafted"] == 0 and rows[0]["workloads"][w]["decode"]["n"] == 1
        drafted = twin[0]["workloads"][w]
        assert drafted["drafted"] > 0 and drafted["speedup"]["median"] > 0
        assert 0.5 <= drafted["acceptance"] <= 1  # the twin mostly proposes what the main model says
    # an edit repeats its text: the n-gram kinds find something to draft there
    assert any(r["workloads"]["edit"]["accepted"] > 0 for r in rows if r["spec_type"] in speculation.NGRAM_MAP_KINDS)
    assert set(stage["verdicts"]) == set(speculation.WORKLOADS)
    assert all("a win needs 4" in v or "slower beyond" in v for v in stage["verdicts"].values())  # one round
    assert stage["recommendation"]["speculate"] is False and stage["recommendation"]["settings"]["spec_type"] == "none"


@pytest.mark.parametrize("spec", [
    Settings(spec_type="none"),
    Settings(spec_type="ngram-map-k4v", ngram_n=2, ngram_m=8),
    Settings(spec_type="ngram-mod", ngram_mod_match=4, ngram_mod_min=1, ngram_mod_max=8),
    Settings(spec_type="draft-simple", draft_max=4)])
@pytest.mark.engine
def test_the_exported_server_line_speculates_exactly_when_the_config_does(server, demo_model, random_draft, spec):
    """The llama-server line ``export`` writes, run by the real binary on an edit: it drafts (``draft_n`` > 0 in
    its timings) with a kind, and not without one."""
    from autotune.engine import external

    s = Settings(n_ctx=1024, n_threads=2, n_threads_batch=2, use_extra_bufts=False).replace(
        **{k: v for k, v in spec.to_dict().items() if k.startswith(("spec_", "ngram", "draft_max"))},
        draft_model=str(random_draft) if spec.spec_type == "draft-simple" else None)
    line = export.render(TunedRecord(s, {"path": str(demo_model)}, {}), "llama-server").splitlines()[-1]
    assert ("--spec-type" in line) is (s.spec_type != "none")
    replies, error, _ = external.speculative_replies(server, str(demo_model), s, speculation.messages()["edit"][:1],
                                                     32, 300)
    assert not error, error
    assert (replies[0].draft_n > 0) is (s.spec_type != "none")
