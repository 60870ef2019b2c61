"""Runner honesty: the same settings measured through the bundled engine (llama-cpp-python), llama-bench and
llama-server (both built from the llama.cpp that llama-cpp-python vendors, ``autotune.engine.reference``), in
rotated rounds of fresh processes on the catalog models; and the search's recommendations
(``bench/search_results.json``) against the defaults of each tool, measured where users deploy: llama-server.

    python bench/engines_bench.py [--rounds 3] [--out bench/engines_results.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from autotune import engine
from autotune.engine import Workload, bundled, reference
from autotune.engine.external import Tool
from autotune.facts import catalog
from autotune.facts.probe import probe
from autotune.search import health
from autotune.vocabulary.settings import Settings

WORK = Workload(prompt_tokens=256, gen_tokens=32, reps=3)
N_CTX = 4096
METRICS = ("prefill", "decode", "ttft")


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return (xs[0],) * 3 if xs else (0.0, 0.0, 0.0)
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/engines_results.md")
    args = ap.parse_args()
    hw = probe(bundled, measure_bandwidth=False)
    engines = {"bundled": engine.bundled, **{k: Tool(k, reference.tool(k)) for k in reference.TOOLS}}
    recommended = {r["model"]: r["recommended_settings"] for r in json.loads(Path("bench/search_results.json").read_text())}
    rows: list[dict[str, Any]] = []
    for name in catalog.CATALOG:
        model = str(catalog.fetch(name))
        base = engine.bundled.defaults(N_CTX)
        pins = health.check(model, base, hw, engine.bundled).pins  # e.g. extra buffers off where the AMX kernel crashes
        configs = {
            "llama-cpp-python defaults": base,
            "llama.cpp defaults": engines["llama-server"].defaults(N_CTX),
            "autotune's recommendation": Settings.from_dict({**recommended[name], "n_ctx": N_CTX}),
        }
        configs = {k: v.replace(**pins) for k, v in configs.items()}
        pairs = [(c, e) for c in configs for e in engines]
        samples: dict[tuple[str, str], dict[str, list[float]]] = {p: {m: [] for m in (*METRICS, "wall")} for p in pairs}
        for r in range(args.rounds):
            for c, e in pairs[r % len(pairs):] + pairs[: r % len(pairs)]:  # rotated: no pair always goes first
                m = engines[e].measure(model, configs[c], WORK, 600.0)
                if not m.ok:
                    print(f"{name} {c} {e}: {m.error}", file=sys.stderr)
                    continue
                s = samples[(c, e)]
                s["prefill"] += m.prefill_tps
                s["decode"] += m.decode_tps
                s["ttft"] += m.ttft_s
                s["wall"].append(m.wall_s)
                print(f"{name} | {c} | {e} | decode {m.decode:.1f} prefill {m.prefill:.1f} wall {m.wall_s:.1f}s",
                      flush=True)
        for (c, e), s in samples.items():
            rows.append({"model": name, "config": c, "engine": e, "pins": pins, "settings": configs[c].to_dict(),
                         **{k: v for k, v in s.items()}})
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    Path(args.out).write_text(table(rows))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    def cell(xs: list[float], digits: int = 1) -> str:
        lo, mid, hi = quartiles(xs)
        return f"{mid:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})" if xs else "failed"

    def med(model: str, config: str, eng: str, metric: str) -> float:
        r = next(x for x in rows if (x["model"], x["config"], x["engine"]) == (model, config, eng))
        return statistics.median(r[metric]) if r[metric] else float("nan")

    out = ["Same settings, three engines (256-token prompt, 32 generated, 3 repetitions per run, rotated rounds; "
           "median (q25-q75); TTFT in ms; llama-bench's TTFT is its prefill time).", "",
           "| model | settings | engine | prefill tok/s | decode tok/s | TTFT ms | wall s per run |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['config']} | {r['engine']} | {cell(r['prefill'])} | {cell(r['decode'])} | "
                   f"{cell([x * 1000 for x in r['ttft']], 0)} | {cell(r['wall'])} |")
    out += ["", "Ratios to the bundled engine (medians):", "",
            "| model | settings | engine | prefill | decode | TTFT |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["engine"] == "bundled":
            continue
        ratio = [med(r["model"], r["config"], r["engine"], k) / med(r["model"], r["config"], "bundled", k)
                 for k in METRICS]
        out.append(f"| {r['model']} | {r['config']} | {r['engine']} | " + " | ".join(f"{x:.2f}" for x in ratio) + " |")
    out += ["", "The recommendation against each tool's defaults, measured in llama-server (medians):", "",
            "| model | vs | prefill | decode | TTFT (lower is better: defaults / recommendation) |", "|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for base in ("llama-cpp-python defaults", "llama.cpp defaults"):
            p, d, t = (med(model, "autotune's recommendation", "llama-server", k) / med(model, base, "llama-server", k)
                       for k in METRICS)
            out.append(f"| {model} | {base} | x{p:.2f} | x{d:.2f} | x{1 / t:.2f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
