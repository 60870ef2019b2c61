"""Draft models: compatibility from metadata, memory of main + draft, which speculation kinds apply to a model
(before anything runs), and the CLI. Measuring speculation is ``test_speculation``'s."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from gguf import GGUFValueType, GGUFWriter

from autotune import cli, memory
from autotune.facts import synth
from autotune.facts.gguf_model import FastReader, ModelFacts, read_facts
from autotune.facts.probe import GPU, Hardware
from autotune.output import printers
from autotune.stages import draft, speculation
from autotune.vocabulary.settings import Settings

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


def _row(rows: list[draft.DraftPlacement], placement: str) -> draft.DraftPlacement:
    return next(r for r in rows if r.placement == placement)


def _dev(row: draft.DraftPlacement, name: str) -> draft.DeviceShare:
    return next(d for d in row.devices if d.device == name)


def test_memory_on_cpu_adds_the_draft(header_main: Path, header_small: Path) -> None:
    from autotune import memory

    main, d = read_facts(header_main), read_facts(header_small)
    s = Settings(n_ctx=4096)
    rows = draft.predict_memory(main, d, s, cpu_host())
    assert [r.placement for r in rows] == ["cpu"]
    host = _dev(rows[0], "host")
    main_host = memory.estimate(main, s, cpu_host()).device("host").total
    draft_est = memory.estimate(d, s, cpu_host())
    assert host.main == main_host
    assert host.draft == draft_est.device("host").total - memory.HOST_OVERHEAD  # one process
    assert host.total == host.main + host.draft
    assert rows[0].draft_kv == draft_est.kv_k + draft_est.kv_v and rows[0].draft_n_ctx == 4096
    assert rows[0].fits
    tight = draft.predict_memory(main, d, s, cpu_host(ram_gib=host.total / GIB))
    assert not tight[0].fits and tight[0].shortfall > 0


def test_memory_placements_on_gpus(header_main: Path, header_small: Path) -> None:
    main, d = read_facts(header_main), read_facts(header_small)
    s = Settings(n_ctx=4096, n_gpu_layers=main.n_layer + 1)
    one = draft.predict_memory(main, d, s, gpu_host(23))
    assert [(r.placement, r.kind, r.default) for r in one] == [("cpu", "CPU", False), ("gpu0", "same GPU", True)]
    assert _dev(one[0], "gpu0").draft == 0 and _dev(one[0], "host").draft > 0
    assert _dev(one[1], "gpu0").draft > 0 and one[1].draft_gpu_layers == d.n_layer + 1
    # The main fills the big GPU alone (layers split in proportion to free memory); the small one is free.
    two = draft.predict_memory(main, d, s, gpu_host(200, 6))
    assert [(r.placement, r.kind) for r in two] == [
        ("cpu", "CPU"), ("all GPUs", "split like the main"), ("gpu0", "same GPU"), ("gpu1", "other GPU")]
    other = _row(two, "gpu1")
    assert _dev(other, "gpu0").draft == 0 and _dev(other, "gpu1").main > 0  # the main's GPU overhead only
    assert _dev(other, "gpu1").draft > 0 and other.fits
    assert _row(two, "all GPUs").default
    # A draft too big for the small GPU is reported as not fitting there.
    small = draft.predict_memory(main, d, s, gpu_host(200, 1.5))
    assert not _row(small, "gpu1").fits and _row(small, "gpu0").fits


# ------------------------------------------------------------------------- which speculation kinds apply


def test_kinds_for_a_model_with_a_compatible_and_a_refused_draft(header_main: Path, header_small: Path,
                                                                  smol_fields: dict[str, Any], tmp_path: Path) -> None:
    refused = header_draft(tmp_path, smol_fields, {"tokenizer.ggml.model": lambda v: "llama"})
    main = read_facts(header_main)
    arms, skipped = speculation.arms(main, Settings(n_ctx=4096), cpu_host(), [str(header_small), str(refused)])
    assert [a.label for a in arms] == ["none", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod",
                                       "ngram-cache", "draft-simple (draft.gguf)"]
    assert arms[-1].draft == str(header_small) and arms[-1].draft_gpu_layers == 0
    why = dict(skipped)
    assert why["draft-mtp"] == "the model has no multi-token-prediction layers"
    assert why["draft-simple (draft.gguf)"] == "vocab type differs: main gpt2, draft llama"
    assert why["draft-eagle3"] == "no eagle3 drafter among the candidates"
    assert speculation.arms(main, Settings(), cpu_host(), [], ngram=False)[0] == [speculation.NONE]


def test_a_draft_that_does_not_fit_beside_the_main_is_left_out_fake_small_ram(header_main: Path,
                                                                               header_small: Path) -> None:
    main, small = read_facts(header_main), read_facts(header_small)
    s = Settings(n_ctx=4096)
    need = draft.predict_memory(main, small, s, cpu_host())[0].total
    arms, skipped = speculation.arms(main, s, cpu_host(ram_gib=need / GIB * 0.97), [str(header_small)])
    assert [a.kind for a in arms][-1] == "ngram-cache"
    assert dict(skipped)["draft-simple (draft.gguf)"] == "main and draft together do not fit in memory"


def test_mtp_layers_are_read_from_the_tensor_table_and_priced(header_main: Path) -> None:
    main = read_facts(header_main)
    last = main.n_layer - 1
    mtp = dataclasses.replace(main, tensors=(*main.tensors, dataclasses.replace(
        main.tensors[-1], name=f"blk.{last}.nextn.eh_proj.weight", layer=last)))
    assert speculation.has_mtp(mtp) and not speculation.has_mtp(main)
    arms, _ = speculation.arms(mtp, Settings(n_ctx=4096), cpu_host(), [])
    assert arms[-1] == speculation.Arm("draft-mtp")
    assert arms[-1].settings(Settings()).draft_max == 3  # llama.cpp's default draft length
    need = memory.estimate(mtp, Settings(n_ctx=4096), cpu_host()).device("host").total
    _, skipped = speculation.arms(mtp, Settings(n_ctx=4096), cpu_host(ram_gib=need / GIB * 1.001), [])
    assert dict(skipped)["draft-mtp"].startswith("its second context does not fit")


def test_draft_on_the_gpu_where_main_and_draft_fit_there_fake_gpu(header_main: Path, header_small: Path) -> None:
    main = read_facts(header_main)
    s = Settings(n_ctx=4096, n_gpu_layers=main.n_layer + 1)
    arms, _ = speculation.arms(main, s, gpu_host(40), [str(header_small)])
    assert arms[-1].draft_gpu_layers == read_facts(header_small).n_layer + 1
    assert arms[-1].settings(s).spec_type == "draft-simple"


# ---------------------------------------------------------------------------------------- CLI, search


def test_cli_check_only(capsys: pytest.CaptureFixture[str], header_main: Path, header_small: Path,
                        smol_fields: dict[str, Any], tmp_path: Path) -> None:
    header_draft(tmp_path, smol_fields, {"tokenizer.ggml.add_bos_token": lambda v: True})
    code = cli.main(["draft", str(header_main), "--candidates", str(header_small.parent), str(tmp_path),
                     "--json", "--ctx", "2048"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    verdicts = {Path(c["path"]).parent.name + "/" + Path(c["path"]).name: (c["compatible"], c["reasons"])
                for c in out["candidates"]}
    assert verdicts[f"{header_small.parent.name}/draft.gguf"] == (True, [])
    assert verdicts[f"{tmp_path.name}/draft.gguf"] == (False, ["add-BOS flag differs: main False, draft True"])
    assert out["settings"]["n_ctx"] == 2048


def test_the_draft_report_json_keeps_its_keys_and_the_table_prints_it(
        capsys: pytest.CaptureFixture[str], header_main: Path, header_small: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a model")
    report = draft.check(str(header_main), [str(header_small), str(tmp_path / "junk.gguf")], Settings(n_ctx=2048),
                         cpu_host())
    good, junk = report.to_json()["candidates"]
    assert list(report.to_json()) == ["main", "settings", "candidates"]
    assert list(good) == ["path", "name", "architecture", "n_params", "file_size", "compatible", "reasons",
                          "warnings", "memory"]
    (row,) = good["memory"]["placements"]
    assert list(row) == ["placement", "kind", "default", "draft_gpu_layers", "draft_n_ctx", "draft_kv",
                         "draft_weights", "draft_compute", "devices", "total", "fits", "shortfall"]
    assert row == report.candidates[0].placements[0].to_json() and row["draft_n_ctx"] == 2048
    assert list(row["devices"][0]) == ["device", "main", "draft", "total", "budget", "room", "fits"]
    assert junk["memory"] == {} and junk["n_params"] is None and not junk["compatible"]
    priced_badly = dataclasses.replace(report.candidates[0], placements=(), memory_error="no tensor table")
    assert priced_badly.to_json()["memory"] == {"error": "no tensor table"}
    assert json.loads(json.dumps(report.to_json())) == report.to_json()
    printers.draft_report(dataclasses.replace(report, candidates=[*report.candidates, priced_badly]))
    out = capsys.readouterr().out
    assert "junk.gguf" in out and "memory in MiB: main + draft.gguf" in out and "no tensor table" in out


def test_cli_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, header_main: Path) -> None:
    assert cli.main(["draft", str(tmp_path / "nope.gguf"), "--candidates", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    assert cli.main(["draft", str(header_main), "--candidates", str(tmp_path / "missing")]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["search", "--spec", str(tmp_path / "nope.gguf")])
    assert "no such file" in capsys.readouterr().err
