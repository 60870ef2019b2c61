"""The bundled engine (``autotune.engine``): real measured runs in a child process, and every kind of engine fault
turned into a reason."""

from __future__ import annotations

import pytest

from autotune import engine
from autotune.engine import Workload
from autotune.vocabulary.settings import Settings

pytestmark = pytest.mark.engine

SMALL = Workload(prompt_tokens=32, gen_tokens=8, reps=2)
S = Settings(n_ctx=256, n_threads=2, n_threads_batch=2)


def test_real_run_measures_everything(tiny_model):
    m = engine.measure(str(tiny_model), S, SMALL, timeout=120)
    assert m.ok, m.error
    assert len(m.prefill_tps) == len(m.decode_tps) == len(m.ttft_s) == SMALL.reps
    assert all(v > 0 for v in m.prefill_tps + m.decode_tps + m.ttft_s)
    assert m.peak_rss > 10 * 2**20 and m.load_s > 0
    assert len(m.output_tokens) == SMALL.gen_tokens
    # the engine's own buffer report (logged in MiB with two decimals): the K cache of a 2-layer model
    # at 256 cells, 1 KV head x 32 dims, f16
    assert m.buffers["kv_k"] == pytest.approx(2 * 256 * 1 * 32 * 2, abs=0.006 * 2**20)
    assert m.buffers["kv_cells"] == [256]


def test_greedy_output_is_deterministic(tiny_model):
    a = engine.measure(str(tiny_model), S, SMALL, timeout=120)
    b = engine.measure(str(tiny_model), S.replace(n_batch=64, n_ubatch=64), SMALL, timeout=120)
    assert a.ok and b.ok and a.output_tokens == b.output_tokens


def test_depth_puts_history_in_the_cache_before_every_repetition(tiny_model):
    """With 64 tokens of history, each repetition continues the same text as a 96-token prompt would: the
    history is really in the cache (not re-read, not lost between repetitions)."""
    deep = engine.measure(str(tiny_model), S, Workload(prompt_tokens=32, gen_tokens=8, reps=2, depth=64), timeout=120)
    flat = engine.measure(str(tiny_model), S, Workload(prompt_tokens=96, gen_tokens=8, reps=1), timeout=120)
    assert deep.ok and flat.ok, (deep.error, flat.error)
    assert deep.output_tokens == flat.output_tokens and len(deep.decode_tps) == 2
    assert deep.depth_fill_s > 0 and flat.depth_fill_s == 0
    full = engine.measure(str(tiny_model), S, Workload(prompt_tokens=32, gen_tokens=8, reps=1, depth=240), timeout=120)
    assert not full.ok and "smaller than depth + prompt + generated tokens" in full.error


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("abort", "aborted (SIGABRT)"),
        ("segfault", "SIGSEGV"),
        ("oom", "SIGKILL (the out-of-memory killer"),
        ("garbage", "no result from the engine process"),
        ("exit", "exit code 3: llama_model_load: error loading model: injected failure"),
    ],
)
def test_injected_faults_become_reasons(tiny_model, monkeypatch, fault, reason):
    monkeypatch.setenv("AUTOTUNE_FAULT", fault)
    m = engine.measure(str(tiny_model), S, SMALL, timeout=120)
    assert not m.ok and reason in m.error


def test_hang_is_killed_at_the_timeout(tiny_model, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_FAULT", "hang")
    m = engine.measure(str(tiny_model), S, SMALL, timeout=2)
    assert not m.ok and m.error.startswith("timeout: no result after 2 s")


def test_fault_every_n_runs(tiny_model, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_FAULT", "exit")
    monkeypatch.setenv("AUTOTUNE_FAULT_EVERY", "2")
    assert not engine.measure(str(tiny_model), S, SMALL, index=5).ok
    assert engine.measure(str(tiny_model), S, SMALL, index=4).ok


def test_engine_refusal_is_a_reason_not_a_crash(tiny_model):
    m = engine.measure(str(tiny_model), S.replace(type_v="q8_0", flash_attn=False), SMALL, timeout=120)
    assert not m.ok and "refused" in m.error


def test_unloadable_model(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    m = engine.measure(str(bad), S, SMALL, timeout=120)
    assert not m.ok and m.error


def test_kv_divergence_identity_and_quantized(tiny_model):
    r = engine.divergence(str(tiny_model), [("f16", "f16"), ("q8_0", "q8_0")], S, n_tokens=48)
    assert r["f16/f16"]["top1_agreement"] == 1.0 and r["f16/f16"]["mean_kl"] == 0.0
    assert 0.0 <= r["q8_0/q8_0"]["mean_kl"] < 0.5 and r["q8_0/q8_0"]["tokens"] == 48


def test_peak_rss_is_the_engine_process_own(tiny_model):
    """Linux's ru_maxrss carries the parent's peak across exec; the runner must not report ours."""
    ballast = bytearray(700 * 2**20)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # touch every page so it is resident
    m = engine.measure(str(tiny_model), S, SMALL, timeout=120)
    assert m.ok and 0 < m.base_rss <= m.peak_rss < 500 * 2**20
    del ballast


def test_kept_loaded_runs_share_one_load_until_the_load_settings_change(tiny_model, monkeypatch):
    """On a GPU, runs that share the model's load settings share one load (every load here, on the CPU): the
    second run loads nothing, one with other load settings loads again, and a run that dies ends only itself."""
    with engine.kept_loaded(engine.bundled, every_load=True):
        first = engine.measure(str(tiny_model), S, SMALL, timeout=120)
        second = engine.measure(str(tiny_model), S.replace(n_batch=64, n_ubatch=64), SMALL, timeout=120)
        other = engine.measure(str(tiny_model), S.replace(use_mmap=False), SMALL, timeout=120)
        monkeypatch.setenv("AUTOTUNE_FAULT", "segfault")  # read by the next child started: the one after the crash
        engine.bundled._kept.worker.close()
        crashed = engine.measure(str(tiny_model), S, SMALL, timeout=120)
        monkeypatch.delenv("AUTOTUNE_FAULT")
        after = engine.measure(str(tiny_model), S, SMALL, timeout=120)
    assert first.ok and second.ok and other.ok and after.ok, (first.error, second.error, other.error, after.error)
    assert first.load_s > 0 and second.load_s == 0 and other.load_s > 0 and after.load_s > 0
    assert first.output_tokens == second.output_tokens == after.output_tokens
    assert second.buffers["kv_cells"] == [256] and second.peak_rss > 0
    assert not crashed.ok and "SIGSEGV" in crashed.error
