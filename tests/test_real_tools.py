"""Exports proven by the real tools: llama.cpp's own llama-server and llama-bench, built from the source the
installed llama-cpp-python vendors (``autotune.engine.reference``; the first build takes minutes, then it is cached),
run with exactly the lines ``autotune export`` writes. Each server must come up, answer a completion, and
show in its log and /props that it runs the settings we meant."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import servers

from autotune.engine import external, reference
from autotune.facts import synth
from autotune.output import export
from autotune.search.config import TunedRecord
from autotune.vocabulary import flags
from autotune.vocabulary.settings import Settings

# Extra buffers off: the engine's AMX kernel crashes on some Xeons, and these must pass on every machine.
TUNED = Settings(n_ctx=512, n_threads=2, n_threads_batch=2, n_batch=256, n_ubatch=128, flash_attn=True,
                 type_k="q8_0", type_v="q8_0", swa_full=False, use_mmap=False, use_mlock=True, use_extra_bufts=False)
PLAIN = Settings(n_ctx=1024, n_threads=1, n_threads_batch=2, use_extra_bufts=False)


@pytest.fixture(scope="module")
def tools(reference_tool) -> dict[str, Path]:
    return {name: reference_tool(name) for name in reference.TOOLS}


@pytest.fixture(scope="module")
def draft(demo_model, tmp_path_factory) -> Path:
    """A one-layer random draft with the demo model's whole vocabulary: a draft llama-server accepts."""
    return synth.write_model(tmp_path_factory.mktemp("draft") / "draft.gguf", demo_model, synth.Shape(n_layer=1))


def command(settings: Settings, model: Path, fmt: str) -> list[str]:
    config = TunedRecord(settings, {"path": str(model)}, {})
    text = export.render(config, fmt)
    assert text.startswith(f"# written for {fmt} of llama.cpp")
    return shlex.split(text.splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve(binary: Path, argv: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """Start the server on a free port, logging in detail (-lv 4), stopped with the run however it ends
    (``servers.start``); return it once /health answers."""
    port = free_port()
    with open(log, "w") as out:
        proc = servers.start([str(binary), *argv[1:], "--host", "127.0.0.1", "--port", str(port), "-lv", "4"],
                             stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if external.wait_healthy(proc, url, time.perf_counter() + 120):
        return proc, url
    servers.stop(proc)
    pytest.fail(f"llama-server did not come up in 120 s (exit {proc.poll()}): {log.read_text()[-1500:]}")


@pytest.mark.parametrize("name", ["tuned", "plain", "draft"])
@pytest.mark.engine
def test_exported_llama_server_line_runs_what_we_meant(tools, demo_model, draft, tmp_path, name):
    s = {"tuned": TUNED, "plain": PLAIN,
         "draft": PLAIN.replace(spec_type="draft-simple", draft_model=str(draft), draft_max=4)}[name]
    argv = command(s, demo_model, "llama-server")
    log = tmp_path / "server.log"
    proc, url = serve(tools["llama-server"], argv, log)
    try:
        done = get(url + "/completion", {"prompt": "def fibonacci(n):", "n_predict": 8, "temperature": 0})
        props = get(url + "/props")
    finally:
        servers.stop(proc, grace=30)
    text = log.read_text()
    assert done["tokens_predicted"] >= 1 and done["timings"]["predicted_per_second"] > 0
    assert props["default_generation_settings"]["n_ctx"] == s.n_ctx
    assert f"n_threads = {s.n_threads} (n_threads_batch = {s.n_threads_batch})" in text
    assert f"n_batch               = {s.n_batch}" in text and f"n_ubatch              = {s.n_ubatch}" in text
    assert f"flash_attn            = {'enabled' if s.flash_attn else 'disabled'}" in text
    assert f"K ({s.type_k})" in text and f"V ({s.type_v})" in text
    assert ("CPU_Mapped model buffer" in text) is s.use_mmap
    assert "AMX model buffer" not in text and "CPU_REPACK model buffer" not in text  # --no-repack reached it
    if name == "draft":
        assert done["timings"].get("draft_n", 0) > 0  # it drafted: --spec-type reached it, not only -md
    else:
        assert "draft_n" not in done["timings"]


@pytest.mark.engine
def test_exported_llama_bench_line_measures_what_we_meant(tools, demo_model):
    argv = command(TUNED, demo_model, "llama-bench")
    argv[argv.index("-p") + 1], argv[argv.index("-n") + 1], argv[argv.index("-r") + 1] = "32", "8", "1"
    done = subprocess.run([str(tools["llama-bench"]), *argv[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    rows = json.loads(done.stdout)
    assert {(r["n_prompt"], r["n_gen"]) for r in rows} == {(32, 0), (0, 8)}
    for r in rows:
        assert (r["n_threads"], r["n_batch"], r["n_ubatch"], r["type_k"], r["type_v"]) == (2, 256, 128, "q8_0", "q8_0")
        assert r["flash_attn"] in (1, True, "on") and r["avg_ts"] > 0


@pytest.mark.parametrize("kind", reference.TOOLS)
@pytest.mark.engine
def test_search_through_the_users_own_binary(tools, demo_model, tmp_path, kind):
    """The study's trials, the self-check and the re-measurement run through llama-bench or llama-server
    itself, on the demo model; the memory gate and the exports stay the same (where the AMX kernel crashes,
    the self-check finds it in the binary too and the export carries --no-repack)."""
    out = tmp_path / "tuned.json"
    done = subprocess.run(
        [sys.executable, "-m", "autotune.cli", "search", str(demo_model), "--engine", f"{kind}:{tools[kind]}",
         "--trials", "3", "--ctx", "256", "--prompt-tokens", "32", "--gen-tokens", "8", "--top-k", "1",
         "--rounds", "2", "--kv-quality", "off", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
        timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads(out.read_text())
    assert config["engine"]["name"].startswith(kind) and config["engine"]["version"].startswith("0.5.0")
    assert f"-{kind}" in config["study"]["name"]  # a study per engine
    assert config["metrics"]["decode"]["n"] >= 2 and config["metrics"]["decode"]["median"] > 0
    exported = subprocess.run([sys.executable, "-m", "autotune.cli", "export", str(out), "--format", "llama-server"],
                              capture_output=True, text=True, timeout=120)
    line = exported.stdout.splitlines()[-1]
    assert exported.returncode == 0 and line.startswith("llama-server -m ")
    assert ("--no-repack" in line.split()) is (config["settings"]["use_extra_bufts"] is False)


def test_a_bad_engine_is_one_line(tiny_model, tmp_path):
    done = subprocess.run([sys.executable, "-m", "autotune.cli", "search", str(tiny_model), "--engine",
                           "llama-bench:/no/such/binary"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not an executable file" in done.stderr


@pytest.mark.engine
def test_exports_name_the_version_of_the_tools_they_were_checked_against(tools):
    """The version the export spellings state is the one these binaries report, not a hope."""
    for path in tools.values():
        done = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
        version = (done.stdout + done.stderr).split("version: ")[1].split()[0]
        assert flags.LLAMA_CPP == f"llama.cpp {version}, as vendored by llama-cpp-python {reference.engine_version()}"
