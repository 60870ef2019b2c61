"""Which layers' weights stay in host memory: the experts of the first N, the last N or a chosen set of layers, and
the dense FFN weights of the first N (llama.cpp's --n-cpu-moe, -ot, --n-cpu-ffn). One Settings method names the
layers; the memory model, the engine's override list and every tool's spelling read it. Without a GPU a placement
moves no bytes (a tensor sent to the CPU still takes the CPU's extra buffers, exactly as a host layer's does), but
the engine names each tensor it overrides in its log: the bundled engine and llama.cpp's own server must name
exactly the tensors the memory model pins, and hold exactly the buffers it predicts."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest
import servers
from conftest import run_python

from autotune import engine, memory
from autotune.engine import bundled, external
from autotune.facts import synth
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import GPU, Hardware, probe
from autotune.memory.layout import HOST, MIB, pinned_to_host, placement, weight_buffers
from autotune.output import export
from autotune.search import oracle, space
from autotune.search.config import TunedRecord
from autotune.vocabulary import flags
from autotune.vocabulary.errors import SettingsError
from autotune.vocabulary.knobs import BY_NAME, Where
from autotune.vocabulary.settings import Settings, layer_list, parse_layers

GIB = 2**30
MOE = synth.Shape(n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, head_dim=64, arch="qwen3moe", n_expert=4,
                  n_expert_used=2, n_ff_exp=256)
DENSE = synth.Shape(n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=512)
# The placements checked against the engine: experts of the first 2, the last 2 and layers {0, 3}; dense FFN of 2
MOE_CASES = {"first": Settings(n_cpu_moe=2), "last": Settings(n_cpu_moe=2, moe_host_from="last"),
             "set": Settings(moe_host_layers="0,3")}
DENSE_CASES = {"ffn": Settings(n_cpu_ffn=2)}
PLACEMENT = ("n_cpu_moe", "moe_host_from", "moe_host_layers", "n_cpu_ffn")


@pytest.fixture(scope="module")
def models(demo_model, tmp_path_factory) -> dict[str, Path]:
    """Q4_K weights (repacked on x86 with AVX2 and on ARM with dot products), as sparse files: a few MiB to load."""
    d = tmp_path_factory.mktemp("placement")
    return {"moe": synth.write_model(d / "moe.gguf", demo_model, MOE, "Q4_K", header_only=True, vocab=2048),
            "dense": synth.write_model(d / "dense.gguf", demo_model, DENSE, "Q4_K", header_only=True, vocab=2048)}


# ------------------------------------------------------------------------------------------ the layers


def test_first_last_and_chosen_layers_count_like_llama_cpp():
    moe = range(1, 27)  # DeepSeek-V2-Lite: layer 0 is dense
    assert Settings(n_cpu_moe=3).experts_on_host(moe) == {1, 2}  # --n-cpu-moe 3: layers 0-2, dense 0 holds none
    assert Settings(n_cpu_moe=3, moe_host_from="last").experts_on_host(moe) == {24, 25, 26}
    assert Settings(n_cpu_moe=99, moe_host_from="last").experts_on_host(moe) == set(moe)
    assert Settings(n_cpu_moe=5, moe_host_layers="0-2,25-30").experts_on_host(moe) == {1, 2, 25, 26}  # set wins
    assert Settings(n_cpu_moe=4).experts_on_host(()) == frozenset()  # a dense model keeps no experts anywhere
    assert Settings(n_cpu_ffn=3).ffn_on_host() == {0, 1, 2} and Settings().ffn_on_host() == frozenset()
    assert parse_layers(" 0-2, 7 ,9-10") == {0, 1, 2, 7, 9, 10} and layer_list({0, 1, 2, 7, 9, 10}) == "0-2,7,9-10"


@pytest.mark.parametrize("changes, said", [
    ({"moe_host_from": "middle"}, "unknown moe_host_from 'middle': choose one of first, last"),
    ({"moe_host_layers": "3-1"}, "moe_host_layers '3-1' is not a layer set like 0-11,40-47"),
    ({"moe_host_layers": "0,,2"}, "moe_host_layers '0,,2' is not a layer set like 0-11,40-47"),
    ({"moe_host_layers": "blk.3"}, "moe_host_layers 'blk.3' is not a layer set like 0-11,40-47"),
    ({"n_cpu_ffn": -1}, "n_cpu_ffn must be 0 or more (got -1)"),
])
def test_bad_placements_are_refused_in_one_sentence(changes, said):
    with pytest.raises(SettingsError) as e:
        Settings(**changes).check()
    assert str(e.value) == said


def test_placement_knobs_are_searched_only_where_they_move_memory():
    def where(gpus: bool, moe: tuple[int, ...]) -> Where:
        return Where(n_layer=48, moe_layers=moe, uses_swa=False, logical_cores=8, gpus=gpus)

    order, ffn, ubatch = BY_NAME["moe_host_from"].domain, BY_NAME["n_cpu_ffn"].domain, BY_NAME["n_ubatch"].domain
    assert order(where(True, tuple(range(48)))) == ("first", "last") and order(where(False, tuple(range(48)))) is None
    assert order(where(True, ())) is None
    assert ffn(where(True, ())).high == 48 and ffn(where(False, ())) is None and ffn(where(True, (1, 2))) is None
    assert {4096, 8192} <= set(ubatch(where(True, ()))) and max(ubatch(where(False, ()))) <= 1024
    assert BY_NAME["moe_host_layers"].domain is None  # a chosen set is the user's (or a baseline's), not sampled


# ----------------------------------------------------------------------------------------- spellings


ROUND_TRIPS = [Settings(n_cpu_moe=3), Settings(n_cpu_moe=3, moe_host_from="last"), Settings(moe_host_layers="0-2,7"),
               Settings(n_cpu_ffn=2), Settings(n_cpu_ffn=2, n_cpu_moe=2, moe_host_from="last"),
               Settings(moe_host_layers="5", use_extra_bufts=False)]


@pytest.mark.parametrize("s", ROUND_TRIPS, ids=str)
def test_llama_server_placement_reads_back_as_the_same_layers(s):
    moe = tuple(range(1, 10))
    line = flags.server_flags(s, "m.gguf", moe)
    back = flags.parse_server_flags(["llama-server", *line])
    assert back.other == ()
    assert back.settings.experts_on_host(moe) == s.experts_on_host(moe)
    assert back.settings.ffn_on_host() == s.ffn_on_host()
    assert ("-ncmoe" in line) is (s.n_cpu_moe > 0 and not s.experts_by_layer())
    assert ("-ot" in line) is s.experts_by_layer()
    if not s.experts_by_layer():  # --n-cpu-moe / --n-cpu-ffn read back as written
        assert back.settings == s


def test_a_users_overrides_map_back_only_in_the_expert_and_ffn_shapes():
    cmd = flags.parse_server_flags(shlex.split(
        r"llama-server -m m.gguf -ncmoe 2 -ot 'blk\.(2|3)\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU,"
        r"blk\.9\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU,token_embd=CUDA0' -ot 'blk\.(0|1)\.ffn_(up|down|gate)\.=CPU'"
        r" -ot 'blk\.(4)\.ffn_(up|down|gate)\.=CPU'"))
    s = cmd.settings
    assert s.experts_on_host(range(12)) == {0, 1, 2, 3, 9} and s.moe_host_layers == "0-3,9" and s.n_cpu_moe == 0
    assert s.n_cpu_ffn == 2  # --n-cpu-ffn names the first N: layer 4 alone is not its shape
    assert cmd.other == ("-ot", "token_embd=CUDA0", "-ot", r"blk\.(4)\.ffn_(up|down|gate)\.=CPU")
    first = flags.parse_server_flags(["-m", "m", "-ot", r"blk\.(0|1|2)\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"])
    assert (first.settings.n_cpu_moe, first.settings.moe_host_layers) == (3, "")  # the first N read back as -ncmoe


def test_llama_bench_and_koboldcpp_name_the_layers_in_one_override_flag():
    s = Settings(n_cpu_moe=2, moe_host_from="last", n_cpu_ffn=1)
    bench = flags.bench_flags(s, "m.gguf", moe_layers=range(4))
    assert "-ncmoe" not in bench and "-ncffn" not in bench  # llama-bench has no --n-cpu-ffn
    assert bench[bench.index("-ot") + 1] == (r"blk\.(2|3)\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU;"
                                             r"blk\.(0)\.ffn_(up|down|gate)\.=CPU")
    kobold = export.koboldcpp_flags(s, "m.gguf", (0, 1, 2, 3))
    assert "--moecpu" not in kobold and kobold[kobold.index("--overridetensors") + 1].count("=CPU") == 2
    assert "--moecpu" in export.koboldcpp_flags(Settings(n_cpu_moe=2), "m.gguf")
    with pytest.raises(SettingsError, match="the model's expert layers are needed"):
        flags.server_flags(s, "m.gguf")  # the last N cannot be named without the model


def test_every_format_says_or_spells_the_placement(tmp_path):
    s = Settings(n_cpu_moe=2, moe_host_from="last", n_cpu_ffn=1)
    config = TunedRecord(s, {"path": str(tmp_path / "m.gguf"), "moe_layers": [0, 1, 2, 3]}, {})
    assert "-ot 'blk\\.(2|3)\\.ffn_" in export.render(config, "llama-server")
    assert "moe_host_layers='2-3', n_cpu_ffn=1, use_extra_bufts=True" in export.render(config, "python")
    for fmt in ("ollama", "lmstudio"):
        text = export.render(config, fmt)
        assert "counts them from the last layer" in text and "dense FFN weights of the first N layers" in text, fmt
    for fmt in ("llama-server", "llama-bench", "koboldcpp"):
        assert "has no setting" not in export.render(config, fmt), fmt
    del config.model["moe_layers"]  # and no model file to read them from: one clear line
    with pytest.raises(Exception, match="written layer by layer, which needs the model's layers"):
        export.render(config, "llama-server")


# -------------------------------------------------------------------------------------- fake GPU memory


def fake_gpu(vram_gib: float) -> Hardware:
    gpu = GPU(index=0, name="fake", backend="cuda", vram_total=int(vram_gib * GIB), vram_free=int(vram_gib * GIB))
    return Hardware(cpu_model="test", physical_cores=2, logical_cores=2, ram_total=64 * GIB, ram_available=64 * GIB,
                    cpu_features=engine.build_info().cpu_features, gpus=(gpu,), backend="cuda", can_offload=True,
                    build=engine.bundled)


def test_fake_gpu_each_placement_moves_exactly_its_tensors_to_the_host(isolated_cache, models):
    hw = fake_gpu(24)
    for name, cases in (("moe", MOE_CASES), ("dense", DENSE_CASES)):
        facts = read_facts(models[name])
        full = Settings(n_ctx=512, n_gpu_layers=facts.n_layer + 1, use_mmap=False, n_threads=1, n_threads_batch=1)
        base = weight_buffers(facts, full, hw, placement(facts, full, hw))[0]
        for case, s in cases.items():
            s = full.replace(**{k: getattr(s, k) for k in PLACEMENT})
            moved = weight_buffers(facts, s, hw, placement(facts, s, hw))[0]
            pinned = [facts.tensors[i] for i in pinned_to_host(facts, s)]
            layers = s.experts_on_host(facts.moe_layers) | s.ffn_on_host()
            assert pinned and {t.layer for t in pinned} == layers, case
            assert all(re.search(r"_exps|ffn_(up|down|gate)\.", t.name) for t in pinned), case
            size = sum(-(-t.n_bytes // 32) * 32 for t in pinned)
            assert base["gpu0"] - moved["gpu0"] == size and moved[HOST] - base[HOST] == size, case


def test_fake_gpu_micro_batches_that_cannot_fit_are_pruned_before_any_run(isolated_cache, demo_model):
    facts = read_facts(demo_model)
    roomy = space.build_space(fake_gpu(24), facts, 8192)
    assert {4096, 8192} <= set(roomy.params["n_ubatch"])
    tight = space.build_space(fake_gpu(1.3), facts, 8192)
    kept = tight.params.get("n_ubatch", (tight.base.n_ubatch,))
    assert 8192 not in kept and min(kept) == 256
    dropped = dataclasses.replace(tight, params={**tight.params, "n_ubatch": (8192,)})
    big = dropped.settings_from({"n_ubatch": 8192, "batch_factor": 1})
    assert big.n_batch == 8192 and not memory.estimate(facts, big, fake_gpu(1.3)).fits


# ------------------------------------------------------------------------------------------ the engine


def _cases(name: str) -> dict[str, Settings]:
    return {"none": Settings(), **(MOE_CASES if name == "moe" else DENSE_CASES)}


@pytest.mark.parametrize("name", ["moe", "dense"])
@pytest.mark.engine
def test_a_real_load_holds_what_the_estimate_says_for_each_placement(isolated_cache, models, name):
    """Per buffer at the load log's 0.01 MiB, with extra buffers on and both load modes: the host's plain weights
    (CPU or CPU_Mapped) and the extra buffers (AMX + CPU_REPACK), for every placement."""
    facts = read_facts(models[name])
    hw = probe(bundled, measure_bandwidth=False)
    for case, placed in _cases(name).items():
        for mmap in (False, True):
            s = placed.replace(use_extra_bufts=True, use_mmap=mmap, n_threads=1, n_threads_batch=1)
            real = engine.loaded_buffers(str(models[name]), s)
            weights, repack = weight_buffers(facts, s, hw, placement(facts, s, hw))
            extras = real.get("AMX", 0) + real.get("CPU_REPACK", 0)
            plain = real["CPU_Mapped" if mmap else "CPU"]
            assert abs(weights[HOST] - plain) <= 0.006 * MIB, (case, mmap, real, weights)
            assert abs(repack - extras) <= 0.011 * MIB, (case, mmap, real, repack)


def _overridden(log: str) -> set[str]:
    """The tensors the engine's loader says it overrode (a debug line per tensor)."""
    return set(re.findall(r"tensor (\S+) \(\d+ MiB \w+\) buffer type overridden to", log))


