"""Engine health: crash reasons a person can act on, and the self-check that finds and pins a runtime switch.

The Intel Xeon whose AMX kernel crashes every multi-token batch is faked at one seam (``fake_amx_crash``:
``AUTOTUNE_FAKE_AMX_CRASH=1`` in the engine's child processes), so these tests mean the same on any CPU."""

from __future__ import annotations

import json

import pytest

from autotune import engine
from autotune.engine import Workload, bundled
from autotune.facts.probe import probe
from autotune.search import health
from autotune.vocabulary.settings import Settings

ONE = Settings(n_ctx=256, n_threads=1, n_threads_batch=1)
WORK = Workload(prompt_tokens=24, gen_tokens=4, reps=1)


@pytest.fixture()
def fake_amx_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engine.FAKE_AMX_CRASH, "1")


@pytest.fixture(scope="module")
def hw():
    return probe(bundled, measure_bandwidth=False)


@pytest.mark.engine
def test_fake_amx_crash_kills_multi_token_batches_only_with_extra_buffers(tiny_model, fake_amx_crash):
    crashed = engine.measure(str(tiny_model), ONE, WORK)
    assert not crashed.ok
    assert crashed.error.startswith("crashed with SIGSEGV (segmentation fault) during a batch of 16 tokens")
    assert "model buffers" in crashed.error and "fault injection" in crashed.error
    survived = engine.measure(str(tiny_model), ONE.replace(use_extra_bufts=False), WORK)
    assert survived.ok and survived.decode > 0, survived.error


def test_crash_context_names_stage_phase_buffers_and_error():
    stderr = "\n".join([
        "autotune-phase: the f16 reference cache",
        "autotune-stage: loading the model (extra buffer types on)",
        "load_tensors:          AMX model buffer size =    95.34 MiB",
        "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB",
        "Using chat bos_token: <|im_start|>",  # the misleading last line a crash used to be blamed on
        "autotune-stage: a batch of 256 tokens",
    ])
    assert engine.crash_context(stderr) == ("during a batch of 256 tokens (the f16 reference cache); "
                                            "model buffers AMX 95.3 MiB, CPU_Mapped 92.1 MiB")
    assert engine.child_failure(-11, stderr).startswith("crashed with SIGSEGV (segmentation fault) during a batch")
    assert engine.child_failure(3, "llama_model_load: error loading model: bad\nautotune-stage: x") == \
        "exit code 3: llama_model_load: error loading model: bad"


@pytest.mark.engine
def test_self_check_with_fake_amx_crash_pins_extra_buffers_off_once(tiny_model, hw, fake_amx_crash):
    verdict = health.check(str(tiny_model), ONE, hw, bundled)
    assert not verdict.ok and verdict.pins == {"use_extra_bufts": False} and not verdict.cached
    assert "crashed with SIGSEGV" in verdict.crash and "during a batch of" in verdict.crash
    assert "--no-repack" in verdict.line() and "use_extra_bufts=False" in verdict.line()
    assert verdict.seconds > 0
    again = health.check(str(tiny_model), ONE.replace(n_ctx=4096), hw, bundled)  # the context does not choose kernels
    assert again.cached and again.pins == verdict.pins and "remembered" in again.line()
    assert any(json.loads(health.cache_path().read_text()).values())


@pytest.mark.engine
def test_self_check_without_fault_pins_nothing(tiny_model, hw):
    verdict = health.check(str(tiny_model), ONE, hw, bundled)
    assert verdict.ok and verdict.pins == {} and verdict.crash == ""


@pytest.mark.engine
def test_self_check_stops_in_one_line_when_no_switch_helps_fake_amx_crash(tiny_model, hw, fake_amx_crash):
    with pytest.raises(health.EngineCrash, match="no runtime switch avoids it"):
        health.check(str(tiny_model), ONE.replace(n_threads=2), hw, bundled, pinned=frozenset({"use_extra_bufts"}))


@pytest.mark.engine
def test_doctor_reports_the_verdict_fake_amx_crash(tiny_model, capsys, fake_amx_crash):
    from autotune import cli

    assert cli.main(["doctor", str(tiny_model), "--json", "--recheck"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pins"] == {"use_extra_bufts": False} and not out["cached"]


def test_a_pin_the_switch_agrees_with_does_not_rule_the_switch_out(tiny_model, hw, scripted_engine):
    """Extra buffers pinned off by the user, and a crash only flash attention off avoids (a scripted engine:
    the decision, not the engine): the second switch keeps the pinned value, so it is tried and pinned."""
    from autotune.engine import Measurement

    def scripted(model, s, work, timeout=0.0, index=0):
        return Measurement(s, True, decode_tps=[1.0]) if not s.flash_attn else \
            Measurement(s, False, "crashed with SIGSEGV (segmentation fault) during a batch of 16 tokens")

    start = ONE.replace(use_extra_bufts=False, flash_attn=True)
    verdict = health.check(str(tiny_model), start, hw, scripted_engine(scripted), pinned=frozenset({"use_extra_bufts"}))
    assert verdict.pins == {"use_extra_bufts": False, "flash_attn": False, "type_k": "f16", "type_v": "f16"}
    with pytest.raises(health.EngineCrash):  # a pin the switch would change still rules it out
        health.check(str(tiny_model), start, hw, scripted_engine(scripted), pinned=frozenset({"flash_attn"}))


def test_every_load_dying_whatever_the_switch_names_the_environment_not_a_switch(tiny_model, hw, scripted_engine):
    """Every attempt dies while loading (a scripted engine, as the CUDA build with a foreign libstdc++ did): no
    switch can help, and the self-check says so and names doctor instead of listing switches."""
    from autotune.engine import Measurement

    def scripted(model, s, work, timeout=0.0, index=0):
        return Measurement(s, False, "crashed with SIGSEGV (segmentation fault) during loading the model")

    with pytest.raises(health.EngineCrash, match="every load of the model dies .* whatever the switch.*autotune doctor"):
        # a start no earlier test's verdict is kept for
        health.check(str(tiny_model), ONE.replace(n_threads=3), hw, scripted_engine(scripted))
