"""Draft models: compatibility from metadata, memory of main + draft, the greedy draft's bookkeeping, the
side-by-side measurement's decisions (with a scripted runner: no timing), the CLI, and the search stage.

The real Qwen pair runs only with AUTOTUNE_INTEGRATION=1.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import run_python
from gguf import GGUFValueType, GGUFWriter

from autotune import catalog, cli, draft, engine, export, health, synth
from autotune.engine import Measurement, Workload
from autotune.gguf_model import FastReader, ModelFacts, read_facts
from autotune.probe import GPU, Hardware, probe
from autotune.settings import Settings

GIB = 2**30
ONE_THREAD = Settings(n_ctx=512, n_threads=1, n_threads_batch=1, n_batch=64, n_ubatch=64)


def tokenizer_fields(source: Path) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    """``source``'s tokenizer metadata without the merges (reading and writing those is slow, and the
    compatibility rules never look at them)."""
    reader = FastReader(source)
    return {key: (f.contents(), f.types[0], f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)
            for key, f in reader.fields.items()
            if key.startswith("tokenizer.") and key not in ("tokenizer.ggml.merges", "tokenizer.chat_template")}


def tokenizer_donor(path: Path, fields: dict[str, Any], changes: dict[str, Callable[[Any], Any]]) -> Path:
    """A GGUF holding only a tokenizer (``synth.write_model`` copies it), some fields changed or added."""
    w = GGUFWriter(path, "llama")
    flags = {key: (None, GGUFValueType.BOOL, None) for key in ("tokenizer.ggml.add_bos_token",
                                                                 "tokenizer.ggml.add_eos_token")}
    for key, (value, vtype, sub) in {**flags, **fields}.items():
        value = changes[key](value) if key in changes else value
        if value is not None:
            w.add_key_value(key, value, vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def smol_fields(demo_model: Path) -> dict[str, Any]:
    return tokenizer_fields(demo_model)


@pytest.fixture(scope="module")
def lean_donor(smol_fields: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenizer_donor(tmp_path_factory.mktemp("donor") / "donor.gguf", smol_fields, {})


@pytest.fixture(scope="module")
def header_main(lean_donor: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8B-shaped main model, header only (the memory model and the size rule need only the header)."""
    return synth.write_model(tmp_path_factory.mktemp("main") / "main.gguf", lean_donor, synth.SHAPES["8b"],
                             header_only=True)