def _pinned_names(facts, s: Settings) -> set[str]:
    return {facts.tensors[i].name for i in pinned_to_host(facts, s)}


_LOG = """
import json
from llama_cpp import llama_cpp as C
lines = []
@C.llama_log_callback
def log(level, text, user_data):
    lines.append(text.decode())
C.llama_log_set(log, None)
{code}
print(json.dumps("".join(lines)))
"""


@pytest.mark.parametrize("name", ["moe", "dense"])
@pytest.mark.engine
def test_the_engine_overrides_exactly_the_tensors_the_estimate_pins(models, name):
    """The exported Python code (the bundled engine's own override list) loads a real Llama; its loader names
    the tensors it overrode: those of the chosen layers, experts or dense FFN, and no others."""
    facts = read_facts(models[name])
    for case, placed in _cases(name).items():
        s = placed.replace(n_ctx=512, use_mmap=False, use_mlock=False, use_extra_bufts=True, n_threads=1,
                           n_threads_batch=1)
        code = export.render(TunedRecord(s, {"path": str(models[name])}, {}), "python")
        log = run_python(_LOG.format(code=code))
        assert _overridden(log) == _pinned_names(facts, s), case
        assert case == "none" or _pinned_names(facts, s), case


@pytest.mark.engine
def test_verify_compares_each_device_with_the_engine(isolated_cache, models):
    """The dry run beside the estimate per device (compute and output from the log), the weights of each device
    from real loads; on a CPU-only engine that device is the host alone."""
    facts = read_facts(models["moe"])
    hw = probe(bundled, measure_bandwidth=False)
    grid = [s.replace(n_ctx=512, use_mmap=mmap, n_threads=1, n_threads_batch=1)
            for s in MOE_CASES.values() for mmap in (False, True)]
    rows = oracle.verify(facts, grid, hw, loads=True)
    for r in rows:
        assert r["error"] is None and abs(r["error_pct"]["weights"]) < 0.01, r
        host = r["devices"][HOST]
        assert set(host["engine"]) >= {"compute", "output", "weights"} and set(r["devices"]) == {HOST}
        for part in ("compute", "output"):
            assert abs(host["predicted"][part] - host["engine"][part]) <= 0.006 * MIB, (part, host)
        assert abs(host["predicted"]["weights"] - host["engine"]["weights"]) <= 0.016 * MIB, host  # up to 3 buffers


