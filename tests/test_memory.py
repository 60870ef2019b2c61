"""The memory model: formulas, GPU placement on described (fake) GPUs, honesty about unknown
architectures, and the accuracy bar against the engine's own dry run and a real load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from autotune.memory import fit
from autotune import cli, engine, memory
from autotune.facts import synth
from autotune.vocabulary.errors import ModelError, SettingsError
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import GPU, Hardware
from autotune.search import oracle
from autotune.vocabulary.settings import Settings, row_bytes

GIB = 2**30
MIB = 2**20
BOUNDS = {"weights": 2.0, "kv": 2.0, "compute": 10.0, "total": 5.0}  # % of the engine's figure


def host(ram: int = 64 * GIB, features: tuple[str, ...] | None = None) -> Hardware:
    """This machine's engine (CPU features decide repacking) with a stated amount of free RAM."""
    feats = engine.build_info().cpu_features if features is None else features
    return Hardware(cpu_model="test", physical_cores=2, logical_cores=2, ram_total=ram, ram_available=ram,
                    cpu_features=feats, build=engine.bundled)


def fake_gpus(*free_gib: float, ram: int = 64 * GIB, backend: str = "cuda") -> Hardware:
    gpus = tuple(GPU(index=i, name=f"fake{i}", backend=backend, vram_total=int(f * GIB), vram_free=int(f * GIB))
                 for i, f in enumerate(free_gib))
    return dataclasses.replace(host(ram, ("AVX2", "REPACK")), gpus=gpus, backend=backend, can_offload=True)


def S(**kw) -> Settings:
    return Settings(n_threads=1, n_threads_batch=1, **kw)


@pytest.fixture(scope="session")
def shapes(demo_model, tmp_path_factory) -> dict[str, Path]:
    """Header-only synthetic models (sparse files: no disk, any size) the dry run accepts. They keep 2,048
    of the donor's tokens: a full vocabulary costs seconds per file to write and read back."""
    d = tmp_path_factory.mktemp("shapes")

    def write(name: str, shape: synth.Shape, weight_type: str = "F16") -> Path:
        return synth.write_model(d / f"{name}.gguf", demo_model, shape, weight_type, header_only=True, vocab=2048)

    out = {k: write(k, synth.SHAPES[k]) for k in ("8b", "70b", "gemma3-4b", "qwen3-8b")}
    out["qwen2-14b"] = write("qwen2", dataclasses.replace(synth.SHAPES["14b"], arch="qwen2"))
    out["q4_0"] = write("q4_0", synth.SHAPES["135m"], "Q4_0")
    out["starcoder2"] = write("sc2", synth.Shape(arch="starcoder2"))
    return out


@pytest.fixture(scope="session")
def smol(demo_model):
    return read_facts(demo_model)


# -------------------------------------------------------------------------------------------- rules


def test_context_is_padded_to_256_and_ubatch_clamped(smol):
    e = memory.estimate(smol, S(n_ctx=1000, n_batch=256, n_ubatch=512), host())
    assert e.n_ctx == 1024 and e.n_ubatch == 256
    assert memory.estimate(smol, S(n_ctx=300, n_batch=2048, n_ubatch=2048), host()).n_ubatch == 512  # batch <= ctx


@pytest.mark.parametrize("tk,tv,fa", [("f16", "f16", False), ("q8_0", "f16", False), ("q8_0", "q8_0", True),
                                      ("q4_0", "q4_0", True)])
def test_kv_is_heads_times_head_dim_at_the_cache_row_size(smol, tk, tv, fa):
    e = memory.estimate(smol, S(n_ctx=4096, type_k=tk, type_v=tv, flash_attn=fa), host())
    width = smol.n_head_kv[0] * smol.head_dim_k  # GQA: 3 KV heads of 64, not 9 query heads
    assert e.kv_k == smol.n_layer * 4096 * row_bytes(tk, width)
    assert e.kv_v == smol.n_layer * 4096 * row_bytes(tv, width)
    assert row_bytes("q8_0", 32) == 34 and row_bytes("q4_0", 32) == 18
    assert e.device("host").kv == e.kv_k + e.kv_v


