"""The search space: valid by construction, shaped by the hardware and the model, and honouring pins."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import GPU, Hardware
from autotune.search import space
from autotune.vocabulary.errors import SettingsError

CPU_HW = Hardware(cpu_model="test cpu", physical_cores=4, logical_cores=8, ram_total=16 * 2**30,
                  ram_available=12 * 2**30)


def fake_gpu_hw() -> Hardware:
    gpu = GPU(index=0, name="Fake 24G", backend="cuda", vram_total=24 * 2**30, vram_free=23 * 2**30)
    return dataclasses.replace(CPU_HW, gpus=(gpu,), backend="cuda", can_offload=True)


def test_every_sampled_config_is_valid(demo_model):
    facts = read_facts(demo_model)
    sp = space.build_space(CPU_HW, facts, 4096)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(300):
        s = sp.suggest(study.ask())
        assert s.problems(can_offload=False) == [], s
        assert s.n_ctx == 4096 and s.n_gpu_layers == 0


def test_cpu_only_space_has_no_gpu_knobs(demo_model):
    sp = space.build_space(CPU_HW, read_facts(demo_model), 4096)
    assert "n_gpu_layers" not in sp.int_ranges and "offload_kqv" not in sp.params
    assert sp.int_ranges["n_threads"] == (1, 8)
    assert "swa_full" not in sp.params  # SmolLM2 has no sliding window


def test_fake_gpu_space_keeps_every_layer_on_the_gpu_when_the_model_fits(demo_model):
    """A model the GPU holds whole is searched with every layer there: partial offload, host threads, mmap and
    a host KV cache only slow it down, so no trial is spent on them; the GPU's knobs are searched instead."""
    facts = read_facts(demo_model)
    sp = space.build_space(fake_gpu_hw(), facts, 4096)
    assert sp.base.n_gpu_layers == facts.n_layer + 1 and sp.placement["n_gpu_layers"] == facts.n_layer + 1
    assert "n_gpu_layers" not in sp.int_ranges and not set(space.HOST_ONLY) & (set(sp.params) | set(sp.int_ranges))
    assert sp.params["n_ubatch"] == (256, 512, 1024, 2048, 4096, 8192) and "all 31 layers on the GPU" in sp.where
    s = sp.settings_from({"n_ubatch": 2048, "batch_factor": 4})
    assert s.n_batch == 4096 and s.n_gpu_layers == facts.n_layer + 1


def test_fake_gpu_too_small_searches_the_most_layers_that_fit(demo_model, tmp_path):
    from autotune import memory
    from autotune.facts import synth

    big = read_facts(synth.write_model(tmp_path / "8b.gguf", demo_model, synth.SHAPES["8b"], "Q4_K", header_only=True))
    hw = dataclasses.replace(fake_gpu_hw(), gpus=(GPU(0, "Fake 4G", "cuda", 4 * 2**30, 4 * 2**30),))
    sp = space.build_space(hw, big, 4096)
    lo, most = sp.int_ranges["n_gpu_layers"]
    assert 0 < most < big.n_layer + 1 and lo == most - space.SPAN and sp.base.n_gpu_layers == most
    lean = sp.base.replace(n_ubatch=256, n_batch=256, flash_attn=True, type_k="q4_0", type_v="q4_0")
    assert memory.estimate(big, lean, hw).fits and not memory.estimate(big, lean.replace(n_gpu_layers=most + 1), hw).fits
    assert "n_threads" in sp.int_ranges  # layers stay on the host: its threads matter


def test_pins_remove_knobs_and_constrain_others(demo_model):
    facts = read_facts(demo_model)
    pins = space.parse_pins(["n_threads=2", "type_v=q8_0", "n_batch=128"])
    sp = space.build_space(CPU_HW, facts, 4096, pins)
    assert "n_threads" not in sp.int_ranges and sp.base.n_threads == 2
    assert all(space.parse_attention(c)[0] and space.parse_attention(c)[2] == "q8_0" for c in sp.params["attention"])
    assert max(sp.params["n_ubatch"]) <= 128 and "batch_factor" not in sp.params
    s = sp.suggest(optuna.create_study().ask())
    assert s.n_threads == 2 and s.type_v == "q8_0" and s.flash_attn and s.n_batch == 128


