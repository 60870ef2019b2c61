"""The engine child loads the engine's library before any C++ runtime: on a build whose compiler's libstdc++ is
not the system's, the other order crashes every model load (README, Troubleshooting, the CUDA case). The order is read
off the dynamic linker's list of loaded objects, so these tests mean the same on any machine; the crash itself
is injected at one seam where this machine cannot produce it (``fake_toolchain_mismatch``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from autotune import cli, engine
from autotune.engine import Workload, diagnose, libs, process
from autotune.vocabulary.settings import Settings


@pytest.mark.engine
def test_the_engine_child_loads_libllama_before_libstdcxx_and_numpy():
    done = process.spawn({"mode": "libraries"}, timeout=120)
    assert done.result is not None, done.failure()
    loaded = done.result["libraries"]
    llama = libs.position(loaded, "libllama")
    assert llama is not None
    assert not libs.runtime_first(loaded)
    assert all(llama < i for i in (libs.position(loaded, "libstdc++"), libs.position(loaded, "_multiarray_umath"))
               if i is not None)


@pytest.mark.engine
def test_importing_autotune_engine_first_would_load_the_runtime_first():
    """What ``python -m autotune.engine`` did: the package's imports bring numpy (and its libstdc++) in before
    libllama. The assertion above can fail."""
    code = "import autotune.engine, llama_cpp, json; from autotune.engine import libs; print(json.dumps(libs.loaded_libraries()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert libs.runtime_first(json.loads(out.splitlines()[-1]))


@pytest.fixture()
def fake_toolchain_mismatch(monkeypatch):
    monkeypatch.setenv("AUTOTUNE_FAKE_TOOLCHAIN_MISMATCH", "1")


@pytest.mark.engine
def test_fake_toolchain_mismatch_crashes_only_a_load_after_libstdcxx(tiny_model, fake_toolchain_mismatch):
    ran = engine.measure(str(tiny_model), Settings(n_ctx=256, n_threads=1, n_threads_batch=1), Workload(16, 4, 1))
    assert ran.ok, ran.error
    after = process.Worker(prelude=diagnose.RUNTIME_FIRST).ask({"mode": "vocab", "model": str(tiny_model)}, 120,
                                                                last=True)
    assert after.result is None and after.failure().startswith("crashed with SIGSEGV (segmentation fault) during "
                                                               "loading the model")


@pytest.mark.engine
def test_doctor_names_the_toolchain_mismatch_fake_toolchain_mismatch(tiny_model, capsys, fake_toolchain_mismatch):
    assert cli.main(["doctor", str(tiny_model), "--recheck"]) == 0  # autotune itself runs: its children load first
    out = " ".join(capsys.readouterr().out.split())
    assert "libstdc++ loaded first (as after `import numpy`): crashed with SIGSEGV" in out
    assert "diagnosis: a toolchain mismatch" in out and "-DCMAKE_CXX_COMPILER=" in out


@pytest.mark.engine
def test_doctor_on_a_sound_build_finds_no_load_order_fault(tiny_model, capsys):
    assert cli.main(["doctor", str(tiny_model), "--json"]) == 0
    env = json.loads(capsys.readouterr().out)["environment"]
    assert env["engine_first"] == env["runtime_first"] == "loads" and not env["order_fault"]


def test_libs_reads_what_the_engine_libraries_carry():
    found = [libs.carried(p) for p in sorted(libs.lib_dir().glob("libllama*.so"))]
    assert found and all(c is not None and c.std_symbols > 0 and c.path.endswith(".so") for c in found)
    assert os.path.exists(libs.system_libstdcxx())