def test_sliding_window_layers_get_a_small_cache_unless_swa_full(shapes):
    g = read_facts(shapes["gemma3-4b"])
    n_swa = sum(g.swa_layers)
    assert g.n_swa == 1024 and 0 < n_swa < g.n_layer
    small = memory.estimate(g, S(n_ctx=32768, n_ubatch=512, swa_full=False), host())
    assert small.kv_cells == (32768, 1536)  # pad256(min(32768, 1024 + 512))
    full = memory.estimate(g, S(n_ctx=32768, swa_full=True), host())
    assert full.kv_cells == (32768, 32768)
    per_cell_layer = row_bytes("f16", g.n_head_kv[0] * g.head_dim_k) * 2
    assert full.kv_k + full.kv_v - (small.kv_k + small.kv_v) == n_swa * (32768 - 1536) * per_cell_layer


def test_compute_depends_on_flash_attention_ubatch_and_context(smol):
    def compute(**kw) -> int:
        return memory.estimate(smol, S(**kw), host()).device("host").compute

    no_fa, fa = compute(n_ctx=32768), compute(n_ctx=32768, flash_attn=True)
    assert abs(no_fa / MIB - 646.38) < 0.01 and abs(fa / MIB - 98.3) < 0.5  # the engine's own figures
    # without FA the KQ matrix (n_ctx x n_ubatch x n_head floats) dominates
    assert no_fa >= 32768 * 512 * smol.n_head * 4
    assert compute(n_ctx=32768, n_ubatch=128) < no_fa / 3
    assert compute(n_ctx=8192) < no_fa / 3


def test_output_buffer_is_one_row_of_logits(smol):
    assert memory.estimate(smol, S(), host()).device("host").output == smol.n_vocab * 4


def test_repack_rules_follow_ggml_cpu(shapes):
    avx2 = frozenset({"AVX2", "REPACK"})
    assert memory.layout.repack_ok("Q4_0", (576, 1536), avx2)
    assert not memory.layout.repack_ok("Q4_0", (576, 1532), avx2)  # rows must be a multiple of 8
    assert not memory.layout.repack_ok("Q6_K", (576, 1536), avx2)  # Q6_K repacks on ARM only
    assert memory.layout.repack_ok("Q6_K", (576, 1536), frozenset({"NEON", "DOTPROD", "REPACK"}))
    assert not memory.layout.repack_ok("Q4_0", (576, 1536), frozenset({"AVX2"}))  # engine built without repack
    f = read_facts(shapes["q4_0"])
    e = memory.estimate(f, S(), host(features=("AVX2", "REPACK"))).device("host")
    matrices = sum(t.n_bytes for t in f.tensors if t.layer is not None and len(t.shape) == 2)
    assert e.repack == matrices + f.token_embd_bytes  # tied output: the embedding's MUL_MAT copy is repacked
    assert f.weight_bytes - matrices < e.weights <= f.weight_bytes  # mmap: a range spanning repacked tensors
    unmapped = memory.estimate(f, S(use_mmap=False), host(features=("AVX2", "REPACK"))).device("host")
    assert unmapped.weights == f.weight_bytes - matrices and unmapped.repack == e.repack


@pytest.mark.parametrize("extra_bufts", [True, False])
@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.engine
def test_weights_and_extra_buffers_match_a_real_load(shapes, demo_model, extra_bufts, mmap):
    """On this machine's engine: CPU_REPACK on most x86 CPUs, the AMX buffer on Sapphire Rapids, nothing with
    extra buffers off (--no-repack)."""
    for path in (demo_model, shapes["q4_0"]):
        s = S(use_extra_bufts=extra_bufts, use_mmap=mmap)
        real = engine.loaded_buffers(str(path), s)
        e = memory.estimate(read_facts(path), s, host()).device("host")
        extra = {k: v for k, v in real.items() if k in ("AMX", "CPU_REPACK")}
        assert memory.as_logged(e.weights) == real["CPU_Mapped" if mmap else "CPU"]
        assert memory.as_logged(e.repack) == sum(extra.values())
        assert extra if extra_bufts and e.repack else not extra


