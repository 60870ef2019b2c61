"""The offload bench's CPU half (bench/offload_bench.py): reading llama-fit-params' answers as recorded on the H200,
the command lines from the knob table, the rotation, the spread, resuming a partial run, the markdown, and the
refusal to run without a GPU. The GPU half runs on a GPU machine (bash bench/offload_device.sh)."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.search.recommend import Spread
from autotune.vocabulary.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("offload_bench", ROOT / "bench" / "offload_bench.py")
ob = importlib.util.module_from_spec(spec)
sys.modules["offload_bench"] = ob
spec.loader.exec_module(ob)


def recorded(shape: str) -> str:
    """The pressed llama-fit-params line recorded for ``shape`` by the GPU check (bench/gpu_results.json)."""
    rows = json.loads((ROOT / "bench" / "gpu_results.json").read_text())["fit"]["rows"]
    return next(r for r in rows if r["shape"] == shape)["pressed"]["llama_fit_params"]


def test_fit_answer_for_a_moe_keeps_the_last_layers_experts_on_the_host():
    a = ob.parse_fit("llama_model_loader: noise before\n" + recorded("qwen3-30b-a3b") + "\n")
    assert (a.n_ctx, a.n_gpu_layers) == (8192, 49)
    assert a.whole_expert_layers() == list(range(24, 49))  # 48 is the output layer's number: matches nothing
    assert a.boundary() == {"layer": 23, "on_host": ["gate", "gate_up", "down"]} and a.unread() == []
    placed = a.placement(48, tuple(range(48)))
    assert placed["n_gpu_layers"] == 49 and placed["n_cpu_moe"] == 25 and placed["moe_host_from"] == "last"
    s = Settings(**placed)
    assert s.experts_on_host(range(48)) == frozenset(range(23, 48))  # the split layer counted on the host
    ot = a.bench_ot()
    assert ot[0] == "-ot" and "," not in ot[1] and ot[1].count(";") == len(a.overrides) - 1  # one llama-bench test


def test_fit_answer_for_gpt_oss_and_dense_shapes():
    a = ob.parse_fit(recorded("gpt-oss-20b"))
    assert a.n_gpu_layers == 25 and a.boundary()["layer"] == 11 and a.whole_expert_layers() == list(range(12, 25))
    assert Settings(**a.placement(24, tuple(range(24)))).experts_on_host(range(24)) == frozenset(range(11, 24))
    dense = ob.parse_fit(recorded("8b"))
    assert (dense.n_ctx, dense.n_gpu_layers, dense.overrides) == (8192, 11, ())
    assert dense.placement(32, ())["n_gpu_layers"] == 11 and dense.bench_ot() == []
    whole = ob.parse_fit("-c 131072 -ngl -1")
    assert whole.placement(32, ())["n_gpu_layers"] == 33
    with pytest.raises(ValueError, match="no answer line"):
        ob.parse_fit("llama_fit_params: failed to fit CLI arguments to free memory, exiting...")


def test_command_lines_are_spelled_from_the_knob_table(tmp_path):
    from autotune import engine

    d = engine.llama_cpp_defaults(ob.CTX)
    fit = ob.fit_argv("llama-fit-params", d, "m.gguf")
    assert fit[:3] == ["llama-fit-params", "-m", "m.gguf"]
    joined = " ".join(fit)
    for part in ("-c 6400", "-b 2048", "-ub 512", "-ctk f16", "-ctv f16", "-fa auto", "-fitt 1024"):
        assert part in joined
    last = d.replace(n_gpu_layers=49, n_cpu_moe=20, moe_host_from="last")
    argv = ob.bench_argv("llama-bench", last, "m.gguf", tuple(range(48)), fa_auto=True)
    assert argv[argv.index("-fa") + 1] == "auto" and argv[argv.index("-ngl") + 1] == "49"
    assert argv.count("-ot") == 1 and "," not in argv[argv.index("-ot") + 1] and "-ncmoe" not in argv
    for flag, value in (("-p", "2048"), ("-n", "128"), ("-d", "4096"), ("-o", "json")):
        assert argv[argv.index(flag) + 1] == value


def test_rotation_starts_each_round_one_config_later():
    assert ob.rotation(["a", "b", "c"], 3) == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"),
                                               (2, "c"), (2, "a"), (2, "b")]


def test_spread_is_the_median_and_interquartile_range_of_recommend():
    rng = random.Random(3)
    for n in (1, 2, 3, 4, 7):
        values = [rng.uniform(10, 100) for _ in range(n)]
        mine, theirs = ob.spread(values), Spread.of(values)
        assert mine["n"] == n
        for k in ("median", "q25", "q75"):
            assert mine[k] == pytest.approx(getattr(theirs, k))
    assert ob.spread([])["n"] == 0


def _case(done: list[tuple[int, str, bool]], budget: int = 12288) -> dict:
    runs = [{"round": r, "config": c, "ok": ok, "prefill": [100.0 + r] if ok else [],
             "decode": [10.0 + r] if ok else [], "peak_mib": 11000} for r, c, ok in done]
    return {"shape": "qwen3-30b-a3b", "budget_mib": budget, "plan": {}, "search": {"settings": {}},
            "configs": {name: {"argv": ["llama-bench"], "settings": {}} for name in ob.CONFIGS}, "runs": runs}


def test_a_partial_run_resumes_where_it_stopped():
    fit, most, auto = ob.CONFIGS
    case = _case([(0, fit, True), (0, most, True), (0, auto, True), (1, most, True), (1, auto, False)])
    assert ob.pending(case) == [(1, auto), (1, fit), (2, auto), (2, fit), (2, most)]  # the failed run again
    assert ob.unfinished(case)
    whole = _case([(r, c, True) for r, c in ob.rotation(list(ob.CONFIGS), ob.BENCH["rounds"])])
    assert ob.pending(whole) == [] and not ob.unfinished(whole)
    assert ob.needs_search({"configs": {}, "search": {"error": "skipped: 100 s left"}})
    assert not ob.needs_search({"configs": {}, "search": {"rc": 1, "log_tail": "..."}})  # a failed search is kept


def test_a_config_that_only_crashed_is_not_run_again():
    fit, most, auto = ob.CONFIGS
    case = _case([(0, fit, False)])
    assert ob.pending(case) == [(0, most), (0, auto), (1, auto), (1, most), (2, most), (2, auto)]


def test_summary_and_markdown(tmp_path):
    fit, most, auto = ob.CONFIGS
    case = _case([(r, c, True) for r, c in ob.rotation(list(ob.CONFIGS), 3)], budget=12288)
    for row in case["runs"]:
        if row["config"] == auto:
            row["prefill"], row["decode"] = [300.0 + row["round"]], [20.0 + row["round"]]
        if row["config"] == most and row["round"] == 2:
            row["peak_mib"] = 12500  # over the budget
    s = ob.summarize(case)
    assert s[auto]["ratio"]["prefill"] == pytest.approx(301 / 101) and s[auto]["versus_fit"]["decode"] == "better"
    assert s[fit]["versus_fit"]["prefill"] == "same" and s[most]["within_budget"] is False and s[fit]["within_budget"]
    case["summary"] = s
    text = ob.markdown({"plan": {"bench": ob.BENCH}, "cases": {"qwen3-30b-a3b@12288": case}})
    assert "## qwen3-30b-a3b at a 12,288 MiB budget" in text
    assert f"| {auto} | 301 (300-302) | 21.0 (20.5-21.5) | x2.98 better / x1.91 better | 11000 | True |" in text
    assert f"| {most} |" in text and "| 12500 | False |" in text
    empty = ob.markdown({})
    assert "Nothing has run yet" in empty and "| qwen3-30b-a3b | 12,288 MiB |" in empty


def test_the_committed_results_render_as_committed():
    """bench/offload_results.md is the rendering of bench/offload_results.json (nothing typed by hand)."""
    path = ROOT / "bench" / "offload_results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    assert (ROOT / "bench" / "offload_results.md").read_text() == ob.markdown(data)


def _has_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: the bench would run")
def test_refuses_to_run_without_a_gpu_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "offload_bench.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("offload_bench: no NVIDIA GPU here")
    assert "offload_device.sh" in lines[0]
    assert not (tmp_path / "offload_results.json").exists()


@pytest.mark.engine
def test_one_tiny_case_end_to_end_on_the_cpu(demo_model, reference_tool, tmp_path):
    """The whole bench with the reference CPU llama.cpp (``--cpu``: no ballast, budgets unchecked) on a header-only
    135m shape at small sizes: llama-fit-params' answer read, ``autotune search`` run, every planned llama-bench run
    recorded (on a machine where the engine crashes with extra buffers on, as a failure with its reason), the JSON
    and the markdown written; a second call finds nothing left."""
    bench_bin, _ = reference_tool("llama-bench"), reference_tool("llama-fit-params")
    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "bench" / "offload_bench.py"), "--cpu", "--out", str(out), "--work",
            str(tmp_path / "work"), "--donor", str(demo_model), "--llama-bin", str(bench_bin.parent),
            "--cases", "135m@1024", "--sizes", "64,16,64,1,2", "--search-trials", "3"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads((out / "offload_results.json").read_text())
    case = data["cases"]["135m@1024"]
    assert "error" not in case, case.get("error")
    assert case["plan"]["fit_rc"] == 0 and case["plan"]["fit_line"].startswith("-c ")
    assert case["search"]["rc"] == 0 and case["search"]["wall_s"] > 0, case["search"]["log_tail"]
    assert set(case["configs"]) == set(ob.CONFIGS)
    for name in ob.CONFIGS:  # every round of it, or a crash recorded with its reason (and not run again)
        rows = [r for r in case["runs"] if r["config"] == name]
        ok = [r for r in rows if r["ok"]]
        assert ({r["round"] for r in ok} == {0, 1} and len(rows) >= 2) or (rows and not ok), (name, rows)
        for r in rows:
            assert (r["ok"] and min(r["prefill"] + r["decode"]) > 0) or r["stderr_tail"] is not None
            assert r["peak_mib"] is None and r["within_budget"] is None
    assert any(r["ok"] for r in case["runs"]) and ob.pending(case, 2) == []
    assert (out / "offload_results.md").read_text() == ob.markdown(data)
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "135m@1024: done before" in again.stdout


def test_what_autotune_changed_is_read_against_fits_settings():
    fit = Settings(n_ctx=6400, n_gpu_layers=49, n_cpu_moe=25, moe_host_from="last", n_ubatch=512)
    ours = fit.replace(n_cpu_moe=27, moe_host_from="first", n_ubatch=4096, n_batch=4096, n_threads_batch=3)
    case = {"configs": {ob.CONFIGS[0]: {"settings": fit.to_dict()}, ob.CONFIGS[2]: {"settings": ours.to_dict()}}}
    assert ob.changes(case) == {"n_batch": [512, 4096], "n_ubatch": [512, 4096], "n_cpu_moe": [25, 27],
                                "moe_host_from": ["last", "first"]}
    assert ob.changes({"configs": {ob.CONFIGS[0]: {"settings": fit.to_dict()}}}) == {}
