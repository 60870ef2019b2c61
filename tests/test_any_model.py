"""Models the replay does not price: mixture of experts (Qwen3-MoE, gpt-oss), MLA with shared experts
(DeepSeek-V2-Lite), fused QKV (Phi-3), Gemma 2's sliding window and a recurrent state (Mamba), as
header-only GGUF files of the real shapes. Every estimate must equal the engine's dry run; the weights, placed from the tensor table, must
equal a real load's buffers; experts kept in host memory must reach the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from autotune import cli, engine, memory
from autotune.engine import bundled
from autotune.facts import synth
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import GPU, Hardware, probe
from autotune.memory.layout import MIB, placement, weight_buffers
from autotune.search import oracle
from autotune.vocabulary.errors import ModelError
from autotune.vocabulary.settings import Settings

pytestmark = pytest.mark.engine  # every test here asks the engine (dry runs, loads, searches)

SHAPES = ("qwen3-30b-a3b", "gpt-oss-20b", "gemma2-2b", "phi3-mini", "deepseek-v2-lite", "mamba-130m")
GIB = 2**30

# The same architectures at toy sizes: a real load of a sparse file costs a few MiB.
SMALL = {
    "qwen3moe": synth.Shape(n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, head_dim=64, arch="qwen3moe",
                            n_expert=4, n_expert_used=2, n_ff_exp=256),
    "gpt-oss": synth.Shape(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, head_dim=64, n_swa=128,
                           arch="gpt-oss", n_expert=4, n_expert_used=2, n_ff_exp=256, expert_type="MXFP4"),
    "gemma2": synth.Shape(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, head_dim=64, n_swa=256,
                          arch="gemma2"),
    "phi3": synth.Shape(n_layer=2, n_embd=256, n_head=4, n_head_kv=4, n_ff=512, arch="phi3"),
    "deepseek2": synth.Shape(n_layer=27, n_embd=256, n_head=4, n_head_kv=1, n_ff=512, head_dim=192, arch="deepseek2",
                             n_expert=4, n_expert_used=2, n_ff_exp=256, n_expert_shared=1, n_dense_lead=1,
                             kv_lora_rank=256, rope_dim=64, head_dim_v=128),
}


def host(ram: int = 64 * GIB) -> Hardware:
    return Hardware(cpu_model="test", physical_cores=2, logical_cores=2, ram_total=ram, ram_available=ram,
                    cpu_features=engine.build_info().cpu_features, build=engine.bundled)


def S(**kw) -> Settings:
    return Settings(n_threads=1, n_threads_batch=1, use_extra_bufts=False, **kw)


@pytest.fixture(scope="module")
def big(demo_model, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("any-model")
    return {k: synth.write_model(d / f"{k}.gguf", demo_model, synth.SHAPES[k], "Q4_K", header_only=True, vocab=2048)
            for k in SHAPES}


@pytest.fixture(scope="module")
def small(demo_model, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("any-model-small")
    return {k: synth.write_model(d / f"{k}.gguf", demo_model, shape, "Q4_K", header_only=True, vocab=2048)
            for k, shape in SMALL.items()}


@pytest.mark.parametrize("name", SHAPES)
def test_every_estimate_equals_the_engines_dry_run(isolated_cache, big, name):
    facts = read_facts(big[name])
    assert memory.replay_gap(facts) is not None
    caches = [(False, "f16", "f16"), (True, "f16", "f16"), (True, "q8_0", "q8_0")]
    if name != "deepseek-v2-lite":  # MLA refuses K and V of different types (see below)
        caches.append((False, "q8_0", "f16"))
    grid = [S(n_ctx=n, flash_attn=fa, type_k=k, type_v=v) for n in (512, 8192, 32768) for fa, k, v in caches]
    rows = oracle.verify(facts, grid, host())
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    for r in rows:
        assert r["source"] == memory.DRY_RUN
        e = r["estimate"]
        assert sum(d.kv for d in e.devices) == e.kv_k + e.kv_v  # every cache byte lands on a device
        for k in ("weights", "kv", "compute", "total"):
            assert abs(r["error_pct"][k]) <= 0.5, (name, k, r["settings"], r["predicted"], r["engine"])


@pytest.mark.parametrize("name", SMALL)
def test_weights_placed_from_the_tensor_table_equal_a_real_load(isolated_cache, small, name):
    """Per buffer, at the load log's 0.01 MiB: mapped or copied host weights, and the AMX / CPU_REPACK copies
    (3-D experts repack for MUL_MAT_ID, never AMX; DeepSeek's 3-D attn_k_b goes to AMX where it can)."""
    facts = read_facts(small[name])
    hw = probe(bundled, measure_bandwidth=False)
    for extra in (True, False):
        for mmap in (True, False):
            s = Settings(use_extra_bufts=extra, use_mmap=mmap)
            real = engine.loaded_buffers(str(small[name]), s)
            weights, repack = weight_buffers(facts, s, hw, placement(facts, s, hw))
            plain = real.get("CPU_Mapped" if mmap else "CPU", 0)
            extras = real.get("AMX", 0) + real.get("CPU_REPACK", 0)
            assert abs(weights["host"] - plain) <= 0.006 * MIB, (extra, mmap, weights, real)
            assert abs(repack - extras) <= 0.011 * MIB, (extra, mmap, repack, real)


def test_experts_kept_in_host_memory_reach_the_engine(isolated_cache, small):
    """n_cpu_moe overrides the experts of the first layers to the CPU buffer type, for which the loader still picks
    the CPU's extra buffers, as llama.cpp's --n-cpu-moe does: a real load holds what the estimate says
    (tests/test_placement.py checks the overridden tensors one by one)."""
    facts = read_facts(small["qwen3moe"])
    hw = probe(bundled, measure_bandwidth=False)
    moved = Settings(use_extra_bufts=True, use_mmap=False, n_cpu_moe=2)
    weights, repack = weight_buffers(facts, moved, hw, placement(facts, moved, hw))
    real = engine.loaded_buffers(str(small["qwen3moe"]), moved)
    assert abs(real["CPU"] - weights["host"]) <= 0.006 * MIB, (real, weights)
    assert abs(real.get("CPU_REPACK", 0) + real.get("AMX", 0) - repack) <= 0.011 * MIB, (real, repack)


def fake_gpu(vram_gib: float) -> Hardware:
    gpu = GPU(index=0, name="fake", backend="cuda", vram_total=int(vram_gib * GIB), vram_free=int(vram_gib * GIB))
    return dataclasses.replace(host(), gpus=(gpu,), backend="cuda", can_offload=True)


def test_fake_gpu_n_cpu_moe_moves_exactly_the_expert_bytes_to_the_host(isolated_cache, big):
    facts = read_facts(big["qwen3-30b-a3b"])
    hw = fake_gpu(24)
    full = S(n_ctx=4096, n_gpu_layers=facts.n_layer + 1, use_mmap=False)  # mmap would map a whole file range
    base = memory.estimate(facts, full, hw)
    assert base.source == memory.DRY_RUN_PROJECTED
    for n in (1, 10, facts.n_layer):
        e = memory.estimate(facts, full.replace(n_cpu_moe=n), hw)
        experts = sum(t.n_bytes for t in facts.tensors if t.layer is not None and t.layer < n and "_exps" in t.name)
        assert e.device("gpu0").weights == base.device("gpu0").weights - experts
        assert e.device("host").weights - base.device("host").weights == experts
        assert e.device("gpu0").kv == base.device("gpu0").kv  # the experts move, the attention stays


def test_max_ctx_from_the_dry_run_is_the_edge_of_what_fits(isolated_cache, big):
    facts = read_facts(big["gpt-oss-20b"])
    hw = host(ram=16 * GIB)
    s = S(flash_attn=True)
    best = memory.max_ctx(facts, s, hw)
    assert 0 < best < facts.n_ctx_train
    assert memory.estimate(facts, s.replace(n_ctx=best), hw).fits
    assert not memory.estimate(facts, s.replace(n_ctx=best + 256), hw).fits


def test_dry_run_answers_are_cached_by_the_settings_that_shape_memory(isolated_cache, big):
    facts = read_facts(big["phi3-mini"])
    cost = memory.dryrun.COST
    memory.estimate(facts, S(n_ctx=3072), host())
    runs = cost.runs
    memory.estimate(facts, S(n_ctx=3072).replace(n_threads=2, use_mmap=False), host())  # not memory knobs
    assert cost.runs == runs
    memory.estimate(facts, S(n_ctx=3328), host())
    assert cost.runs == runs + 1
    memory.dryrun._memo.clear()  # a new process reads the answers back from disk
    memory.estimate(facts, S(n_ctx=3328), host())
    assert cost.runs == runs + 1


def test_a_dry_run_that_dies_is_one_line_with_the_way_out(isolated_cache, big, capsys):
    """DeepSeek-V2's Q8_0 attn_k_b goes to the AMX buffer on AMX CPUs, and the engine's dry run aborts there
    (GGML_ASSERT in the scheduler); with extra buffers off it answers. Elsewhere both answer."""
    facts = read_facts(big["deepseek-v2-lite"])
    try:
        memory.estimate(facts, S(n_ctx=4096).replace(use_extra_bufts=True), host())
    except ModelError as e:
        assert "\n" not in str(e) and "--no-repack" in str(e)
    e = memory.estimate(facts, S(n_ctx=4096), host())
    assert e.kv_v == 0 and e.kv_k > 0  # MLA caches the compressed K only; V is a view of it
    with pytest.raises(ModelError, match="does not support different K"):  # the search prunes such trials
        memory.estimate(facts, S(n_ctx=4096, type_k="q8_0"), host())


@pytest.mark.parametrize("name", SHAPES)
def test_inspect_and_memory_accept_every_shape(isolated_cache, big, name, capsys):
    assert cli.main(["inspect", str(big[name])]) == 0
    assert cli.main(["memory", str(big[name]), "--repack", "off", "--ctx", "2048"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "source: engine dry run" in out


def test_fake_gpu_space_searches_expert_placement_with_gpu_layers(isolated_cache, big, demo_model):
    from autotune.search import space

    moe = read_facts(big["qwen3-30b-a3b"])
    whole = space.build_space(fake_gpu(24), moe, 4096)  # the whole model fits: nothing of its placement is searched
    assert whole.base.n_gpu_layers == moe.n_layer + 1 and not {"n_cpu_moe", "n_gpu_layers"} & set(whole.int_ranges)
    sp = space.build_space(fake_gpu(12), moe, 4096)  # it does not: every layer on the GPU, the fewest experts off it
    least, most = sp.int_ranges["n_cpu_moe"]
    assert 0 < least < most == least + space.SPAN and "n_gpu_layers" not in sp.int_ranges
    assert sp.base.n_gpu_layers == moe.n_layer + 1 and sp.base.n_cpu_moe == least
    assert "n_cpu_moe" not in space.build_space(host(), moe, 4096).int_ranges  # nothing to move without a GPU
    assert "n_cpu_moe" not in space.build_space(fake_gpu(24), read_facts(demo_model), 4096).int_ranges  # dense


TINY = {  # small enough to run for real (random F16 weights): the search itself, end to end
    "qwen3moe": dict(n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=128, n_expert=4, n_expert_used=2, n_ff_exp=64),
    "gpt-oss": dict(n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=64, head_dim=32, n_swa=32, n_expert=4,
                    n_expert_used=2, n_ff_exp=64),
    "gemma2": dict(n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=128, head_dim=32, n_swa=64),
    "phi3": dict(n_layer=2, n_embd=64, n_head=2, n_head_kv=2, n_ff=128),
    "deepseek2": dict(n_layer=27, n_embd=64, n_head=2, n_head_kv=1, n_ff=128, head_dim=48, n_expert=4,
                      n_expert_used=2, n_ff_exp=64, n_expert_shared=1, n_dense_lead=1, kv_lora_rank=32, rope_dim=16,
                      head_dim_v=32),
    "mamba": dict(n_layer=2, n_embd=64, n_head=0, n_head_kv=0, n_ff=0, ssm_state=16),
}


@pytest.mark.parametrize("arch", TINY)
def test_search_runs_every_architecture_end_to_end(isolated_cache, demo_model, tmp_path, arch):
    import json
    import subprocess
    import sys

    model = synth.write_model(tmp_path / f"{arch}.gguf", demo_model, synth.Shape(arch=arch, **TINY[arch]), vocab=2048)
    out = tmp_path / "tuned.json"
    done = subprocess.run([sys.executable, "-m", "autotune.cli", "search", str(model), "--trials", "2", "--ctx", "256",
                           "--prompt-tokens", "32", "--gen-tokens", "8", "--top-k", "1", "--rounds", "1",
                           "--kv-quality", "off", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads(out.read_text())
    assert config["model"]["architecture"] == arch and config["metrics"]["decode"]["n"] >= 2
    assert config["memory"]["source"] == memory.DRY_RUN  # every trial was gated by the engine's own figures


def test_fit_offers_placements_per_cache_type_within_the_trained_context(isolated_cache, big, demo_model, capsys):
    from autotune.memory.fit import fit

    rows = fit(read_facts(big["qwen3-30b-a3b"]), host(ram=20 * GIB), None, S())
    assert [r.settings.type_k for r in rows] == ["f16", "q8_0", "q4_0"]
    assert all(r.settings.n_ctx == 40960 and r.estimate.source == memory.DRY_RUN for r in rows)
    # 20 GiB: the f16 cache does not hold the trained context, the quantized ones stretch further
    assert not rows[0].holds_target and rows[0].max_ctx < 40960 < rows[2].max_ctx + 256
    assert rows[0].max_ctx < rows[1].max_ctx <= rows[2].max_ctx
    assert cli.main(["fit", str(demo_model), "--ctx", "100000"]) == 2  # beyond the trained 8,192: asked for only
    assert cli.main(["fit", str(demo_model), "--ctx", "100000", "--beyond-trained"]) == 0
    assert "beyond the 8,192 tokens" in " ".join(capsys.readouterr().out.split())


def test_fake_gpu_fit_keeps_experts_on_the_host_before_dropping_layers(isolated_cache, big):
    from autotune.memory.fit import fit

    facts = read_facts(big["qwen3-30b-a3b"])
    rows = fit(facts, fake_gpu(12), 8192, S(), ("f16",))
    layers, experts = rows
    assert layers.settings.n_gpu_layers < facts.n_layer + 1 and layers.holds_target
    assert experts.settings.n_gpu_layers == facts.n_layer + 1 and 0 < experts.settings.n_cpu_moe <= facts.n_layer
    assert experts.holds_target and experts.estimate.device("gpu0").fits()
    fewer = experts.settings.replace(n_cpu_moe=experts.settings.n_cpu_moe - 1)
    assert not memory.estimate(facts, fewer, fake_gpu(12)).fits  # the fewest expert layers on the host