def test_amx_buffer_rules_fake_amx_cpu(shapes):
    """A Sapphire Rapids CPU described (not this machine's): AMX takes the Q4_0 matrices before CPU_REPACK,
    with its packed size; extra buffers off leaves every weight in the mapped file."""
    amx = ("AVX2", "AVX512_VNNI", "AMX_INT8", "REPACK")
    assert memory.layout.amx_bytes("Q8_0", (576, 1536), 576 // 32 * 34 * 1536, frozenset(amx)) == 1536 * 18 * (34 + 4)
    assert memory.layout.amx_bytes("Q4_K", (576, 1536), 0, frozenset(amx)) == 0  # rows must hold whole 256-blocks
    assert memory.layout.amx_bytes("Q4_0", (576, 1530), 0, frozenset(amx)) == 0  # outputs must be a multiple of 32
    assert memory.layout.amx_bytes("Q4_0", (576, 1536), 0, frozenset(("AVX2", "REPACK"))) == 0
    f = read_facts(shapes["q4_0"])
    on = memory.estimate(f, S(), host(features=amx)).device("host")
    matrices = sum(t.n_bytes for t in f.tensors if t.layer is not None and len(t.shape) == 2)
    assert on.repack == matrices + f.token_embd_bytes  # Q4_0 packs to its own size; the tied output copied
    off = memory.estimate(f, S(use_extra_bufts=False), host(features=amx)).device("host")
    assert off.repack == 0 and off.weights == f.weight_bytes


def test_fits_keeps_a_margin_and_reports_the_shortfall(smol):
    assert memory.margin(4 * GIB) == 512 * MIB and memory.margin(100 * GIB) == 5 * GIB
    big = memory.estimate(smol, S(n_ctx=8192), host())
    assert big.fits and big.shortfall == 0
    need = big.device("host").total
    tight = memory.estimate(smol, S(n_ctx=8192), host(ram=need + 100 * MIB))
    assert not tight.fits and tight.shortfall == 512 * MIB - 100 * MIB


def test_max_ctx_is_the_largest_fitting_multiple_of_256(smol):
    s = S(flash_attn=True)
    hw = host(ram=memory.estimate(smol, s.replace(n_ctx=20000), host()).device("host").total + 512 * MIB)
    best = memory.max_ctx(smol, s, hw, limit=65536)
    assert best % 256 == 0 and 16384 < best <= 20224
    assert memory.estimate(smol, s.replace(n_ctx=best), hw).fits
    assert not memory.estimate(smol, s.replace(n_ctx=best + 256), hw).fits
    assert memory.max_ctx(smol, s, host()) == smol.n_ctx_train  # plenty of RAM: the trained context
    assert memory.max_ctx(smol, s, host(ram=GIB // 2)) == 0


def test_ctx_sweep_rows_per_kv_type_grow_with_context(smol):
    rows = memory.ctx_sweep(smol, S(), host(), [512, 2048, 8192], ["f16", "q8_0", "q4_0"])
    assert [(r["type_k"], r["type_v"]) for r in rows[::3]] == [("f16", "f16"), ("q8_0", "f16"), ("q4_0", "f16")]
    for i in range(0, 9, 3):
        assert rows[i]["total"] < rows[i + 1]["total"] < rows[i + 2]["total"]
    assert rows[5]["kv"] < rows[2]["kv"]  # q8_0 K is smaller than f16


def test_memory_report_to_json_is_the_stable_memory_json(smol):
    """``autotune memory --json`` and saved outputs read these keys in this order; the optional parts only
    appear when asked for and the peak's error only when the run measured one."""
    from autotune.memory.describe import Checked, DryRunCost, LargestCtx, MemoryReport, Peak, SweepPoint, Verified

    est = memory.estimate(smol, S(), host())
    bare = MemoryReport("m.gguf", "llama", ("a note",), est, DryRunCost(1, 2, 0.5, 0.75))
    assert bare.to_json() == {
        "model": "m.gguf",
        "architecture": "llama",
        "notes": ["a note"],
        "estimate": est.to_dict(),
        "dry_runs": {"children": 1, "settings": 2, "seconds": 0.5, "wall_s": 0.75},
    }
    point = SweepPoint(512, "f16", "f16", 10, 20, 30, 60, True)
    largest = LargestCtx("q8_0", "q8_0", 0, 0, None)
    verified = Verified({"kv": 1}, {"kv": 2}, {"kv": -50.0}, None, {"host": {}})
    peak = Peak(True, None, 100, 110, 90, 256, 64, -9.1)
    full = dataclasses.replace(bare, ctx_sweep=(point,), max_ctx=(largest,), check=Checked((verified,), peak))
    out = full.to_json()
    assert list(out) == ["model", "architecture", "notes", "estimate", "ctx_sweep", "max_ctx", "verify", "peak",
                         "dry_runs"]
    assert out["ctx_sweep"] == [{"n_ctx": 512, "type_k": "f16", "type_v": "f16", "weights": 10, "kv": 20,
                                 "compute": 30, "total": 60, "fits": True}]
    assert out["max_ctx"] == [{"type_k": "q8_0", "type_v": "q8_0", "n_gpu_layers": 0, "max_ctx": 0, "total": None}]
    assert out["verify"] == [{"predicted": {"kv": 1}, "engine": {"kv": 2}, "error_pct": {"kv": -50.0}, "error": None,
                              "devices": {"host": {}}}]
    assert list(out["peak"]) == ["ok", "error", "predicted_gpu", "peak_vram", "gpu_buffers", "depth", "prompt",
                                 "error_pct"]
    assert "error_pct" not in Peak(False, "died", 100, None, None, 256, 64).to_json()
    assert "peak" not in dataclasses.replace(full, check=Checked((verified,))).to_json()


def test_describe_answers_only_what_was_asked(smol):
    bare = memory.describe(smol, S(n_ctx=2048), host())
    assert bare.ctx_sweep is None and bare.max_ctx is None and bare.check is None
    assert bare.estimate.n_ctx == 2048 and bare.model == smol.path
    full = memory.describe(smol, S(n_ctx=2048), host(), sweep=True, largest=True)
    assert full.ctx_sweep and full.ctx_sweep[-1].n_ctx == smol.n_ctx_train
    assert full.max_ctx and {r.type_k for r in full.max_ctx} == {"f16", "q8_0", "q4_0"}
    assert list(full.to_json()) == ["model", "architecture", "notes", "estimate", "ctx_sweep", "max_ctx", "dry_runs"]


# -------------------------------------------------------------------------------- placement (fake)


def test_fake_gpu_output_layer_goes_first_then_the_last_layers(smol):
    n = smol.n_layer
    hw = fake_gpus(8)
    for ngl, layers, out in ((0, 0, False), (1, 0, True), (2, 1, True), (n, n - 1, True), (n + 1, n, True),
                             (n + 50, n, True)):
        e = memory.estimate(smol, S(n_gpu_layers=ngl), hw)
        assert (e.gpu_layers, e.output_on_gpu) == (layers, out), ngl
    where = memory.placement(smol, S(n_gpu_layers=3), hw)
    assert where.layers[-2:] == ("gpu0", "gpu0") and where.layers[-3] == "host" and where.output == "gpu0"


def test_fake_gpu_weights_kv_and_compute_move_with_the_layers(shapes):
    f = read_facts(shapes["8b"])  # tied embeddings: the output layer is a copy of token_embd
    hw = fake_gpus(24)
    cpu = memory.estimate(f, S(n_ctx=8192), hw)
    full = memory.estimate(f, S(n_ctx=8192, n_gpu_layers=f.n_layer + 1), hw)
    h, g = full.device("host"), full.device("gpu0")
    assert h.weights == f.token_embd_bytes  # the input layer always stays on the host
    assert g.weights >= sum(f.layer_bytes) + f.token_embd_bytes  # layers + the output copy of the embedding
    assert g.kv == cpu.device("host").kv and h.kv == 0
    assert g.compute > 0 and 0 < h.compute < g.compute  # host keeps the embedding lookup and the inputs
    assert h.repack == 0  # a CUDA host buffer type comes first: no CPU_REPACK
    no_kqv = memory.estimate(f, S(n_ctx=8192, n_gpu_layers=f.n_layer + 1, offload_kqv=False), hw)
    assert no_kqv.device("gpu0").kv == 0 and no_kqv.device("host").kv == g.kv
    half = memory.estimate(f, S(n_ctx=8192, n_gpu_layers=17), hw)
    assert half.gpu_layers == 16 and half.device("gpu0").kv == g.kv // 2


def test_fake_gpu_two_gpus_share_layers_by_free_memory(shapes):
    f = read_facts(shapes["8b"])
    e = memory.estimate(f, S(n_gpu_layers=f.n_layer + 1), fake_gpus(20, 10))
    per_layer = e.device("gpu0").kv // 22
    # split points at 2/3 and 1 of the 33 offloaded layers (output included): layers 0..21, then 22..31
    assert (e.device("gpu0").kv, e.device("gpu1").kv) == (22 * per_layer, 10 * per_layer)
    assert memory.placement(f, S(n_gpu_layers=33), fake_gpus(20, 10)).output == "gpu1"


def test_fake_gpu_fits_is_per_device(shapes):
    f = read_facts(shapes["8b"])
    e = memory.estimate(f, S(n_ctx=8192, n_gpu_layers=f.n_layer + 1), fake_gpus(8))
    assert e.device("host").fits() and not e.device("gpu0").fits() and not e.fits
    assert e.shortfall == e.device("gpu0").total - (8 * GIB - memory.margin(8 * GIB))


def test_fake_gpu_unified_memory_counts_everything_against_ram(shapes):
    f = read_facts(shapes["8b"])
    hw = fake_gpus(24, ram=12 * GIB, backend="metal")  # the GPU budget alone would fit
    e = memory.estimate(f, S(n_ctx=8192, n_gpu_layers=f.n_layer + 1), hw)
    assert e.shared_memory and e.device("gpu0").fits() and not e.fits


# --------------------------------------------------------------------------------------- honesty


@pytest.mark.engine
def test_a_file_the_engine_cannot_load_gets_the_engines_reason(shapes, smol):
    """No architecture is refused up front: the engine's dry run answers, and where the engine itself refuses
    the file (this synthetic starcoder2 lacks a key), that reason is the one line the user sees."""
    with pytest.raises(ModelError, match="the engine refuses this model: .*key not found"):
        memory.estimate(read_facts(shapes["starcoder2"]), S(), host())
    with pytest.raises(ModelError, match="the engine refuses this model: .*key not found"):  # not "0 fits"
        fit.fit(read_facts(shapes["starcoder2"]), host(), 4096)
    experts = dataclasses.replace(smol.tensors[-1], name="blk.0.ffn_up_exps.weight")
    assert "mixture-of-experts" in memory.replay_gap(dataclasses.replace(smol, tensors=smol.tensors + (experts,)))
    assert memory.replay_gap(smol) is None


@pytest.mark.engine
def test_cli_memory_errors_are_one_line(shapes, demo_model, capsys):
    assert cli.main(["memory", str(shapes["starcoder2"])]) == 2
    err = capsys.readouterr().err
    assert "key not found" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["memory", str(demo_model), "--type-v", "q8_0"]) == 2
    assert "flash attention" in capsys.readouterr().err
    assert cli.main(["memory", str(demo_model), "--ctx", "0"]) == 2
    with pytest.raises(SettingsError):
        memory.estimate(read_facts(demo_model), S(type_k="q9"), host())


def test_cli_memory_warns_beyond_the_trained_context(demo_model, capsys):
    assert cli.main(["memory", str(demo_model), "--ctx", "100000"]) == 0
    out = capsys.readouterr().out
    assert "beyond the 8,192 tokens this model was trained for" in " ".join(out.split())
    assert cli.main(["memory", str(demo_model), "--ctx", "8192"]) == 0
    assert "trained for" not in capsys.readouterr().out


@pytest.mark.engine
def test_cli_memory_json_is_stable(demo_model, capsys):
    import json

    assert cli.main(["memory", str(demo_model), "--ctx", "2048", "--json", "--ctx-sweep", "--max-ctx", "--verify"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"model", "architecture", "notes", "estimate", "ctx_sweep", "max_ctx", "verify"}
    assert all(abs(v) <= BOUNDS.get(k, 2.0) for k, v in out["verify"][0]["error_pct"].items())
    est = out["estimate"]
    assert est["n_ctx"] == 2048 and est["devices"][0]["device"] == "host"
    assert set(est["devices"][0]) >= {"weights", "repack", "kv", "compute", "output", "overhead", "total", "budget",
                                      "margin", "fits"}
    assert {r["type_k"] for r in out["max_ctx"]} == {"f16", "q8_0", "q4_0"}


# ------------------------------------------------------------------------------ accuracy (dry run)


def grid(ctxs: tuple[int, ...], swa: bool) -> list[Settings]:
    out = []
    for n in ctxs:
        for fa in (False, True):
            for tk, tv in memory.cache_pairs(("f16", "q8_0", "q4_0"), fa):
                for swa_full in ((True, False) if swa else (True,)):
                    out.append(S(n_ctx=n, flash_attn=fa, type_k=tk, type_v=tv, swa_full=swa_full))
    out.append(S(n_ctx=8192, n_batch=2048, n_ubatch=256, flash_attn=True))
    out.append(S(n_ctx=8192, n_batch=2048, n_ubatch=2048))
    return out


@pytest.mark.parametrize("model", ["demo", "8b", "70b", "gemma3-4b", "qwen3-8b", "qwen2-14b"])
@pytest.mark.engine
def test_accuracy_against_the_dry_run(model, shapes, demo_model):
    facts = read_facts(demo_model if model == "demo" else shapes[model])
    rows = oracle.verify(facts, grid((512, 8192, 32768, 131072), facts.uses_swa), host())
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    for r in rows:
        for k, bound in BOUNDS.items():
            assert abs(r["error_pct"][k]) <= bound, (k, r["settings"], r["predicted"], r["engine"])


def test_a_described_machine_without_an_engine_build_is_priced_by_the_replay_only(smol):
    """A Hardware that names no engine build (``build=None``) is never priced by an engine it did not name: a model
    the replay prices still is, one that needs the dry run is refused in one sentence."""
    hw = dataclasses.replace(host(), build=None)
    assert memory.estimate(smol, S(n_ctx=512), hw).source == memory.REPLAY
    other = dataclasses.replace(smol, architecture="mamba")
    with pytest.raises(ValueError, match="names no engine build"):
        memory.estimate(other, S(n_ctx=512), hw)


@pytest.mark.engine
def test_verify_on_an_architecture_without_replay_predicts_the_weights(smol, demo_model):
    """A model the replay does not price (here: the demo model under another architecture's name) is
    estimated from the engine's dry run; verify still checks the weights placed from the tensor table."""
    other = dataclasses.replace(smol, architecture="mamba")
    (row,) = oracle.verify(other, [S(n_ctx=512)], host())
    assert row["error"] is None and row["source"] == memory.DRY_RUN
    assert row["engine"]["kv"] > 0 and abs(row["error_pct"]["weights"]) < 0.01
