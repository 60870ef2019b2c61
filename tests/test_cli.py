"""The CLI on bad input: one clear line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from autotune.facts import synth


def cli(*args: str, cwd: Path | None = None, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line_error(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("autotune: error: ") and fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_model) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    good = tiny_model.read_bytes()
    files = {
        "missing": d / "missing.gguf",
        "directory": d,
        "empty": d / "empty.gguf",
        "text": d / "notes.txt",
        "magic": d / "magic.gguf",
        "header": d / "header.gguf",
        "tensors": d / "tensors.gguf",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("just some text\n")
    files["magic"].write_bytes(b"GGJT" + good[4:])
    files["header"].write_bytes(good[:300])
    files["tensors"].write_bytes(good[: len(good) // 2])
    return files


@pytest.mark.parametrize(
    "which, fragment",
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("empty", "empty file"),
        ("text", "not a GGUF file"),
        ("magic", "not a GGUF file"),
        ("header", "damaged or truncated"),
        ("tensors", "truncated"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "search", "memory"])
def test_bad_model_files(bad_files, command, which, fragment):
    assert_one_line_error(cli(command, str(bad_files[which])), fragment)


def test_debug_shows_the_traceback(bad_files):
    done = cli("--debug", "inspect", str(bad_files["empty"]))
    assert done.returncode != 0 and "Traceback" in done.stderr


@pytest.mark.engine
def test_architecture_the_engine_cannot_load(tmp_path):
    w = GGUFWriter(tmp_path / "frob.gguf", "frobnicator")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_context_length(512)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(8)])
    w.add_tensor("token_embd.weight", np.zeros((8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert cli("inspect", str(tmp_path / "frob.gguf")).returncode == 0  # the file itself is fine
    done = cli("search", str(tmp_path / "frob.gguf"), "--storage", f"sqlite:///{tmp_path / 's.db'}")
    assert_one_line_error(done, "the engine refuses this model")
    assert "frobnicator" in done.stderr


def test_model_that_cannot_fit(tmp_path, demo_model):
    big = synth.write_model(tmp_path / "70b.gguf", demo_model, synth.SHAPES["70b"], weight_type="Q4_K",
                            header_only=True)
    done = cli("search", str(big), "--ctx", "32768", "--storage", f"sqlite:///{tmp_path / 's.db'}")
    assert_one_line_error(done, "cannot fit this machine")
    assert "MiB short" in done.stderr


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--set", "n_ubatch=1024", "--set", "n_batch=512"], "n_ubatch (1024) > n_batch (512)"),
        (["--set", "type_v=q8_0", "--set", "flash_attn=off"], "needs flash attention"),
        (["--set", "n_gpu_layers=10"], "cannot offload"),
        (["--set", "n_threads=many"], "expects int"),
        (["--set", "turbo=1"], "unknown setting"),
        (["--ctx", "64"], "smaller than the measured prompt"),
        (["--ctx", "512", "--depth", "256"], "leaves no room in --ctx 512"),
    ],
)
def test_contradictory_search_flags(tiny_model, tmp_path, flags, fragment):
    done = cli("search", str(tiny_model), "--storage", f"sqlite:///{tmp_path / 's.db'}", *flags)
    assert_one_line_error(done, fragment)


@pytest.mark.engine
def test_unwritable_studies_directory(tiny_model, tmp_path):
    (tmp_path / "studies").write_text("a file where the directory should be")
    assert_one_line_error(cli("search", str(tiny_model), cwd=tmp_path), "cannot write study databases")


@pytest.mark.engine
def test_corrupt_and_foreign_study_databases(tiny_model, tmp_path):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"SQLite format 3\x00" + b"\x13" * 500)
    assert_one_line_error(cli("search", str(tiny_model), "--storage", f"sqlite:///{corrupt}"), "not a usable")
    foreign = tmp_path / "notes.db"
    import sqlite3

    with sqlite3.connect(foreign) as con:
        con.execute("create table notes (body text)")
    assert_one_line_error(cli("search", str(tiny_model), "--storage", f"sqlite:///{foreign}"), "something else")


@pytest.mark.parametrize(
    "text, fragment",
    [("{oops", "not valid JSON"), (json.dumps({"schema": 7, "settings": {}}), "newer than this autotune")],
)
def test_bad_exported_configs(tmp_path, text, fragment):
    p = tmp_path / "tuned.json"
    p.write_text(text)
    assert_one_line_error(cli("export", str(p), "--format", "llama-server"), fragment)


@pytest.mark.engine
def test_depth_point_to_json_is_the_records_depth_sweep_row():
    """Saved tuned records carry these rows as ``depth_sweep``: the keys, in this order, stay."""
    from autotune.search.pipeline import DepthPoint

    ok = DepthPoint(64, True, "", 50.0, 400.0, 0.25, [49.0, 51.0], [400.0])
    assert ok.to_json() == {"depth": 64, "ok": True, "error": "", "decode": 50.0, "prefill": 400.0, "ttft": 0.25,
                            "decode_tps": [49.0, 51.0], "prefill_tps": [400.0]}
    assert list(ok.to_json()) == ["depth", "ok", "error", "decode", "prefill", "ttft", "decode_tps", "prefill_tps"]
    failed = DepthPoint(8192, False, "out of memory", None, None, None, [], []).to_json()
    assert failed["decode"] is None and failed["error"] == "out of memory"


def test_search_recommends_and_exports_end_to_end(tiny_model, tmp_path):
    """The main command on a tiny model: trials, re-measurement, a tuned config, and every export format."""
    out = tmp_path / "tuned.json"
    done = cli("search", str(tiny_model), "--trials", "4", "--ctx", "256", "--prompt-tokens", "32", "--gen-tokens",
               "8", "--top-k", "1", "--rounds", "2", "--depth", "64", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "recommended" in done.stdout and "KV cache quantization vs f16" in done.stdout
    assert "against context depth" in done.stdout
    assert "search space" in done.stdout and "physical cores" in done.stdout
    assert "engine self-check: a multi-token batch and decode steps run" in done.stdout  # nothing pinned
    assert "pinned by the engine self-check" not in done.stdout
    config = json.loads(out.read_text())
    assert config["schema"] == 1 and config["model"]["sha256"] and config["metrics"]["decode"]["n"] >= 4
    assert config["recommendation"]["verdict"]
    # the bandwidth is measured only for what reads it: the recommendation's roofline
    assert config["hardware"]["bandwidth_gbs"] > 0 and config["recommendation"]["roofline"]["limit_tps"] > 0
    assert [r["depth"] for r in config["depth_sweep"]] == [0, 64] and all(r["ok"] for r in config["depth_sweep"])
    assert config["study"]["name"].endswith("p32g8d64")  # a study per measured depth
    assert (tmp_path / "studies" / "autotune.db").exists()  # the default storage, relative to the cwd
    name = config["study"]["name"]
    for fmt in ("llama-server", "llama-bench", "python", "lmstudio", "ollama", "koboldcpp"):
        exported = cli("export", name, "--format", fmt, cwd=tmp_path)
        assert exported.returncode == 0 and exported.stdout.strip(), exported.stderr
    again = cli("export", str(out), "--format", "llama-server")
    assert again.stdout.splitlines()[-1].startswith("llama-server -m ") and "-c 256" in again.stdout
    missing = cli("export", "no-such-study", cwd=tmp_path)
    assert_one_line_error(missing, "no study named 'no-such-study'")


@pytest.mark.parametrize(
    "flags, fragment",
    [(["-ub", "1024", "-b", "512"], "n_ubatch (1024) > n_batch (512)"),
     (["--type-v", "q8_0", "--fa", "off"], "needs flash attention")],
)
def test_contradictory_memory_flags(tiny_model, flags, fragment):
    assert_one_line_error(cli("memory", str(tiny_model), *flags), fragment)


FAKE_AMX = {"AUTOTUNE_FAKE_AMX_CRASH": "1"}


@pytest.mark.engine
def test_search_with_fake_amx_crash_pins_the_switch_end_to_end(tiny_model, tmp_path):
    """The Xeon whose engine crashes on every multi-token batch with extra buffers on, injected: the search
    still completes, with the switch pinned, the crashing defaults reported, and --no-repack exported."""
    out = tmp_path / "tuned.json"
    done = cli("search", str(tiny_model), "--trials", "4", "--ctx", "256", "--prompt-tokens", "32", "--gen-tokens",
               "8", "--top-k", "1", "--rounds", "2", "--out", str(out), cwd=tmp_path, env=FAKE_AMX)
    assert done.returncode == 0, done.stderr
    flat = " ".join(done.stdout.split())
    assert "engine self-check: the engine crashed with SIGSEGV" in flat and "during a batch of" in flat
    assert "use_extra_bufts │ False (pinned by the engine self-check)" in flat
    config = json.loads(out.read_text())
    rec = config["recommendation"]
    assert config["settings"]["use_extra_bufts"] is False
    assert config["engine_health"]["pins"] == {"use_extra_bufts": False}
    assert rec["baselines"]["defaults"]["ran"] is False and "SIGSEGV" in rec["baselines"]["defaults"]["failures"][0]
    assert rec["baselines"]["defaults with use_extra_bufts=False"]["ran"] is True
    assert rec["baseline"].endswith(" with use_extra_bufts=False") and rec["baseline_metrics"]["decode"]["n"] >= 4
    assert {v["baseline"] for v in rec["versus"].values()} <= {k for k, b in rec["baselines"].items() if b["ran"]}
    assert "The engine defaults crash on this machine" in rec["verdict"]
    assert config["kv_quality"] and not any("error" in r for r in config["kv_quality"].values())  # a reference ran
    assert "--no-repack" in cli("export", str(out), "--format", "llama-server").stdout.split()


@pytest.mark.engine
def test_search_refuses_in_one_line_when_no_switch_helps_fake_amx_crash(tiny_model, tmp_path):
    done = cli("search", str(tiny_model), "--ctx", "256", "--prompt-tokens", "32", "--set", "use_extra_bufts=on",
               cwd=tmp_path, env=FAKE_AMX)
    assert_one_line_error(done, "no runtime switch avoids it")
    assert "crashed with SIGSEGV" in done.stderr


def test_default_depth_is_an_eighth_of_the_context_in_whole_blocks():
    from autotune.engine import Workload
    from autotune.search.pipeline import default_depth, depths_to_report

    w = Workload(prompt_tokens=256, gen_tokens=32)
    assert [default_depth(n, w) for n in (512, 1024, 2048, 4096, 32768)] == [0, 0, 256, 512, 4096]
    assert depths_to_report(4096, 512, w) == [0, 512, 3584]


@pytest.mark.engine
def test_search_starts_from_the_users_command_line(tiny_model, tmp_path):
    """The model, the context and the settings come from the llama-server line; the line is measured as a
    baseline beside the engine defaults, and what autotune does not tune is reported, not refused."""
    out = tmp_path / "tuned.json"
    line = f"llama-server -m {tiny_model} -c 256 -t 1 -tb 1 -b 64 -ub 64 --port 8080 --jinja"
    done = cli("search", "--from-cmdline", line, "--trials", "3", "--prompt-tokens", "32", "--gen-tokens", "8",
               "--top-k", "1", "--rounds", "2", "--kv-quality", "off", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kept as you had them (not tuned): --port 8080 --jinja" in " ".join(done.stdout.split())
    config = json.loads(out.read_text())
    assert config["settings"]["n_ctx"] == 256 and config["model"]["path"] == str(tiny_model)
    ours = config["recommendation"]["baselines"]["your command line"]
    assert ours["ran"] is True