# ---------------------------------------------------------------------------------- the real llama-server


def _buffers(log: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"(\S+) model buffer size =\s+([\d.]+) MiB", log)}


def _serve_until_loaded(binary: Path, argv: list[str], log: Path) -> str:
    """Start llama-server (no warm-up decode) and return its log, debug lines included (-lv 5: the loader names each
    tensor it overrides), once the model is loaded and /health answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log, "w") as out:
        proc = servers.start([str(binary), *argv[1:], "--no-warmup", "-lv", "5", "--host", "127.0.0.1", "--port",
                              str(port)],
                             stdout=out, stderr=out)
    try:
        if not external.wait_healthy(proc, f"http://127.0.0.1:{port}", time.perf_counter() + 120):
            pytest.fail(f"llama-server did not load the model: {log.read_text()[-1500:]}")
        return log.read_text()
    finally:
        servers.stop(proc)


@pytest.mark.parametrize("name", ["moe", "dense"])
@pytest.mark.engine
def test_the_exported_llama_server_line_places_what_we_meant(reference_tool, models, tmp_path, name):
    """llama.cpp's own server, run with the line ``autotune export`` writes for each placement (load mode none,
    extra buffers on where the CPU's kernels survive them): its loader overrides exactly the tensors the memory model pins, and its plain CPU buffer
    and extra buffers equal the estimate for that build's CPU features (on a CPU alone the same for every
    placement: an override to the CPU still repacks, as a host layer does)."""
    facts = read_facts(models[name])
    hw = probe(bundled, measure_bandwidth=False)
    binary = reference_tool("llama-server")
    # On a CPU that announces AMX the native build's AMX kernel dies (SIGILL in ggml_backend_amx_mul_mat, in the
    # decode llama-server runs while loading, --no-warmup or not): there the extra buffers stay off, as autotune's
    # self-check turns them off; elsewhere (AVX2, NEON) they stay on and the repacked bytes are compared too.
    repack = "AMX_INT8" not in hw.cpu_features
    for case, placed in _cases(name).items():
        s = placed.replace(n_ctx=512, use_mmap=False, use_extra_bufts=repack, n_threads=1, n_threads_batch=1)
        config = TunedRecord(s, {"path": str(models[name])}, {})
        argv = shlex.split(export.render(config, "llama-server").splitlines()[-1])
        assert ("-ot" in argv) is s.experts_by_layer() and ("-ncffn" in argv) is (s.n_cpu_ffn > 0)
        log = _serve_until_loaded(binary, argv, tmp_path / f"{case}.log")
        assert _overridden(log) == _pinned_names(facts, s), case
        real = _buffers(log)
        weights, repack = weight_buffers(facts, s, hw, placement(facts, s, hw))
        assert real["CPU"] == pytest.approx(weights[HOST] / MIB, abs=0.006), (case, real, weights)
        assert real.get("AMX", 0) + real.get("CPU_REPACK", 0) == pytest.approx(repack / MIB, abs=0.011), (case, real)


@pytest.mark.engine
def test_the_exported_llama_bench_line_runs_with_the_overrides(reference_tool, models):
    """llama-bench takes the overrides as one test's -ot (entries split by ';'), the experts of the last layers
    and the dense FFN of the first together; extra buffers off, so no CPU's AMX kernel can crash the decode."""
    for name, s in (("moe", MOE_CASES["last"].replace(n_cpu_ffn=1)), ("dense", DENSE_CASES["ffn"])):
        s = s.replace(use_extra_bufts=False, use_mmap=False, n_threads=1, n_threads_batch=1)
        config = TunedRecord(s, {"path": str(models[name])}, {})
        argv = shlex.split(export.render(config, "llama-bench").splitlines()[-1])
        argv[argv.index("-p") + 1], argv[argv.index("-n") + 1], argv[argv.index("-r") + 1] = "16", "2", "1"
        done = subprocess.run([str(reference_tool("llama-bench")), *argv[1:]], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-1500:]
        rows = json.loads(done.stdout)
        written = argv[argv.index("-ot") + 1]
        assert len(rows) == 2 and all(r["avg_ts"] > 0 and r["tensor_buft_overrides"] == written for r in rows), rows

