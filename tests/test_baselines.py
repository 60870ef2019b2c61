"""The side-by-side's baselines on a GPU too small for the model: llama.cpp's defaults with the placement its --fit
picks, and "max layers on the GPU", each placed by the memory model at its own settings (an f16 cache, micro-batch
512), never at the search space's leanest. The GPU is a constructed ``Hardware`` (fake_gpu); the models are
header-only synthetic shapes."""

from __future__ import annotations

import dataclasses

import pytest

from autotune import engine, memory
from autotune.facts import synth
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import GPU, Hardware
from autotune.search import baselines, space, study
from autotune.search.request import StudyRequest

GIB = 2**30


def fake_gpu(vram_gib: int) -> Hardware:
    gpu = GPU(index=0, name=f"Fake {vram_gib}G", backend="cuda", vram_total=vram_gib * GIB, vram_free=vram_gib * GIB)
    return Hardware(cpu_model="test cpu", physical_cores=8, logical_cores=16, ram_total=96 * GIB,
                    ram_available=90 * GIB, gpus=(gpu,), backend="cuda", can_offload=True, build=engine.bundled)


def request(path, hw: Hardware, n_ctx: int = 6400) -> StudyRequest:
    facts = read_facts(path)
    return StudyRequest(model_path=str(path), facts=facts, hw=hw, space=space.build_space(hw, facts, n_ctx))


@pytest.fixture(scope="module")
def dense(demo_model, tmp_path_factory):
    return synth.write_model(tmp_path_factory.mktemp("m") / "8b.gguf", demo_model, synth.SHAPES["8b"], "Q4_K",
                             header_only=True)


def test_fake_gpu_both_baselines_have_their_own_placement_and_fit(dense):
    req = request(dense, fake_gpu(4))
    named = dict(baselines.baselines(req))
    llama, most = named["llama.cpp defaults"], named["max layers on the GPU"]
    top = req.facts.n_layer + 1
    # llama.cpp's own settings, not the space's leanest (q4_0 cache, micro-batch 256)
    for s in (llama, most):
        assert (s.type_k, s.type_v, s.n_ubatch, s.n_batch, s.flash_attn) == ("f16", "f16", 512, 2048, True)
        assert memory.estimate(req.facts, s, req.hw).fits  # neither is gated out as "does not fit"
    assert llama.n_gpu_layers == space.llama_fit(req.facts, req.hw, llama)[0]["n_gpu_layers"]
    assert 0 < llama.n_gpu_layers <= most.n_gpu_layers < req.space.placement["n_gpu_layers"] < top
    # the most: one more layer does not fit at these settings
    assert not memory.estimate(req.facts, most.replace(n_gpu_layers=most.n_gpu_layers + 1), req.hw).fits
    # the engine's defaults (llama-cpp-python: no flash attention, n_batch 512) are placed at their own settings
    mine = named["defaults"]
    assert mine.n_gpu_layers == space.gpu_placement(req.facts, req.hw, engine.defaults(6400))[0]["n_gpu_layers"]
    assert memory.estimate(req.facts, mine, req.hw).fits


def test_fake_gpu_holding_the_model_whole_keeps_one_baseline_for_both(dense):
    req = request(dense, fake_gpu(24))
    named = baselines.baselines(req)
    roles = [r for r, _ in named]
    assert "llama.cpp defaults" in roles and "max layers on the GPU" not in roles  # the same config: measured once
    assert dict(named)["llama.cpp defaults"].n_gpu_layers == req.facts.n_layer + 1


def test_without_a_gpu_there_is_no_max_layers_baseline(dense):
    hw = dataclasses.replace(fake_gpu(4), gpus=(), backend="cpu", can_offload=False)
    roles = [r for r, _ in baselines.baselines(request(dense, hw, 4096))]
    assert "max layers on the GPU" not in roles and roles[0] == "llama.cpp defaults"


def test_pinned_placement_is_kept_by_every_baseline(dense):
    req = request(dense, fake_gpu(4))
    req = dataclasses.replace(req, pins={"n_gpu_layers": 7})
    assert {s.n_gpu_layers for _, s in baselines.baselines(req)} == {7}


@pytest.mark.engine
def test_fake_gpu_moe_fit_keeps_the_last_layers_experts_on_the_host(demo_model, tmp_path):
    """qwen3-30b-a3b at 12 GiB (the engine's dry run prices a mixture of experts, in a child process): --fit's
    placement keeps every layer on the GPU and the experts of the LAST layers on the host; max layers offloads
    fewer layers whole, with no overrides; both fit at llama.cpp's settings."""
    path = synth.write_model(tmp_path / "q.gguf", demo_model, synth.SHAPES["qwen3-30b-a3b"], "Q4_K", header_only=True)
    req = request(path, fake_gpu(12))
    named = dict(baselines.baselines(req))
    llama, most = named["llama.cpp defaults"], named["max layers on the GPU"]
    top, layers = req.facts.n_layer + 1, req.facts.moe_layers
    assert llama.n_gpu_layers == top and llama.moe_host_from == "last" and 0 < llama.n_cpu_moe < len(layers)
    assert llama.experts_on_host(layers) == frozenset(range(len(layers) - llama.n_cpu_moe, len(layers)))
    assert most.n_cpu_moe == 0 and not most.moe_host_layers and 0 < most.n_gpu_layers < top
    for s in (llama, most):
        assert s.type_k == "f16" and s.n_ubatch == 512 and memory.estimate(req.facts, s, req.hw).fits


def test_fake_gpu_a_baseline_placed_outside_the_space_seeds_a_trial_that_does_not_claim_to_be_it(dense, tmp_path):
    """The study's first trials are the baselines where the space holds their placement; one it does not hold
    seeds the nearest trial, labelled as such and not counted as a baseline (the side-by-side measures it)."""
    req = dataclasses.replace(request(dense, fake_gpu(4)), storage=f"sqlite:///{tmp_path / 's.db'}")
    lo, hi = req.space.int_ranges["n_gpu_layers"]
    st = study.open_study(req)
    seeded = {t.user_attrs["role"]: t for t in st.get_trials(deepcopy=False)}
    for role, s in baselines.baselines(req):
        inside = lo <= s.n_gpu_layers <= hi
        t = seeded.get(role if inside else f"{role}, placed as the space allows")
        if t is None:  # its parameters were queued under an earlier name
            continue
        assert t.user_attrs["baseline"] is inside
        assert t.system_attrs["fixed_params"]["n_gpu_layers"] == min(max(s.n_gpu_layers, lo), hi)
    assert any(not t.user_attrs["baseline"] for t in seeded.values())  # --fit's 1024 MiB margin: fewer layers


def test_fake_gpu_an_external_llama_cpp_engines_defaults_are_placed_by_its_fit(dense, reference_tool):
    """Measuring with llama.cpp's own llama-bench, the engine's defaults are llama.cpp's: one baseline, placed by
    --fit."""
    bench = engine.make(f"llama-bench:{reference_tool('llama-bench')}")
    req = dataclasses.replace(request(dense, fake_gpu(4)), engine=bench)
    named = dict(baselines.baselines(req))
    assert "llama.cpp defaults" not in named
    assert named["defaults"].n_gpu_layers == space.llama_fit(req.facts, req.hw, named["defaults"])[0]["n_gpu_layers"]