def test_bad_pins(demo_model):
    with pytest.raises(SettingsError):
        space.parse_pins(["n_threads"])
    with pytest.raises(SettingsError):
        space.parse_pins(["warp_drive=9"])
    with pytest.raises(SettingsError, match="cannot offload"):
        space.build_space(CPU_HW, read_facts(demo_model), 4096, {"n_gpu_layers": 5})


def test_params_of_inverts_settings_from(demo_model):
    sp = space.build_space(CPU_HW, read_facts(demo_model), 4096)
    for s in (sp.base, sp.base.replace(flash_attn=True, type_k="q8_0", type_v="q8_0", n_ubatch=128, n_batch=256)):
        assert sp.settings_from(sp.params_of(s)) == s


def test_quantized_kv_needs_whole_blocks(tmp_path, demo_model):
    from autotune.facts import synth

    odd = synth.write_model(tmp_path / "hd16.gguf", demo_model, synth.Shape(n_embd=64, n_head=4, n_head_kv=2),
                            header_only=True)
    sp = space.build_space(CPU_HW, read_facts(odd), 1024)
    assert sp.params["attention"] == ("fa-off:f16:f16", "fa-on:f16:f16")


def test_kv_pairs_and_exclusion(demo_model):
    sp = space.build_space(CPU_HW, read_facts(demo_model), 4096)
    assert space.kv_pairs(sp) == [("q4_0", "f16"), ("q4_0", "q4_0"), ("q8_0", "f16"), ("q8_0", "q8_0")]
    kept = sp.without_kv({("q4_0", "q4_0"), ("q4_0", "f16")})
    assert space.kv_pairs(kept) == [("q8_0", "f16"), ("q8_0", "q8_0")]


def test_extra_buffers_are_a_knob_only_where_weights_would_use_them(demo_model, tiny_model):
    """CPU_REPACK (AVX2) or AMX (a described Sapphire Rapids) would take SmolLM2's Q4_1 matrices: a knob; with
    no extra buffer type in the engine build, or an F16 model on an AVX2 CPU, there is nothing to choose."""
    smol = read_facts(demo_model)
    amx = dataclasses.replace(CPU_HW, cpu_features=("AVX2", "AVX512_VNNI", "AMX_INT8", "REPACK"))
    assert space.build_space(amx, smol, 4096).params["use_extra_bufts"] == (True, False)
    assert "use_extra_bufts" not in space.build_space(CPU_HW, smol, 4096).params
    avx2 = dataclasses.replace(CPU_HW, cpu_features=("AVX2", "REPACK"))
    assert "use_extra_bufts" not in space.build_space(avx2, read_facts(tiny_model), 4096).params
    pinned = space.build_space(amx, smol, 4096, {"use_extra_bufts": False})
    assert "use_extra_bufts" not in pinned.params and pinned.base.use_extra_bufts is False


def test_op_offload_is_searched_only_while_layers_stay_on_the_host(demo_model, tmp_path):
    from autotune.facts import synth

    small = read_facts(demo_model)
    assert "op_offload" not in space.build_space(CPU_HW, small, 4096).params  # no GPU to offload to
    assert "op_offload" not in space.build_space(fake_gpu_hw(), small, 4096).params  # every layer on the GPU
    big = read_facts(synth.write_model(tmp_path / "8b.gguf", demo_model, synth.SHAPES["8b"], "Q4_K", header_only=True))
    hw = dataclasses.replace(fake_gpu_hw(), gpus=(GPU(0, "Fake 4G", "cuda", 4 * 2**30, 4 * 2**30),))
    assert space.build_space(hw, big, 4096).params["op_offload"] == (True, False)  # part of it on the host