@pytest.fixture(scope="module")
def header_small(lean_donor: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compatible 1B-shaped draft, alone in its directory."""
    return synth.write_model(tmp_path_factory.mktemp("small") / "draft.gguf", lean_donor, synth.SHAPES["1b"],
                             header_only=True)


def header_draft(tmp: Path, fields: dict[str, Any], changes: dict[str, Callable[[Any], Any]],
                 shape: synth.Shape = synth.SHAPES["1b"]) -> Path:
    donor = tokenizer_donor(tmp / "donor.tok", fields, changes)
    return synth.write_model(tmp / "draft.gguf", donor, shape, header_only=True)


def cpu_host(ram_gib: float = 60) -> Hardware:
    return Hardware(cpu_model="test", physical_cores=8, logical_cores=16, ram_total=int(64 * GIB),
                    ram_available=int(ram_gib * GIB))


def gpu_host(*free_gib: float) -> Hardware:
    gpus = tuple(GPU(index=i, name=f"GPU {i}", backend="cuda", vram_total=int(f * GIB) + GIB, vram_free=int(f * GIB))
                 for i, f in enumerate(free_gib))
    return Hardware(cpu_model="test", physical_cores=8, logical_cores=16, ram_total=int(64 * GIB),
                    ram_available=int(60 * GIB), gpus=gpus, backend="cuda", can_offload=True)


# ------------------------------------------------------------------------------------ compatibility
# The rules are checked on facts changed in memory (fast); reading them from files is covered by the
# CLI test and the tokenizer-donor test below.


def test_same_tokenizer_is_compatible(header_main: Path, header_small: Path) -> None:
    assert draft.compatibility(read_facts(header_main), read_facts(header_small)) == []


def _tokens(facts: ModelFacts, tokens: tuple[str, ...]) -> ModelFacts:
    return dataclasses.replace(facts, tokens=tokens, n_vocab=len(tokens))


@pytest.mark.parametrize("change, reason", [
    (lambda f: dataclasses.replace(f, vocab_type="llama"), "vocab type differs: main gpt2, draft llama"),
    (lambda f: dataclasses.replace(f, add_bos=True), "add-BOS flag differs: main False, draft True"),
    (lambda f: dataclasses.replace(f, add_eos=True), "add-EOS flag differs: main False, draft True"),
    (lambda f: _tokens(f, f.tokens[:100] + ("<changed>",) + f.tokens[101:]),
     "token 100 differs: main 't', draft '<changed>' (1 of 49,147 token texts from id 5 differ)"),
    (lambda f: _tokens(f, f.tokens + tuple(f"<extra{i}>" for i in range(129))),
     "vocab sizes differ by 129 (main 49,152, draft 49,281); the engine allows at most 128"),
    (lambda f: dataclasses.replace(f, tokens=()), "no token texts in the draft model's metadata"),
])
def test_rejections_name_the_rule(header_small: Path, change: Callable[[ModelFacts], ModelFacts], reason: str) -> None:
    main = read_facts(header_small)
    assert draft.compatibility(main, change(main)) == [reason]


@pytest.mark.parametrize("change", [
    lambda f: _tokens(f, f.tokens[:3] + ("<changed>",) + f.tokens[4:]),  # ids below 5 are not compared
    lambda f: _tokens(f, f.tokens + tuple(f"<extra{i}>" for i in range(128))),  # 128 more: allowed
    lambda f: dataclasses.replace(f, bos_id=7, eos_id=9),  # never added by this tokenizer: ids are free
])
def test_tolerated_differences(header_small: Path, change: Callable[[ModelFacts], ModelFacts]) -> None:
    main = read_facts(header_small)
    assert draft.compatibility(main, change(main)) == []


def test_special_ids_matter_when_added(header_small: Path) -> None:
    main = dataclasses.replace(read_facts(header_small), add_bos=True, add_eos=True)
    d = dataclasses.replace(main, bos_id=7, eos_id=8)
    assert draft.compatibility(main, d) == ["BOS token id differs: main 1, draft 7",
                                            "EOS token id differs: main 2, draft 8"]


def test_rejection_read_from_a_file(header_main: Path, smol_fields: dict[str, Any], tmp_path: Path) -> None:
    d = header_draft(tmp_path, smol_fields, {"tokenizer.ggml.tokens": lambda v: v[:100] + ["<x>"] + v[101:],
                                             "tokenizer.ggml.add_eos_token": lambda v: True})
    c = draft.check_candidate(read_facts(header_main), str(d))
    assert c.reasons == ["add-EOS flag differs: main False, draft True",
                         "token 100 differs: main 't', draft '<x>' (1 of 49,147 token texts from id 5 differ)"]


def test_size_rule_is_advice(header_main: Path, header_small: Path) -> None:
    main, small = read_facts(header_main), read_facts(header_small)  # 8B main: drafts up to 1B
    assert draft.size_warnings(main, small) == []
    assert "not smaller than the main model" in draft.size_warnings(main, main)[0]
    mid = dataclasses.replace(small, n_params=int(2.6e9))
    assert "rule of thumb is at most 1B" in draft.size_warnings(main, mid)[0]
    for main_b, ok_b, big_b in ((14, 3.2, 4.5), (32, 7.6, 14), (1.5, 0.5, 0.8)):
        m = dataclasses.replace(main, n_params=int(main_b * 1e9))
        assert draft.size_warnings(m, dataclasses.replace(small, n_params=int(ok_b * 1e9))) == []
        assert draft.size_warnings(m, dataclasses.replace(small, n_params=int(big_b * 1e9)))
    assert len(draft.check_candidate(read_facts(header_small), str(header_main)).warnings) == 1  # advice only


def test_candidates_from_dirs_and_files(header_main: Path, header_small: Path, tmp_path: Path) -> None:
    d = tmp_path / "draft.gguf"
    d.symlink_to(header_small)
    junk = tmp_path / "notes.gguf"
    junk.write_text("not a model")
    found = draft.candidate_paths([str(tmp_path), str(header_main)], str(header_main))
    assert found == [str(d), str(junk), str(header_main)]
    main = read_facts(header_main)
    assert draft.check_candidate(main, str(junk)).reasons[0].endswith("not a GGUF file (magic b'not ', expected b'GGUF')")
    assert draft.check_candidate(main, str(header_main)).reasons == ["it is the main model itself"]
    with pytest.raises(draft.DraftError, match="no such file"):
        draft.candidate_paths([str(tmp_path / "missing.gguf")], str(header_main))
    (tmp_path / "empty").mkdir()
    with pytest.raises(draft.DraftError, match="no .gguf files"):
        draft.candidate_paths([str(tmp_path / "empty")], str(header_main))


# ------------------------------------------------------------------------------------------- memory


def _row(rows: list[dict[str, Any]], placement: str) -> dict[str, Any]:
    return next(r for r in rows if r["placement"] == placement)


def _dev(row: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in row["devices"] if d["device"] == name)


def test_memory_on_cpu_adds_draft_and_logits(header_main: Path, header_small: Path) -> None:
    from autotune import memory

    main, d = read_facts(header_main), read_facts(header_small)
    s = Settings(n_ctx=4096)
    rows = draft.predict_memory(main, d, s, cpu_host())
    assert [r["placement"] for r in rows] == ["cpu"]
    host = _dev(rows[0], "host")
    main_host = memory.estimate(main, s, cpu_host()).device("host").total
    draft_est = memory.estimate(d, s, cpu_host())
    assert host["main"] == main_host
    assert host["draft"] == draft_est.device("host").total - memory.HOST_OVERHEAD  # one process
    assert host["speculative"] == (512 - 1) * main.n_vocab * 4 + 4096 * main.n_vocab * 4
    assert host["total"] == host["main"] + host["draft"] + host["speculative"]
    assert rows[0]["draft_kv"] == draft_est.kv_k + draft_est.kv_v and rows[0]["draft_n_ctx"] == 4096
    assert rows[0]["fits"]
    tight = draft.predict_memory(main, d, s, cpu_host(ram_gib=host["total"] / GIB))
    assert not tight[0]["fits"] and tight[0]["shortfall"] > 0


def test_memory_placements_on_gpus(header_main: Path, header_small: Path) -> None:
    main, d = read_facts(header_main), read_facts(header_small)
    s = Settings(n_ctx=4096, n_gpu_layers=main.n_layer + 1)
    one = draft.predict_memory(main, d, s, gpu_host(23))
    assert [(r["placement"], r["kind"], r["default"]) for r in one] == [("cpu", "CPU", False), ("gpu0", "same GPU", True)]
    assert _dev(one[0], "gpu0")["draft"] == 0 and _dev(one[0], "host")["draft"] > 0
    assert _dev(one[1], "gpu0")["draft"] > 0 and one[1]["draft_gpu_layers"] == d.n_layer + 1
    # The main fills the big GPU alone (layers split in proportion to free memory); the small one is free.
    two = draft.predict_memory(main, d, s, gpu_host(200, 6))
    assert [(r["placement"], r["kind"]) for r in two] == [
        ("cpu", "CPU"), ("all GPUs", "split like the main"), ("gpu0", "same GPU"), ("gpu1", "other GPU")]
    other = _row(two, "gpu1")
    assert _dev(other, "gpu0")["draft"] == 0 and _dev(other, "gpu1")["main"] > 0  # the main's GPU overhead only
    assert _dev(other, "gpu1")["draft"] > 0 and other["fits"]
    assert _row(two, "all GPUs")["default"]
    # A draft too big for the small GPU is reported as not fitting there.
    small = draft.predict_memory(main, d, s, gpu_host(200, 1.5))
    assert not _row(small, "gpu1")["fits"] and _row(small, "gpu0")["fits"]


# -------------------------------------------------------------------------------------- greedy draft


@pytest.fixture(scope="module")
def tiny_draft(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.write_model(tmp_path_factory.mktemp("draft") / "draft.gguf", demo_model, synth.Shape(n_layer=1), seed=1)


# GreedyDraft runs a real Llama, so the scenarios run in a child process (a native crash must not kill pytest);
# each starts from a fresh draft whose eval calls are recorded, and the tests check what the child reports.
_GREEDY_SCENARIOS = """
import json
import numpy as np
from autotune.engine.greedy_draft import GreedyDraft
from autotune.settings import Settings

path = {path!r}
one = Settings(n_ctx=512, n_threads=1, n_threads_batch=1, n_batch=64, n_ubatch=64, draft_model=path, draft_max=4)

def fresh():
    g = GreedyDraft(path, one)
    g.evaluated = []
    real_eval = g.llm.eval
    g.llm.eval = lambda tokens: (g.evaluated.append(len(tokens)), real_eval(tokens))[1]
    return g

out = {{}}
g = fresh()
history = np.arange(1000, 1040, dtype=np.intc)
p1 = g(history)
out["counts"] = {{"p1": len(p1), "steps_after_p1": g.stats()["steps"]}}
other = (p1[2] + 1) % 49152  # the main kept two proposals, then sampled its own token
history = np.concatenate([history, p1[:2], [other]]).astype(np.intc)
p2 = g(history)
out["counts"]["after_p2"] = g.stats()
history = np.concatenate([history, p2, [7]]).astype(np.intc)  # all four kept plus the main's bonus token
g(history)
out["counts"]["final"] = g.stats()

g = fresh()
history = np.arange(1000, 1040, dtype=np.intc)
p = g(history)
cache = {{"first": list(g.evaluated)}}
g.evaluated.clear()
history = np.concatenate([history, p[:1], [3]]).astype(np.intc)
g(history)
cache["kept"] = list(g.evaluated)
cache["n_tokens"], cache["history"] = g.llm.n_tokens, len(history)
g.evaluated.clear()
history = np.concatenate([history, [5, 6, 7]]).astype(np.intc)  # a history that left the proposals
g(history)
cache["left"] = list(g.evaluated)
out["cache"] = cache

g = fresh()
g(np.arange(1000, 1040, dtype=np.intc))
g.reset()  # a new generation: the pending proposals are dropped, not counted
g(np.arange(2000, 2010, dtype=np.intc))
out["reset"] = {{"steps": g.stats()["steps"], "evaluated": g.evaluated[-4],
                "near_full": len(g(np.arange(0, 510, dtype=np.intc))),
                "unknown_id": len(g(np.array([5, 6, 60000], dtype=np.intc)))}}
print(json.dumps(out, default=int))
"""


@pytest.fixture(scope="module")
def greedy_runs(tiny_draft: Path) -> dict[str, Any]:
    return run_python(_GREEDY_SCENARIOS.format(path=str(tiny_draft)))


def test_greedy_draft_counts_what_the_main_kept(greedy_runs: dict[str, Any]) -> None:
    c = greedy_runs["counts"]
    assert c["p1"] == 4 and c["steps_after_p1"] == 0  # nothing resolved yet
    assert c["after_p2"] == {**c["after_p2"], "proposed": 4, "accepted": 2, "steps": 1, "acceptance": 0.5,
                             "accepted_per_step": 2.0}
    s = c["final"]
    assert (s["proposed"], s["accepted"], s["steps"]) == (8, 6, 2)


def test_greedy_draft_reuses_its_cache(greedy_runs: dict[str, Any]) -> None:
    c = greedy_runs["cache"]
    assert c["first"] == [40, 1, 1, 1]  # the prompt once, then each proposal but the last
    assert c["kept"] == [1, 1, 1, 1]  # only the main's new token: the kept proposal is cached
    assert c["n_tokens"] == c["history"] + 3
    assert c["left"] == [3, 1, 1, 1]


def test_greedy_draft_reset_and_limits(greedy_runs: dict[str, Any]) -> None:
    r = greedy_runs["reset"]
    assert r["steps"] == 0 and r["evaluated"] == 10
    assert r["near_full"] == 2  # room for 2 more in a 512-token context
    assert r["unknown_id"] == 0  # a token id the draft does not know


def test_runner_with_draft_keeps_greedy_output(tiny_model: Path, tiny_draft: Path) -> None:
    work = Workload(prompt_tokens=24, gen_tokens=12, reps=1, prompt_kind="code")
    alone = engine.measure(str(tiny_model), ONE_THREAD, work)
    with_draft = engine.measure(str(tiny_model), ONE_THREAD.replace(draft_model=str(tiny_draft), draft_max=3), work)
    assert alone.ok and with_draft.ok, (alone.error, with_draft.error)
    assert with_draft.output_tokens == alone.output_tokens and len(alone.output_tokens) == 12
    assert with_draft.draft["steps"] > 0 and with_draft.draft["draft_max"] == 3
    assert alone.draft == {}


def test_draft_run_longer_than_a_batch(tiny_model: Path, tiny_draft: Path) -> None:
    work = Workload(prompt_tokens=48, gen_tokens=8, reps=1, prompt_kind="code")
    s = ONE_THREAD.replace(n_batch=32, n_ubatch=32, draft_model=str(tiny_draft), draft_max=4)
    m = engine.measure(str(tiny_model), s, work)
    assert m.ok, m.error


# ------------------------------------------------------------------------ measurement (scripted runs)


class ScriptedRunner:
    """Stands in for engine.measure: decode speed per (draft_max, kind) from a table, fixed outputs."""

    def __init__(self, speeds: dict[tuple[int, str], list[float]], outputs: dict[int, list[int]] | None = None,
                 fail: int | None = None) -> None:
        self.speeds, self.outputs, self.fail = speeds, outputs or {}, fail
        self.calls: list[tuple[int, str]] = []

    def __call__(self, model: str, s: Settings, work: Workload, timeout: float = 0.0, index: int = 0) -> Measurement:
        key = (s.draft_max, work.prompt_kind)
        if s.draft_max == self.fail:
            return Measurement(s, False, "aborted (SIGABRT)")
        if key not in self.speeds:  # the engine self-check's run: the engine works
            return Measurement(s, True, decode_tps=[10.0, 10.1])
        nth = sum(1 for c in self.calls if c == key)
        self.calls.append(key)
        speed = self.speeds[key][nth % len(self.speeds[key])]
        stats = {"proposed": 8 * s.draft_max, "accepted": 6 * s.draft_max, "steps": 8, "draft_s": 0.1} if s.draft_model else {}
        return Measurement(s, True, decode_tps=[speed, speed + 0.1], draft=stats,
                           output_tokens=self.outputs.get(s.draft_max, [1, 2, 3, 4]))


@pytest.fixture()
def compatible(header_main: Path, header_small: Path) -> tuple[str, str]:
    return str(header_main), str(header_small)


def run_plan(monkeypatch: pytest.MonkeyPatch, script: ScriptedRunner, main: str, d: str, ns: tuple[int, ...] = (2, 4),
             rounds: int = 3) -> draft.DraftReport:
    monkeypatch.setattr(draft.engine, "measure", script)
    plan = draft.Plan(ns=ns, rounds=rounds)
    return draft.evaluate(main, [d], Settings(n_ctx=4096), cpu_host(), plan)


def test_clear_win_on_both_kinds_is_recommended(monkeypatch: pytest.MonkeyPatch, compatible: tuple[str, str]) -> None:
    speeds = {(0, "code"): [10, 10.5, 9.8], (0, "prose"): [10, 10.2, 9.9],
              (2, "code"): [12, 12.5, 12.2], (2, "prose"): [11, 11.3, 11.2],
              (4, "code"): [16, 15.5, 16.2], (4, "prose"): [10.1, 9.9, 10.3]}
    script = ScriptedRunner(speeds)
    report = run_plan(monkeypatch, script, *compatible)
    assert len(script.calls) == 3 * 2 * 3  # rounds x kinds x (baseline + 2 drafts)
    assert script.calls[:3] == [(0, "code"), (2, "code"), (4, "code")]
    assert script.calls[6:9] == [(2, "code"), (4, "code"), (0, "code")]  # rotated each round
    assert report.chosen is not None and report.chosen["draft_max"] == 2  # n=4 wins on code only
    assert report.verdict.startswith("Use draft.gguf n=2: decode code x1.")
    rec = report.recommended
    assert (rec.draft_model, rec.draft_max, rec.draft_gpu_layers) == (compatible[1], 2, 0)
    code = report.rows[1]["kinds"]["code"]
    assert code["clear_win"] and code["acceptance"] == 0.75 and code["accepted_per_step"] == 1.5
    decode_s = sum(3 / v for v in (12, 12.1, 12.5, 12.6, 12.2, 12.3))  # 4 tokens out: 3 decode intervals
    assert code["draft_share"] == pytest.approx(3 * 0.1 / decode_s)
    assert code["outputs_match"] is True
    json.dumps(report.to_dict())


def test_overlap_means_no_speculative_decoding(monkeypatch: pytest.MonkeyPatch, compatible: tuple[str, str]) -> None:
    speeds = {(0, "code"): [10, 11, 9], (0, "prose"): [10, 11, 9],
              (2, "code"): [16, 15, 17], (2, "prose"): [10.5, 9.5, 11.5]}
    report = run_plan(monkeypatch, ScriptedRunner(speeds), *compatible, ns=(2,))
    assert report.chosen is None
    assert report.verdict.startswith("No speculative decoding")
    assert "prose x1.05 (within the noise)" in report.verdict and "draft.gguf n=2 on code" in report.verdict
    rec = report.recommended
    assert rec.draft_model is None and rec.draft_max == 0


def test_too_few_samples_claim_nothing(monkeypatch: pytest.MonkeyPatch, compatible: tuple[str, str]) -> None:
    speeds = {(0, "code"): [10], (0, "prose"): [10], (2, "code"): [20], (2, "prose"): [20]}
    report = run_plan(monkeypatch, ScriptedRunner(speeds), *compatible, ns=(2,), rounds=1)  # 2 samples a side
    assert report.chosen is None and "Only 2 samples a side" in report.verdict


def test_output_mismatch_and_failures_are_reported(monkeypatch: pytest.MonkeyPatch, compatible: tuple[str, str]) -> None:
    speeds = {(0, "code"): [10], (0, "prose"): [10], (2, "code"): [20], (2, "prose"): [20]}
    script = ScriptedRunner(speeds, outputs={2: [1, 2, 9, 4]}, fail=4)
    report = run_plan(monkeypatch, script, *compatible, rounds=2)
    by = {r["label"]: r for r in report.rows}
    e = by["draft.gguf n=2"]["kinds"]["code"]
    assert e["outputs_match"] is False and e["mismatch"] == "2 of 2 runs differ from the main alone, first at token 2"
    assert report.chosen is not None and "greedy output differs" in report.verdict
    assert by["draft.gguf n=4"]["failures"][0] == "code: aborted (SIGABRT)"
    assert by["draft.gguf n=4"]["kinds"]["code"]["speedup"] is None


def test_no_compatible_candidate(monkeypatch: pytest.MonkeyPatch, header_main: Path, smol_fields: dict[str, Any],
                                 tmp_path: Path) -> None:
    d = header_draft(tmp_path, smol_fields, {"tokenizer.ggml.model": lambda v: "llama"})
    monkeypatch.setattr(draft.engine, "measure", lambda *a, **k: pytest.fail("nothing should run"))
    report = draft.evaluate(str(header_main), [str(d)], Settings(), cpu_host())
    assert report.chosen is None and report.verdict.startswith("No compatible draft")


def test_gpu_arms_only_where_a_gpu_exists(header_main: Path, header_small: Path) -> None:
    main = read_facts(header_main)
    s = Settings(n_ctx=4096, n_gpu_layers=main.n_layer + 1)
    c = draft.check_candidate(main, str(header_small), s, gpu_host(40))
    arms = draft.arms_for(s, [c], (2, 4), gpu_host(40))
    assert [(a.settings.draft_max, a.settings.draft_gpu_layers) for a in arms] == [(0, 0), (2, 17), (4, 17), (2, 0), (4, 0)]
    cpu = draft.check_candidate(main, c.path, s, cpu_host())
    assert [a.settings.draft_gpu_layers for a in draft.arms_for(s, [cpu], (2,), cpu_host())] == [0, 0]


# ---------------------------------------------------------------------------------------- CLI, search


def test_cli_check_only(capsys: pytest.CaptureFixture[str], header_main: Path, header_small: Path,
                        smol_fields: dict[str, Any], tmp_path: Path) -> None:
    header_draft(tmp_path, smol_fields, {"tokenizer.ggml.add_bos_token": lambda v: True})
    code = cli.main(["draft", str(header_main), "--candidates", str(header_small.parent), str(tmp_path),
                     "--no-measure", "--json", "--ctx", "2048"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    verdicts = {Path(c["path"]).parent.name + "/" + Path(c["path"]).name: (c["compatible"], c["reasons"])
                for c in out["candidates"]}
    assert verdicts[f"{header_small.parent.name}/draft.gguf"] == (True, [])
    assert verdicts[f"{tmp_path.name}/draft.gguf"] == (False, ["add-BOS flag differs: main False, draft True"])
    assert out["settings"]["n_ctx"] == 2048 and out["results"] == []


def test_cli_measured_table(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                            compatible: tuple[str, str]) -> None:
    speeds = {(0, "code"): [10, 10.2], (2, "code"): [13, 13.1]}
    monkeypatch.setattr(draft.engine, "measure", ScriptedRunner(speeds))
    monkeypatch.setattr(cli.console, "width", 200)
    code = cli.main(["draft", compatible[0], "--candidates", compatible[1], "--n", "2", "--kinds", "code",
                     "--rounds", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "x1.29 clear" in out and "75%" in out and "Use draft.gguf n=2" in out


def test_cli_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, header_main: Path) -> None:
    assert cli.main(["draft", str(tmp_path / "nope.gguf"), "--candidates", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    assert cli.main(["draft", str(header_main), "--candidates", str(tmp_path / "missing")]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["search", "--draft", str(tmp_path / "nope.gguf")])
    assert "no such file" in capsys.readouterr().err


def test_search_stage_puts_the_draft_into_config_and_exports(monkeypatch: pytest.MonkeyPatch,
                                                              compatible: tuple[str, str]) -> None:
    main, d = compatible
    speeds = {(n, k): [10 + n, 10.1 + n] for n in (0, 2, 4, 8, 16) for k in ("code", "prose")}
    monkeypatch.setattr(draft.engine, "measure", ScriptedRunner(speeds))
    config = export.build_config(Settings(n_ctx=4096, n_threads=2), model={"path": main}, hardware={})
    new, report = draft.search_stage(config, d, cpu_host(), draft.Plan(rounds=2))
    assert report is not None and new["settings"]["draft_model"] == d and new["settings"]["draft_max"] == 16
    assert new["draft"]["recommendation"]["use_draft"] and config["settings"]["draft_model"] is None
    assert f"-md {d} --spec-type draft-simple --spec-draft-n-max 16" in export.render(new, "llama-server")
    # Nothing pays: the settings stay without a draft, the report says why.
    flat = {(n, k): [10, 10.1] for n in (0, 2, 4, 8, 16) for k in ("code", "prose")}
    monkeypatch.setattr(draft.engine, "measure", ScriptedRunner(flat))
    new, _ = draft.search_stage(config, d, cpu_host(), draft.Plan(rounds=2))
    assert new["settings"]["draft_model"] is None and not new["draft"]["recommendation"]["use_draft"]


def test_search_stage_auto_looks_next_to_the_model(monkeypatch: pytest.MonkeyPatch, header_main: Path,
                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "cache"))
    config = export.build_config(Settings(), model={"path": str(header_main)}, hardware={})
    new, report = draft.search_stage(config, "auto", cpu_host(), draft.Plan(rounds=1))
    assert report is None and new["draft"]["recommendation"]["verdict"].startswith("No draft")


# ------------------------------------------------------------------------------ integration (real pair)

integration = pytest.mark.skipif(os.environ.get("AUTOTUNE_INTEGRATION") != "1",
                                 reason="real Qwen models: set AUTOTUNE_INTEGRATION=1")


@pytest.mark.integration
@integration
def test_real_qwen_pair_and_smollm2(demo_model: Path) -> None:
    main = str(catalog.fetch("qwen2.5-coder-1.5b"))
    small = str(catalog.fetch("qwen2.5-coder-0.5b"))
    hw = Hardware(cpu_model="test", physical_cores=2, logical_cores=2, ram_total=16 * GIB, ram_available=12 * GIB)
    settings = Settings(n_ctx=1024, n_threads=1, n_threads_batch=1)  # steady on a busy small machine
    # where the engine crashes (AMX Xeons), the self-check's switch, as `autotune draft` applies it
    settings = settings.replace(**health.check(main, settings, probe(measure_bandwidth=False)).pins)
    plan = draft.Plan(ns=(4,), kinds=("code",), rounds=2, prompt_tokens=48, gen_tokens=24, reps=1)
    report = draft.evaluate(main, [small, str(demo_model)], settings, hw, plan)
    verdicts = {Path(c.path).name: c for c in report.candidates}
    assert verdicts[Path(small).name].compatible
    smol = verdicts[Path(demo_model).name]
    assert not smol.compatible and smol.reasons[0].startswith("vocab sizes differ by 102,784")
    entry = report.rows[1]["kinds"]["code"]
    assert entry["outputs_match"] is True, entry["mismatch"]
    assert entry["acceptance"] is not None and entry["acceptance"] > 0.3


def test_draft_measures_with_fake_amx_crash(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            tiny_model: Path, tiny_draft: Path) -> None:
    """Every multi-token batch with extra buffers on crashes (injected): the self-check pins them off for the
    main and the draft alike, and the arms are measured instead of all crashing."""
    monkeypatch.setenv("AUTOTUNE_FAKE_AMX_CRASH", "1")
    code = cli.main(["draft", str(tiny_model), "--candidates", str(tiny_draft), "--n", "2", "--kinds", "code",
                     "--rounds", "1", "--reps", "2", "--prompt-tokens", "24", "--gen-tokens", "8",
                     "--set", "n_threads=1", "--set", "n_threads_batch=1", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "use_extra_bufts=False" in " ".join(captured.err.split())
    report = json.loads(captured.out)
    assert report["settings"]["use_extra_bufts"] is False
    assert [r["failures"] for r in report["results"]] == [[], []]
    assert all(e["decode"]["n"] == 2 for r in report["results"] for e in r["kinds"].values())
