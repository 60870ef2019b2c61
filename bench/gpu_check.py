"""The GPU check: autotune's GPU path on any NVIDIA machine once the engine is built with CUDA, in about 8 minutes.

Phases, each saved as it ends (a run cut short keeps what it finished; run again to do the rest):
  probe    what the machine and the engine build are
  doctor   the environment: the vocabulary loaded with the engine's library first and with libstdc++ first
  search   ``autotune search`` on the 8b shape (the pipeline, with its GPU placement and workload)
  bench    its recommendation against llama.cpp's defaults in llama-bench, side by side in rotated rounds
  peaks    the memory model against real runs' peak GPU memory (NVML): the GPU overhead allowance learned
  verify   the memory model against the engine's dry run on seven synthetic shapes (placements, FA, caches, MoE)
  fit      ``fit`` against ``llama-fit-params``, with all the GPU and with a margin that forces a partial offload
  cli      the commands a user runs: ``doctor``, ``memory --verify``, ``fit``

Models are header-only synthetic Q4_K files (``autotune.facts.synth``): their tensor data is a hole that reads as zeros,
which changes neither memory nor speed. Writes DIR/gpu_check.json and DIR/gpu_check.md.

    python bench/gpu_check.py --out DIR [--work DIR] --donor TOKENIZER.gguf --llama-bin BUILD/bin [--until EPOCH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from autotune import engine, memory
from autotune.engine import Workload, bundled, diagnose
from autotune.facts import synth
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import probe
from autotune.memory import fit, overhead
from autotune.search import oracle, pipeline
from autotune.vocabulary import flags
from autotune.vocabulary.settings import Settings

MIB = 2**20
SHAPES = ("1b", "8b", "70b", "qwen3-30b-a3b", "gpt-oss-20b", "gemma3-4b", "deepseek-v2-lite")
CTX = 8192
# Seconds each phase needs at most on an H200 (a phase that cannot finish before --until is left for a rerun).
COST = {"probe": 10, "doctor": 20, "search": 180, "bench": 60, "peaks": 120, "verify": 60, "fit": 120, "cli": 60}
# A nearly full context: the pool's peak (flash attention off) grows as a conversation fills it.
PEAK_WORK = Workload(prompt_tokens=512, gen_tokens=16, reps=1, depth=7424)
SEARCH_TRIALS = 16
BENCH = {"prompt": 2048, "gen": 128, "depth": 1024, "reps": 3, "rounds": 3}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Check:
    def __init__(self, out: Path, work: Path, donor: Path, bin_dir: Path, until: float, shapes: tuple[str, ...]) -> None:
        self.out, self.work, self.donor, self.bin, self.until, self.shapes = out, work, donor, bin_dir, until, shapes
        self.path = out / "gpu_check.json"
        self.kept = work / "gpu_check.json"  # a copy beside the models, so a second run resumes where this one stopped
        found = self.path if self.path.exists() else self.kept
        self.results: dict[str, Any] = json.loads(found.read_text()) if found.exists() else {}
        self.models = work / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        self.hw = probe(bundled, measure_bandwidth=False)

    def model(self, shape: str) -> str:
        path = self.models / f"{shape}.gguf"
        if not path.exists():
            synth.write_model(path, self.donor, synth.SHAPES[shape], "Q4_K", header_only=True)
        return str(path)

    def save(self) -> None:
        text = json.dumps(self.results, indent=1, default=str)
        self.path.write_text(text)
        self.kept.write_text(text)
        (self.out / "gpu_check.md").write_text(markdown(self.results))

    def run(self, phases: list[str]) -> None:
        for name in phases:
            if name in self.results and "error" not in self.results[name]:
                log(f"{name}: done before")
                continue
            left = self.until - time.time()
            if left < COST[name]:
                log(f"{name}: skipped, {left:.0f} s left of the {COST[name]} s it may need")
                continue
            log(f"{name} ...")
            start = time.time()
            try:
                self.results[name] = getattr(self, name)()
            except Exception as e:  # a phase that breaks is recorded with its reason; the others still run
                self.results[name] = {"error": f"{type(e).__name__}: {e}"}
            self.results[name]["seconds"] = round(time.time() - start, 1)
            log(f"{name}: {self.results[name]['seconds']} s" + (f" ERROR {self.results[name]['error']}"
                                                                 if "error" in self.results[name] else ""))
            self.save()

    # ------------------------------------------------------------------------------------------------ phases

    def probe(self) -> dict[str, Any]:
        build = engine.build_info()
        return {"hardware": self.hw.to_dict(), "engine": {"version": build.version, "backend": build.backend,
                                                          "system_info": build.system_info},
                "bench_version": _text([str(self.bin / "llama-bench"), "--version"])[-400:]}

    def doctor(self) -> dict[str, Any]:
        d = diagnose.diagnose(self.model("8b"))
        return {**dataclasses.asdict(d), "order_fault": d.order_fault, "lines": d.lines()}

    def verify(self) -> dict[str, Any]:
        from autotune.memory.estimate import _replayed

        rows = []
        for shape in self.shapes:
            facts = read_facts(self.model(shape))
            grid = placements(facts)
            for (label, s), r in zip(grid, oracle.verify(facts, [s for _, s in grid], self.hw)):
                row = {"shape": shape, "settings": label, "error": r["error"], "error_pct": r["error_pct"],
                       "predicted": r["predicted"], "engine": r["engine"], "source": r["source"]}
                if memory.replay_gap(facts) is None and r["engine"]:  # what the CPU replay would have said
                    replay = _replayed(facts, s, self.hw)
                    row["replay_compute_pct"] = memory.error_pct(sum(d.compute for d in replay.devices),
                                                                 r["engine"]["compute"])
                rows.append(row)
        return {"rows": rows}

    def peaks(self) -> dict[str, Any]:
        rows = []
        for shape in self.shapes:
            if shape == "70b":
                continue  # a 40 GB load for one more dense row: left to the dry run
            facts = read_facts(self.model(shape))
            for label, s in placements(facts):
                if shape != "8b" and not label.startswith(("all, FA on", "all, experts")):
                    continue  # every placement on the 8b shape; every other shape whole (and its experts on the host)
                m = engine.measure(facts.path, s, PEAK_WORK, timeout=240)
                est = memory.estimate(facts, s, self.hw)
                gpu = [d for d in est.devices if d.device != memory.HOST]
                row = {"shape": shape, "settings": label, "ok": m.ok, "error": m.error, "peak": m.peak_vram,
                       "load_s": round(m.load_s, 2), "wall_s": round(m.wall_s, 1),
                       "predicted_buffers": sum(d.total - d.overhead for d in gpu),
                       "predicted_parts": {k: sum(getattr(d, k) for d in gpu) for k in ("weights", "kv", "compute", "output")}}
                if m.ok:
                    row["logged_buffers"] = overhead.on_gpus(m.buffers)
                    row["logged_parts"] = {part: overhead.on_gpus({part: m.buffers.get(part, {})})
                                           for part in ("model", "kv", "compute", "output")}
                    row["overhead"] = (m.peak_vram or 0) - row["logged_buffers"]
                    row["gpu_peaks"] = [dataclasses.asdict(g) for g in m.gpu_peaks]  # per GPU, with its source
                    row["decode"], row["prefill"] = round(m.decode, 1), round(m.prefill, 1)
                rows.append(row)
                log(f"  {shape} {label}: peak {(m.peak_vram or 0) / MIB:,.0f} MiB" if m.ok else f"  {shape} {label}: {m.error}")
        build, gpu = engine.build_key(), self.hw.offload_gpus[0]
        return {"rows": self.predict(rows), "default": overhead.DEFAULT,
                "allowance": {k: overhead.allowance(build, gpu.name, gpu.driver, k)[0] for k in overhead.DEFAULT}}

    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each run's predicted GPU total: its predicted buffers, its priced pool (``overhead.pool``) and the fixed
        part learned from every run, and from the other runs only (the honest test)."""
        ok = [r for r in rows if r["ok"] and r.get("peak")]
        for r in ok:
            facts = read_facts(self.model(r["shape"]))
            s = dict(placements(facts))[r["settings"]]
            r["pool"] = overhead.pool(facts, s, *overhead.cells_of(s, PEAK_WORK.prompt_tokens, PEAK_WORK.depth))
            r["fixed"] = r["overhead"] - r["pool"]
        for r in ok:
            others = [o["fixed"] for o in ok if o is not r]
            r["predicted_all"] = r["predicted_buffers"] + r["pool"] + max(o["fixed"] for o in ok)
            r["predicted_others"] = r["predicted_buffers"] + r["pool"] + max(others) if others else None
        return rows

    def search(self) -> dict[str, Any]:
        path = self.model("8b")
        options = pipeline.TuneOptions(ctx=CTX, trials=SEARCH_TRIALS, storage=f"sqlite:///{self.work / 'search.db'}")
        start = time.time()
        tuned = pipeline.tune(path, options, Printer(), engine.bundled)
        assert tuned is not None
        rec = tuned.record.to_json()
        import optuna

        st = optuna.load_study(study_name=tuned.study_name, storage=options.storage)
        trials = [{"number": t.number, "state": t.state.name, "role": t.user_attrs.get("role"),
                   "settings": t.user_attrs.get("settings"), "value": t.value if t.values else None,
                   "reason": t.user_attrs.get("reason", ""), **_run_facts(t.user_attrs.get("measurement"))}
                  for t in st.trials]
        second = rec["study"].get("second_stage")
        if second:
            st2 = optuna.load_study(study_name=second["name"], storage=options.storage)
            trials += [{"number": f"2.{t.number}", "state": t.state.name, "settings": t.user_attrs.get("settings"),
                        "value": t.value if t.values else None} for t in st2.trials]
        return {"wall_s": round(time.time() - start, 1), "settings": tuned.settings.to_dict(),
                "verdict": rec["recommendation"]["verdict"], "chosen": rec["recommendation"]["chosen"],
                "metrics": rec.get("metrics"), "baselines": rec["recommendation"]["baselines"],
                "workload": rec["workload"], "space": st.user_attrs.get("space"), "trials": trials,
                "engine_health": rec["engine_health"], "depth_sweep": rec.get("depth_sweep")}

    def bench(self) -> dict[str, Any]:
        if "settings" not in self.results.get("search", {}):
            raise RuntimeError("no recommendation to compare (the search phase did not finish)")
        path = self.model("8b")
        rec = Settings.from_dict(self.results["search"]["settings"])
        b = BENCH
        tool = str(self.bin / "llama-bench")
        test = ["-p", str(b["prompt"]), "-n", str(b["gen"]), "-d", str(b["depth"]), "-r", str(b["reps"]), "-o", "json"]
        argv = {"llama.cpp defaults": [tool, "-m", path, *test],
                "autotune": [tool, *flags.bench_flags(rec, path, b["prompt"], b["gen"], b["depth"], b["reps"],
                                                         moe_layers=read_facts(path).moe_layers)]}
        samples: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in argv}
        for i in range(b["rounds"]):
            for name in (list(argv) if i % 2 == 0 else list(argv)[::-1]):
                pp, tg = _bench(argv[name])
                samples[name]["prefill"] += pp
                samples[name]["decode"] += tg
                log(f"  round {i + 1} {name}: pp {statistics.median(pp):.0f} tg {statistics.median(tg):.1f}")
        summary = {name: {k: _spread(v) for k, v in s.items()} for name, s in samples.items()}
        ratio = {k: summary["autotune"][k]["median"] / summary["llama.cpp defaults"][k]["median"]
                 for k in ("prefill", "decode")}
        return {"argv": {k: " ".join(v[1:]) for k, v in argv.items()}, "samples": samples, "summary": summary,
                "ratio": ratio}

    def fit(self) -> dict[str, Any]:
        rows = []
        for shape in self.shapes:
            path = self.model(shape)
            facts = read_facts(path)
            free = self.hw.offload_gpus[0].vram_free
            ours = fit.fit(facts, self.hw, None, kv_types=("f16",))
            theirs = _text([str(self.bin / "llama-fit-params"), "-m", path], timeout=300)
            row = {"shape": shape, "trained": facts.n_ctx_train,
                   "ours": [{"what": r.what, "ngl": r.settings.n_gpu_layers, "n_cpu_moe": r.settings.n_cpu_moe,
                             "max_ctx": r.max_ctx, "holds": r.holds_target} for r in ours],
                   "llama_fit_params": _fit_line(theirs)}
            # A margin that leaves room for about 60 % of the weights: both must offload part of the model. It is
            # llama-fit-params' margin on the GPU; ours is a GPU budget of what that margin leaves (the whole
            # process's use, its CUDA context included; the host keeps its own margin), at llama-fit-params'
            # settings (b 2048, ub 512, flash attention, f16 cache, a sliding-window cache of the window's size).
            keep = int(free - 0.6 * facts.weight_bytes)
            budget = (free - keep) // MIB
            budgeted = self.hw.with_gpu_budget((budget,))
            base = Settings(n_batch=2048, n_ubatch=512, swa_full=False)
            ours = fit.fit(facts, budgeted, CTX, base, kv_types=("f16",))
            theirs = _text([str(self.bin / "llama-fit-params"), "-m", path, "-c", str(CTX), "-fitt", str(keep // MIB)],
                           timeout=300)
            row["pressed"] = {"keep_mib": keep // MIB, "budget_mib": budget,
                              "ours": [{"what": r.what, "ngl": r.settings.n_gpu_layers, "n_cpu_moe": r.settings.n_cpu_moe,
                                        "moe_host_from": r.settings.moe_host_from, "holds": r.holds_target}
                                       for r in ours],
                              "llama_fit_params": _fit_line(theirs)}
            # A real load at our answer (the placement that holds the most on the GPU): its peak must stay within
            # the budget.
            held = [r for r in ours if r.holds_target]
            if held:
                best = held[-1].settings
                m = engine.measure(facts.path, best, PEAK_WORK, timeout=240)
                row["pressed"]["load"] = {"what": held[-1].what, "ok": m.ok, "error": m.error,
                                          "peak_mib": (m.peak_vram or 0) // MIB,
                                          "within_budget": bool(m.ok and (m.peak_vram or 0) <= budget * MIB),
                                          "gpu_peaks": [dataclasses.asdict(g) for g in m.gpu_peaks]}
            rows.append(row)
            log(f"  {shape}: ours {row['ours'][0]['what']}, llama-fit-params {row['llama_fit_params']}; pressed: ours "
                f"{row['pressed']['ours'][0]['what']}, theirs {row['pressed']['llama_fit_params']}")
        return {"rows": rows}

    def cli(self) -> dict[str, Any]:
        runs = {"doctor 8b": ["doctor", self.model("8b")],
                "memory 8b --verify": ["memory", self.model("8b"), "--ctx", str(CTX), "--ngl", "99", "--verify"],
                "memory qwen3-30b-a3b --verify": ["memory", self.model("qwen3-30b-a3b"), "--ctx", str(CTX), "--ngl",
                                                  "99", "--n-cpu-moe", "24", "--verify"],
                "fit qwen3-30b-a3b": ["fit", self.model("qwen3-30b-a3b")]}
        out = {}
        for name, args in runs.items():
            done = subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True,
                                  timeout=300, env={**os.environ, "COLUMNS": "160"})
            out[name] = {"rc": done.returncode, "stdout": done.stdout[-4000:], "stderr": done.stderr[-1500:]}
            log(f"  autotune {name}: exit {done.returncode}")
        return out


def placements(facts: Any) -> list[tuple[str, Settings]]:
    """The settings the memory checks run: every layer on the GPU (flash attention on, off, a q8_0 cache), half
    the layers, none, and for a mixture of experts the experts of half the layers in host memory."""
    top = facts.n_layer + 1
    s = Settings(n_ctx=CTX, n_gpu_layers=top, flash_attn=True, n_batch=2048, n_ubatch=512, swa_full=False,
                 n_threads=8, n_threads_batch=8)
    grid = [("all, FA on", s), ("all, FA off", s.replace(flash_attn=False)),
            ("all, q8_0 cache", s.replace(type_k="q8_0", type_v="q8_0")),
            (f"ngl {top // 2}", s.replace(n_gpu_layers=top // 2)), ("ngl 0", s.replace(n_gpu_layers=0))]
    if facts.moe_layers:
        grid.append((f"all, experts of {facts.n_layer // 2} on host", s.replace(n_cpu_moe=facts.n_layer // 2)))
    return grid


class Printer(pipeline.TuneReporter):
    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[Callable[[str], None]]:
        log(f"  {text}")
        yield lambda t: None

    def note(self, text: str) -> None:
        log(f"  note: {text}")

    def health(self, verdict: Any) -> None:
        log(f"  {verdict.line()}")

    @contextlib.contextmanager
    def trials(self, total: int, objective: str) -> Iterator[Callable[[Any], None]]:
        yield lambda p: log(f"  trial {p.done}/{p.total}: {p.last}")


def _run_facts(m: dict[str, Any] | None) -> dict[str, Any]:
    """What a trial's run cost and held: its load (0 when the model stayed loaded), wall time, peak GPU memory."""
    if not m:
        return {}
    return {"load_s": round(m.get("load_s", 0.0), 2), "wall_s": round(m.get("wall_s", 0.0), 2),
            "peak_vram": m.get("peak_vram"), "prefill": m.get("prefill_tps"), "decode": m.get("decode_tps")}


def _text(argv: list[str], timeout: float = 60) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return (done.stdout + "\n" + done.stderr).strip()


def _fit_line(text: str) -> str:
    m = re.search(r"^-c \d+ -ngl -?\d+.*$", text, re.M)
    return m.group(0) if m else f"no answer: {text[-300:]}"


def _bench(argv: list[str]) -> tuple[list[float], list[float]]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    rows = json.loads(done.stdout)
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return [float(x) for x in pp["samples_ts"]], [float(x) for x in tg["samples_ts"]]


def _spread(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2], "n": len(values)}


# ------------------------------------------------------------------------------------------------- markdown


def markdown(r: dict[str, Any]) -> str:
    lines = ["# autotune GPU check", ""]
    hw = r.get("probe", {}).get("hardware", {})
    if hw:
        gpus = ", ".join(f"{g['name']} ({g['vram_total'] / 2**30:.0f} GiB)" for g in hw.get("gpus", []))
        lines += [f"Machine: {gpus}; {hw.get('cpu_model')}, {hw.get('physical_cores')} cores; engine "
                  f"{r['probe']['engine']['version']}, backend {r['probe']['engine']['backend']}.", ""]
    if "doctor" in r and "lines" in r["doctor"]:
        lines += ["## Environment (doctor)", "", *(f"- {x}" for x in r["doctor"]["lines"]), ""]
    if "verify" in r and "rows" in r["verify"]:
        lines += ["## Memory model vs the engine's dry run (ctx 8192)", "",
                  "| shape | settings | weights | KV | compute | output | total | CPU replay's compute |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in r["verify"]["rows"]:
            e = x["error_pct"] or {}
            cells = [f"{e[k]:+.2f} %" if k in e else (x["error"] or "-")[:40] for k in memory.COMPONENTS]
            replay = f"{x['replay_compute_pct']:+.1f} %" if "replay_compute_pct" in x else "-"
            lines.append(f"| {x['shape']} | {x['settings']} | " + " | ".join(cells) + f" | {replay} |")
        lines.append("")
    if "peaks" in r and "rows" in r["peaks"]:
        p = r["peaks"]
        lines += [f"## Memory model vs the real peak (NVML; {PEAK_WORK.prompt_tokens}-token prompt after "
                  f"{PEAK_WORK.depth} tokens, ctx {CTX})", "",
                  "Predicted = the predicted buffers + the priced pool (`overhead.pool`) + the fixed part, learned as "
                  "the largest (overhead - pool) of every run, or of the other runs only.", "",
                  "| shape | settings | peak MiB | engine's GPU buffers | predicted buffers | overhead | pool priced | "
                  "predicted (fixed from all) | predicted (fixed from the others) |", "|---|---|---|---|---|---|---|---|---|"]
        for x in p["rows"]:
            if not x["ok"]:
                lines.append(f"| {x['shape']} | {x['settings']} | failed: {x['error'][:80]} | | | | | | |")
                continue

            def pct(v: Any) -> str:
                return "-" if v is None or not x["peak"] else f"{v / MIB:,.0f} ({(v - x['peak']) / x['peak'] * 100:+.1f} %)"

            lines.append(f"| {x['shape']} | {x['settings']} | {x['peak'] / MIB:,.0f} | {x['logged_buffers'] / MIB:,.0f} | "
                         f"{x['predicted_buffers'] / MIB:,.0f} | {x['overhead'] / MIB:,.0f} | {x.get('pool', 0) / MIB:,.0f} | "
                         f"{pct(x.get('predicted_all'))} | {pct(x.get('predicted_others'))} |")
        lines.append("")
    s = r.get("search", {})
    if "trials" in s:
        done = [t for t in s["trials"] if t["state"] == "COMPLETE"]
        lines += ["## `autotune search` on the 8b shape (ctx 8192)", "",
                  f"{s['wall_s']:.0f} s in all; {len(s['trials'])} trials ({len(done)} complete); workload "
                  f"{s['workload']}; space {s['space']}.", "", f"Verdict: {s['verdict']}", "",
                  "| trial | role | n_gpu_layers | n_ubatch | n_batch | FA | K/V | value |", "|---|---|---|---|---|---|---|---|"]
        for t in s["trials"]:
            st = t.get("settings") or {}
            val = f"{t['value']:.1f}" if t.get("value") is not None else t["state"].lower()
            lines.append(f"| {t['number']} | {t.get('role') or ''} | {st.get('n_gpu_layers')} | {st.get('n_ubatch')} | "
                         f"{st.get('n_batch')} | {st.get('flash_attn')} | {st.get('type_k')}/{st.get('type_v')} | {val} |")
        lines.append("")
    b = r.get("bench", {})
    if "summary" in b:
        lines += [f"## Recommendation vs llama.cpp's defaults in llama-bench (pp{BENCH['prompt']}, tg{BENCH['gen']} at "
                  f"depth {BENCH['depth']}, {BENCH['rounds']} rotated rounds x {BENCH['reps']})", "",
                  "| config | prefill tok/s median (IQR) | decode tok/s median (IQR) |", "|---|---|---|"]
        for name, m in b["summary"].items():
            lines.append(f"| {name} | {m['prefill']['median']:,.0f} ({m['prefill']['q25']:,.0f}-{m['prefill']['q75']:,.0f}) | "
                         f"{m['decode']['median']:.1f} ({m['decode']['q25']:.1f}-{m['decode']['q75']:.1f}) |")
        lines += ["", f"autotune / defaults: prefill x{b['ratio']['prefill']:.3f}, decode x{b['ratio']['decode']:.3f}",
                  "", *(f"- {k}: `{v}`" for k, v in b["argv"].items()), ""]
    f = r.get("fit", {})
    if "rows" in f:
        lines += ["## `fit` vs `llama-fit-params`", "", "| shape | ours (trained context, f16) | llama-fit-params | "
                  "margin forcing a partial offload | ours | llama-fit-params | our answer loaded: peak |",
                  "|---|---|---|---|---|---|---|"]
        for x in f["rows"]:
            o = "; ".join(f"{y['what']}, max ctx {y['max_ctx']:,}" for y in x["ours"])
            p = "; ".join(y["what"] for y in x["pressed"]["ours"])
            load = x["pressed"].get("load")
            peak = "-" if not load else (f"{load['peak_mib']:,} MiB of {x['pressed']['budget_mib']:,}"
                                         + ("" if load["within_budget"] else " (OVER)") if load["ok"] else load["error"])
            lines.append(f"| {x['shape']} | {o} | `{x['llama_fit_params']}` | {x['pressed']['keep_mib']:,} MiB | {p} | "
                         f"`{x['pressed']['llama_fit_params']}` | {peak} |")
        lines.append("")
    for name, v in r.items():
        if isinstance(v, dict) and "error" in v:
            lines.append(f"- phase {name} failed: {v['error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="where the JSON and markdown go")
    ap.add_argument("--work", type=Path, help="the models, the search's study and a copy of the JSON (default: OUT)")
    ap.add_argument("--donor", type=Path, required=True, help="a GGUF whose tokenizer the synthetic models copy")
    ap.add_argument("--llama-bin", type=Path, required=True, help="the CUDA build's bin folder (llama-bench, llama-fit-params)")
    ap.add_argument("--until", type=float, default=time.time() + 480, help="epoch seconds: start no phase that could end later")
    ap.add_argument("--phases", default=",".join(COST), help="in this order (the most telling first)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="the synthetic shapes of the memory and fit phases")
    ap.add_argument("--reanalyze", action="store_true",
                    help="no runs: price the recorded peaks again with this version's memory model")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    check = Check(a.out, a.work or a.out, a.donor, a.llama_bin, a.until, tuple(a.shapes.split(",")))
    if a.reanalyze:
        check.results["peaks"]["rows"] = check.predict(check.results["peaks"]["rows"])
        check.save()
        return 0
    check.run(a.phases.split(","))
    check.save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
