"""The GPU budget (--gpu-budget): parsed and refused in one line, carried by the Hardware, kept by the memory model,
fit and every trial; and pressed fit against llama.cpp's ``llama-fit-params`` answers recorded on an H200. The GPUs
are constructed ``Hardware`` values (fake_gpu, fake_h200); a run's peak is injected as a fake Measurement."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from autotune import cli, memory
from autotune.engine import Measurement, Workload, bundled
from autotune.engine.base import GpuPeak
from autotune.facts import synth
from autotune.facts.gguf_model import ModelFacts, read_facts
from autotune.facts.probe import GPU, Hardware, parse_gpu_budget
from autotune.memory import fit
from autotune.search import loop, request, space
from autotune.vocabulary.errors import SettingsError
from autotune.vocabulary.settings import Settings, layer_list

GIB = 2**30
MIB = 2**20
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "gpu_results.json"


def host(ram_gib: float = 64) -> Hardware:
    ram = int(ram_gib * GIB)
    return Hardware(cpu_model="test", physical_cores=2, logical_cores=2, ram_total=ram, ram_available=ram,
                    build=bundled)


def fake_gpus(*free_gib: float, ram_gib: float = 64) -> Hardware:
    gpus = tuple(GPU(index=i, name=f"fake{i}", backend="cuda", vram_total=int(f * GIB), vram_free=int(f * GIB))
                 for i, f in enumerate(free_gib))
    return dataclasses.replace(host(ram_gib), gpus=gpus, backend="cuda", can_offload=True)


def S(**kw: Any) -> Settings:
    return Settings(n_threads=1, n_threads_batch=1, **kw)


@pytest.fixture(scope="module")
def dense(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelFacts:
    """An 8b-shaped header-only model the replay prices (no engine child)."""
    path = tmp_path_factory.mktemp("budget") / "8b.gguf"
    return read_facts(synth.write_model(path, demo_model, synth.SHAPES["8b"], "Q4_K", header_only=True, vocab=2048))


# ---------------------------------------------------------------------------------------- the value


@pytest.mark.parametrize("text", ["-1", "0", "12GiB", "1.5", "12288,", "", "12288;8192"])
def test_bad_budgets_are_refused_in_one_sentence(text: str) -> None:
    with pytest.raises(SettingsError, match="--gpu-budget .*positive whole numbers"):
        parse_gpu_budget(text)


def test_a_budget_is_one_value_for_every_gpu_or_one_per_gpu_fake_gpu() -> None:
    assert parse_gpu_budget(None) is None and parse_gpu_budget(" 12288 , 8192") == (12288, 8192)
    two = fake_gpus(24, 16)
    assert [g.budget for g in two.with_gpu_budget((12288,)).gpus] == [12288 * MIB] * 2
    assert [g.budget for g in two.with_gpu_budget((12288, 8192)).gpus] == [12288 * MIB, 8192 * MIB]
    assert two.with_gpu_budget((12288, 8192)).gpu_budget == 20480 * MIB and two.gpu_budget is None
    assert two.with_gpu_budget(None) is two
    with pytest.raises(SettingsError, match="3 values for 2 GPU"):
        two.with_gpu_budget((1, 2, 3))
    with pytest.raises(SettingsError, match="no GPU the engine can use"):
        host().with_gpu_budget((4096,))
    cpu_build = dataclasses.replace(two, backend="cpu", can_offload=False)  # GPUs the engine's build cannot use
    with pytest.raises(SettingsError, match="cpu build cannot offload"):
        cpu_build.with_gpu_budget((4096,))
    # studies at another budget are other studies (their trials need not keep to this one); none: the name is as it was
    assert two.with_gpu_budget((8192,)).fingerprint() != two.fingerprint() != two.with_gpu_budget((4096,)).fingerprint()
    assert Hardware.from_dict(two.with_gpu_budget((8192,)).to_dict()) == two.with_gpu_budget((8192,))


# ----------------------------------------------------------------------------------- the memory model


def test_estimate_keeps_to_the_budget_not_the_free_memory_fake_gpu(dense: ModelFacts) -> None:
    free, pressed = fake_gpus(80), fake_gpus(80).with_gpu_budget((4096,))
    s = S(n_ctx=8192, n_gpu_layers=dense.n_layer + 1, flash_attn=True)
    whole, budgeted = memory.estimate(dense, s, free), memory.estimate(dense, s, pressed)
    gpu = budgeted.device("gpu0")
    assert whole.fits and not budgeted.fits
    assert gpu.total == whole.device("gpu0").total  # the same prediction, fixed overhead included ...
    assert gpu.room() == 4096 * MIB < gpu.budget - memory.margin(gpu.budget)  # ... against the budget
    assert budgeted.shortfall == gpu.total - 4096 * MIB
    assert budgeted.device("host").room() == whole.device("host").room()  # the host's own margin is untouched
    big = fake_gpus(8).with_gpu_budget((64 * 1024,))  # a budget above what is free: the free memory less margin
    assert memory.estimate(dense, s, big).device("gpu0").room() == 8 * GIB - memory.margin(8 * GIB)
    d = budgeted.to_dict()["devices"][1]
    assert d["gpu_budget"] == 4096 * MIB and d["room"] == 4096 * MIB and not d["fits"]


def test_fit_and_the_space_keep_to_the_budget_fake_gpu(dense: ModelFacts) -> None:
    s = S(n_ctx=8192, flash_attn=True)
    hw = fake_gpus(80).with_gpu_budget((3072,))
    (row,) = fit.fit(dense, hw, 8192, s, ("f16",))
    most = row.settings.n_gpu_layers
    assert 0 < most < dense.n_layer + 1 and row.holds_target
    assert row.estimate.device("gpu0").total <= 3072 * MIB
    assert not memory.estimate(dense, row.settings.replace(n_gpu_layers=most + 1), hw).fits  # the most that fits
    assert fit.fit(dense, fake_gpus(80), 8192, s, ("f16",))[0].settings.n_gpu_layers == dense.n_layer + 1
    # the space places layers by the budget too (the whole model fits the same GPU without one)
    assert 0 < space.build_space(hw, dense, 8192).base.n_gpu_layers < dense.n_layer + 1
    assert space.build_space(fake_gpus(80), dense, 8192).base.n_gpu_layers == dense.n_layer + 1


def test_weights_beyond_ram_and_gpu_room_say_so_with_the_sizes_fake_small_host(monkeypatch, capsys, tmp_path,
                                                                              demo_model: Path) -> None:
    model = synth.write_model(tmp_path / "70b.gguf", demo_model, synth.SHAPES["70b"], "Q4_K", header_only=True,
                              vocab=2048)
    monkeypatch.setattr(cli, "_hardware", lambda bandwidth=False: host(24))
    assert cli.main(["fit", str(model), "--ctx", "8192"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    weights = f"{read_facts(model).weight_bytes / GIB:.1f} GiB"  # more than 24 GiB of RAM holds, less margin
    assert f"the weights alone ({weights}) exceed what this machine can hold (22.8 GiB RAM after its safety" in err
    monkeypatch.setattr(cli, "_hardware", lambda bandwidth=False: fake_gpus(24, ram_gib=24))
    assert cli.main(["fit", str(model), "--ctx", "8192", "--gpu-budget", "8192"]) == 2
    assert "22.8 GiB RAM + 8.0 GiB GPU budget" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- runs


def test_a_trial_over_the_budget_fails_with_its_peak_fake_gpu(scripted_engine, demo_model: Path) -> None:
    facts = read_facts(demo_model)
    hw = fake_gpus(80).with_gpu_budget((1024,))
    s = S(n_ctx=2048, n_gpu_layers=facts.n_layer + 1, flash_attn=True)
    assert memory.estimate(facts, s, hw).fits  # predicted within the budget: the run decides
    peaks: list[int] = []

    def measure(model: str, settings: Settings, workload: Workload, **kw: Any) -> Measurement:
        return Measurement(settings, ok=True, decode_tps=[50.0], prefill_tps=[500.0], ttft_s=[0.1],
                           peak_vram=peaks.pop())

    req = request.StudyRequest(model_path=str(demo_model), facts=facts, hw=hw, space=space.SearchSpace(base=s),
                               workload=Workload(prompt_tokens=32, gen_tokens=8, reps=1),
                               engine=scripted_engine(measure))
    st = optuna.create_study(direction="maximize")
    for peak, state, reason in ((1100 * MIB, TrialState.FAIL, "GPU peak 1,100 MiB over the 1,024 MiB budget"),
                                (1000 * MIB, TrialState.COMPLETE, None)):
        peaks.append(peak)
        trial = st.ask()
        got, values = loop._evaluate(trial, s, req, trial_timeout=60)
        assert got == state and (values is None) == (state == TrialState.FAIL)
        assert trial.user_attrs.get("reason") == reason
    # per GPU where the run reports each: the second GPU's own budget is what it broke
    two = fake_gpus(80, 80).with_gpu_budget((4096, 2048))
    m = Measurement(s, ok=True, peak_vram=5000 * MIB, gpu_peaks=[
        GpuPeak("CUDA0", "fake0", "", 3000 * MIB, "process"), GpuPeak("CUDA1", "fake1", "", 2000 * MIB, "process")])
    assert loop.over_budget(m.gpu_peaks, m.peak_vram, two) == ""
    m.gpu_peaks[1].peak = 2100 * MIB
    assert loop.over_budget(m.gpu_peaks, m.peak_vram, two) == "CUDA1 peak 2,100 MiB over the 2,048 MiB budget"
    assert loop.over_budget(m.gpu_peaks, m.peak_vram, fake_gpus(80, 80)) == ""  # no budget: nothing to break


@pytest.mark.parametrize("command", ["memory MODEL", "fit MODEL", "search MODEL", "serve-tune MODEL",
                                     "spec MODEL"])
def test_every_command_takes_the_budget_and_refuses_a_bad_one(command: str, capsys, demo_model: Path) -> None:
    argv = command.replace("MODEL", str(demo_model)).split()
    assert cli.build_parser().parse_args([*argv, "--gpu-budget", "12288,8192"]).gpu_budget == "12288,8192"
    assert cli.main([*argv, "--gpu-budget", "-4096"]) == 2  # refused before anything runs
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gpu-budget '-4096'" in err


# ------------------------------------------------------------------- pressed fit vs llama-fit-params


def _theirs(line: str, facts: ModelFacts) -> tuple[int, frozenset[int], frozenset[int]]:
    """llama-fit-params' answer: -ngl (-1: all), the layers whose experts it keeps whole on the host, and the one
    it splits (some of its expert tensors on the host)."""
    ngl = int(re.search(r"-ngl (-?\d+)", line).group(1))
    ngl = facts.n_layer + 1 if ngl < 0 else ngl
    whole, split = set(), set()
    for entry in re.findall(r"blk\\\.(\d+)\\\.ffn_\(([^)]*)\)([^,\"]*)=CPU", line):
        (whole if "exps" in entry[2] else split).add(int(entry[0]))
    return ngl, frozenset(whole), frozenset(split)


def _on_gpu(facts: ModelFacts, s: Settings) -> int:
    """Layers on the GPU (dense), or expert layers whose experts are all on the GPU (mixture of experts)."""
    if not facts.moe_layers:
        return s.n_gpu_layers
    first = facts.n_layer + 1 - s.n_gpu_layers  # llama.cpp's layer rule: the last layers go to the GPU
    return len([il for il in facts.moe_layers if il >= first and il not in s.experts_on_host(facts.moe_layers)])


@pytest.mark.engine
def test_pressed_fit_against_llama_fit_params_fake_h200(tmp_path_factory, demo_model: Path) -> None:
    """bench/gpu_results.json: on an H200, ``llama-fit-params -c 8192 -fitt KEEP`` with a margin leaving room for
    ~60 % of each shape's weights. Here the same H200 (its probe) carries the equivalent budget, free less KEEP, and
    ``fit`` prices llama-fit-params' own settings (b 2048, ub 512, FA, f16 cache, sliding-window cache of the
    window's size; on a CUDA machine host weights are never repacked). Per shape: ours holds at least as many layers
    (dense) or expert layers (MoE) on the GPU, or llama-fit-params' answer is predicted over the budget and only by
    the GPU's fixed overhead, which the budget counts (it bounds the whole process) and llama-fit-params does not
    (it counts llama.cpp's buffers against the memory free after its own CUDA context). Ours is the most that fits.
    The shapes are header-only Q4_K files with the donor's whole vocabulary, as the GPU run wrote them."""
    recorded = json.loads(RESULTS.read_text())
    h200 = dataclasses.replace(Hardware.from_dict(recorded["probe"]["hardware"]), build=bundled)  # priced here
    base = Settings(n_ctx=8192, n_batch=2048, n_ubatch=512, flash_attn=True, swa_full=False, use_extra_bufts=False)
    d = tmp_path_factory.mktemp("pressed")
    compared = {}
    for row in recorded["fit"]["rows"]:
        shape, pressed = row["shape"], row["pressed"]
        facts = read_facts(synth.write_model(d / f"{shape}.gguf", demo_model, synth.SHAPES[shape], "Q4_K",
                                             header_only=True))
        free = h200.offload_gpus[0].vram_free
        hw = h200.with_gpu_budget(((free - pressed["keep_mib"] * MIB) // MIB,))
        ngl, whole, split = _theirs(pressed["llama_fit_params"], facts)
        theirs = base.replace(n_gpu_layers=ngl, moe_host_layers=layer_list(whole | split) if whole | split else "")
        ours = fit.placements(facts, hw, base)[-1][0]  # a MoE's row of llama-fit-params' kind: every layer on the GPU
        compared[shape] = (_on_gpu(facts, ours), _on_gpu(facts, theirs))
        assert memory.estimate(facts, ours, hw).fits or _on_gpu(facts, ours) == 0
        more = ours.replace(n_cpu_moe=ours.n_cpu_moe - 1) if ours.n_cpu_moe else ours.replace(
            n_gpu_layers=ours.n_gpu_layers + 1)
        if _on_gpu(facts, more) > _on_gpu(facts, ours):
            assert not memory.estimate(facts, more, hw).fits, f"{shape}: one more layer on the GPU fits"
        if compared[shape][0] < compared[shape][1]:
            gpu = memory.estimate(facts, theirs, hw).device("gpu0")
            assert gpu.total > gpu.room() >= gpu.total - gpu.overhead, f"{shape}: ours {compared[shape]} theirs"
    assert len(compared) == 7, compared
