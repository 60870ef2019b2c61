"""Serving: the load generator's bounds (request count, time limit, loopback only) against a scripted stand-in
for llama-server's streaming ``/completion`` on loopback, and the serving study's decisions."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import optuna
import pytest

from autotune import cli, memory
from autotune.engine import loadgen
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import Hardware
from autotune.output import plots
from autotune.search import space
from autotune.stages import serving
from autotune.vocabulary import flags
from autotune.vocabulary.errors import SettingsError
from autotune.vocabulary.knobs import NGRAM_KINDS
from autotune.vocabulary.settings import Settings

GIB = 2**30


class Scripted(ThreadingHTTPServer):
    """Streams ``n_predict`` chunks per request, or (``stall``) sends one chunk and then nothing until released."""

    daemon_threads = True

    def __init__(self, stall: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.stall = stall
        self.release = threading.Event()
        self.seen: list[dict] = []
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.seen.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = body["n_predict"]
        for i in range(n):
            last = i == n - 1
            chunk = {"content": "x", "stop": last}
            if last:
                chunk["timings"] = {"predicted_n": n}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            if self.server.stall:
                self.server.release.wait()
                return


@pytest.fixture
def server(request) -> Iterator[Scripted]:
    srv = Scripted(stall=getattr(request, "param", False))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def url(srv: Scripted) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def test_the_load_sends_exactly_its_requests_from_its_users(server):
    reqs = loadgen.requests_for(list(range(1000)), 7)
    result = loadgen.run(url(server), reqs, users=3, time_limit=60)
    assert len(server.seen) == 7 and result.failed == 0 and not result.timed_out
    assert sorted(len(b["prompt"]) for b in server.seen) == sorted(len(r.prompt) for r in reqs)
    assert sum(d.tokens for d in result.done) == sum(r.n_predict for r in reqs)
    assert sorted(d.user for d in result.done) == [0, 0, 0, 1, 1, 2, 2]
    assert result.throughput > 0 and result.ttft(0.95) is not None and result.truncated == 0


def test_requests_follow_the_shipped_mix_and_share_no_prefix():
    reqs = loadgen.requests_for(list(range(5000)), 10)
    assert [(len(r.prompt), r.n_predict) for r in reqs] == [loadgen.MIX[i % len(loadgen.MIX)] for i in range(10)]
    assert len({tuple(r.prompt[:8]) for r in reqs}) == 10


@pytest.mark.parametrize("server", [True], indirect=True)
def test_a_stalled_server_costs_the_time_limit_not_a_hang(server):
    reqs = loadgen.requests_for(list(range(1000)), 8)
    start = time.perf_counter()
    result = loadgen.run(url(server), reqs, users=2, time_limit=1.0)
    assert time.perf_counter() - start < 3.0  # the stall lasts until teardown: a hang would never return
    assert result.timed_out and result.failed == 8  # 2 stalled in flight, 6 never sent
    assert len(server.seen) == 2 and all(d.error == "time limit" for d in result.done)


@pytest.mark.parametrize("address", ["http://10.0.0.7:8080", "http://example.com:80", "http://0.0.0.0:8080",
                                     "http://192.168.1.2"])
def test_the_load_generator_refuses_any_address_but_loopback(address):
    with pytest.raises(SettingsError, match="loopback"):
        loadgen.run(address, loadgen.requests_for([1, 2, 3], 2), users=1, time_limit=5)


def test_loopback_addresses_are_accepted():
    for address in ("http://127.0.0.1:8080/", "http://localhost:9", "http://[::1]:8080", "http://127.0.0.2:1"):
        assert loadgen.check_loopback(address) == address.rstrip("/")


# ------------------------------------------------------------------------------------ the serving study


def served_rows(throughputs: list[float], **load) -> list[dict]:
    base = {"ok": True, "failed": 0, "truncated": 0, "ttft_p50": 0.5, "ttft_p95": 1.0, "user_tps": 10.0}
    return [{**base, **load, "throughput": t} for t in throughputs]


def result_with(rows: dict[str, list[dict]]) -> serving.ServeResult:
    return serving.ServeResult("s", "llama-server defaults", None, ["-m", "m.gguf"], rows, "", False, (1, 2, 4), {}, [])


def test_a_saved_result_reads_back_the_same():
    tuned = result_with({"trial 3": served_rows([60, 62]), "llama-server defaults": served_rows([40, 41])})
    tuned.chosen, tuned.settings, tuned.command = "trial 3", Settings(n_parallel=4), ["-m", "m.gguf", "-np", "4"]
    for result in (tuned, result_with({"llama-server defaults": served_rows([40])})):
        saved = json.loads(json.dumps(result.to_json()))
        assert serving.ServeResult.from_json(saved) == result
        assert serving.ServeResult.from_json({"model": "m", "users": 4, **saved}) == result  # the bench's rows


def test_a_tuned_server_is_chosen_only_when_its_throughput_beats_the_defaults_beyond_the_noise():
    tuned = Settings(n_parallel=4, kv_unified=True)
    flags = {"trial 3": ["-m", "m.gguf", "-np", "4", "--kv-unified"], "llama-server defaults": ["-m", "m.gguf"]}
    won = result_with({"trial 3": served_rows([60, 62, 61, 63]), "llama-server defaults": served_rows([40, 41, 42, 40])})
    serving._decide(won, flags, {"trial 3": tuned}, serving.ServeOptions())
    assert won.supported and won.chosen == "trial 3" and won.settings == tuned and "--kv-unified" in won.command
    assert "x1.52" in won.verdict  # medians 61.5 and 40.5
    assert "p95 time to first token 1.00 vs 1.00 s" in won.verdict

    close = result_with({"trial 3": served_rows([44, 40, 46, 41]), "llama-server defaults": served_rows([40, 43, 42, 41])})
    serving._decide(close, flags, {"trial 3": tuned}, serving.ServeOptions())
    assert not close.supported and close.chosen == "llama-server defaults" and close.command == ["-m", "m.gguf"]
    assert "overlap" in close.verdict


def test_a_tuned_server_outside_the_users_bounds_is_not_chosen_however_fast():
    flags = {"trial 1": ["-m", "m.gguf", "-np", "8"], "llama-server defaults": ["-m", "m.gguf"]}
    slow_first_token = result_with({"trial 1": served_rows([90, 91, 92, 93], ttft_p95=4.0),
                                    "llama-server defaults": served_rows([40, 41, 42, 40])})
    serving._decide(slow_first_token, flags, {"trial 1": Settings(n_parallel=8)}, serving.ServeOptions(max_ttft=2.0))
    assert slow_first_token.chosen == "llama-server defaults" and "within the bounds" in slow_first_token.verdict


def test_llama_servers_defaults_carry_the_self_checks_switch_in_the_knob_tables_spelling():
    """The side-by-side's reference is llama-server as a user starts it: the model alone, or, where the self-check
    pinned extra buffers off, with that switch as the knob table spells it (read back as the same setting)."""
    assert serving.defaults_flags("m.gguf", {}) == ("llama-server defaults", ["-m", "m.gguf"])
    label, argv = serving.defaults_flags("m.gguf", {"use_extra_bufts": False, "flash_attn": False})
    assert (label, argv) == ("llama-server defaults with --no-repack", ["-m", "m.gguf", "--no-repack"])
    assert flags.parse_server_flags(argv).settings.use_extra_bufts is False


def test_serve_tune_flags_default_to_the_options_defaults():
    args = cli.build_parser().parse_args(["serve-tune"])
    assert cli._options(serving.ServeOptions, args) == serving.ServeOptions()


def test_constraints_count_failed_and_truncated_requests_and_the_bounds():
    load = {"failed": 1, "truncated": 2, "ttft_p95": 3.0, "user_tps": 5.0}
    c = serving.constraints(load, serving.ServeOptions(max_ttft=2.0, min_user_tps=8.0))
    assert c == {"failed": 3.0, "ttft_p95": 1.0, "user_tps": 3.0}
    assert serving.constraints({**load, "failed": 0, "truncated": 0}, serving.ServeOptions()) == {"failed": 0.0}


def test_slot_counts_are_the_ones_the_memory_model_fits_fake_hardware(demo_model):
    facts = read_facts(str(demo_model))
    base = Settings(n_threads=2, n_threads_batch=2, use_extra_bufts=False)
    roomy = Hardware(cpu_model="fake", physical_cores=2, logical_cores=2, ram_total=64 * GIB, ram_available=64 * GIB,
                     cpu_features=())
    assert serving.slot_choices(facts, roomy, base, users=8, ctx_per_user=1024) == (1, 2, 4, 8)
    assert serving.slot_choices(facts, roomy, base, users=6, ctx_per_user=1024) == (1, 2, 4, 6)
    one = memory.estimate(facts, base.replace(n_ctx=32768), roomy).device(memory.HOST).total
    tight = dataclasses.replace(roomy, ram_total=int(one * 2.2), ram_available=int(one * 2.2))
    fitting = serving.slot_choices(facts, tight, base, users=8, ctx_per_user=32768)
    assert fitting and 8 not in fitting and fitting == tuple(sorted(fitting))
    tiny = dataclasses.replace(roomy, ram_total=64 * 2**20, ram_available=64 * 2**20)
    assert serving.slot_choices(facts, tiny, base, users=4, ctx_per_user=32768) == ()


def test_the_serving_space_searches_slots_and_a_unified_cache_not_mmap(demo_model):
    facts = read_facts(str(demo_model))
    hw = Hardware(cpu_model="fake", physical_cores=2, logical_cores=2, ram_total=64 * GIB, ram_available=64 * GIB,
                     cpu_features=())
    sp = serving.serving_space(space.build_space(hw, facts, 1024), (1, 2, 4))
    assert sp.params["n_parallel"] == (1, 2, 4) and set(sp.params["kv_unified"]) == {True, False}
    assert "use_mmap" not in sp.params and "use_mlock" not in sp.params
    s = serving.sized(sp.base.replace(n_parallel=4), 1024)
    assert s.n_ctx == 4096


def test_serve_tune_searches_n_gram_speculation_only_when_asked(demo_model):
    facts = read_facts(str(demo_model))
    hw = Hardware(cpu_model="fake", physical_cores=2, logical_cores=2, ram_total=64 * GIB, ram_available=64 * GIB,
                  cpu_features=())
    base = space.build_space(hw, facts, 1024)
    assert "spec_type" not in serving.serving_space(base, (1, 2)).params
    kinds = serving.serving_space(base, (1, 2), spec=True).params["spec_type"]
    assert kinds[0] == "none" and set(kinds[1:]) == set(NGRAM_KINDS)


def test_a_speculating_contender_is_measured_beside_itself_without_speculation():
    def trial(value: float, s: Settings) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(value=value, user_attrs={"settings": s.to_dict()})

    plain = Settings(n_parallel=4)
    trials = [trial(10.0, plain), trial(12.0, plain.replace(spec_type="ngram-mod", ngram_mod_min=4)),
              trial(1.0, plain.replace(n_parallel=2))]
    for number, t in enumerate(trials):
        t.number = number
    got = serving.contenders(trials, top_k=2)
    assert list(got) == ["trial 1", "trial 1 without speculation", "trial 0"]
    assert got["trial 1 without speculation"] == plain and got["trial 1"].spec_type == "ngram-mod"
    line = flags.server_flags(got["trial 1"], "m.gguf")
    assert line[line.index("--spec-type") + 1] == "ngram-mod" and "--spec-ngram-mod-n-min" in line
    assert "--spec-type" not in flags.server_flags(got["trial 1 without speculation"], "m.gguf")


def test_slots_and_a_unified_cache_reach_the_llama_server_line_and_back():
    s = Settings(n_ctx=4096, n_parallel=4, kv_unified=True)
    line = flags.server_flags(s, "m.gguf")
    assert line[line.index("-np") + 1] == "4" and "--kv-unified" in line
    assert flags.parse_server_flags(line).settings == s
    assert "--kv-unified" not in flags.server_flags(Settings(), "m.gguf")


@pytest.mark.parametrize("argv,needle", [(["--users", "0"], "--users must be at least 1"),
                                         (["--ctx-per-user", "8"], "--ctx-per-user must be at least 64"),
                                         (["--max-ttft", "-1"], "--max-ttft must be positive")])
def test_serve_tune_refuses_bad_numbers_in_one_line(argv, needle, capsys):
    assert cli.main(["serve-tune", *argv]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


@pytest.mark.engine
def test_a_real_llama_server_under_a_real_load(tiny_model, reference_tool):
    """The reference llama-server (built once from the vendored source), the tiny model, 2 users."""
    binary = reference_tool("llama-server")
    s = Settings(n_ctx=1024, n_parallel=2, kv_unified=True, n_threads=2, n_threads_batch=2, use_extra_bufts=False)
    served = serving.measure(binary, str(tiny_model), flags.server_flags(s, str(tiny_model)), users=2, n_requests=4,
                             time_limit=120, label="tiny")
    assert served.ok, served.error
    load = served.load
    assert load["requests"] == 4 and load["failed"] == 0 and load["truncated"] == 0
    assert load["throughput"] > 0 and load["ttft_p95"] >= load["ttft_p50"] > 0 and served.peak_rss > 0
    drafting = serving.measure(binary, str(tiny_model), flags.server_flags(s.replace(spec_type="ngram-simple"),
                                                                          str(tiny_model)),
                               users=2, n_requests=4, time_limit=120, label="tiny, ngram-simple")
    assert drafting.ok and drafting.load["failed"] == 0, drafting.error
    broken = serving.measure(binary, str(tiny_model), ["-m", str(tiny_model) + ".missing"], users=1, n_requests=1,
                             time_limit=30, label="broken")
    assert not broken.ok and broken.error.startswith("llama-server")


def test_the_serving_plot_draws_both_servers_against_users():
    def rows(label: str, k: float) -> list[dict]:
        return [{"ok": True, "throughput": k * (10 + i), "ttft_p95": 1 / k + i * 0.01} for i in range(4)]

    results = {u: result_with({"trial 2": rows("t", u * 1.2), "llama-server defaults": rows("d", u)})
               for u in (8, 1, 4)}
    for r in results.values():
        r.chosen = "trial 2"
    fig = plots.serving(results, "demo")
    throughput, latency = fig.axes
    assert throughput.get_legend_handles_labels()[1] == ["tuned (best trial)", "llama-server defaults"]
    tuned = throughput.containers[0].lines[0]
    assert list(tuned.get_xdata()) == [1, 4, 8]
    assert list(tuned.get_ydata()) == [pytest.approx(1.2 * u * 11.5) for u in (1, 4, 8)]
    assert len(latency.containers) == 2
    with pytest.raises(plots.NoData):
        plots.serving({})


@pytest.mark.engine
def test_serve_tune_runs_a_study_and_prints_a_llama_server_line(tiny_model, tmp_path):
    """The whole command on the tiny model: a real llama-server per trial and per side-by-side round."""
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, "-m", "autotune.cli", "serve-tune", str(tiny_model), "--users", "2",
                           "--ctx-per-user", "256", "--trials", "2", "--rounds", "2",
                           "--storage", f"sqlite:///{tmp_path}/s.db", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["trials"]) == 2 and "llama-server defaults" in " ".join(result["side_by_side"])
    assert all(len(rows) == 2 for rows in result["side_by_side"].values())
    assert result["command"][:2] == ["-m", str(tiny_model)] and "llama-server -m" in done.stdout
