"""Serving: ``autotune serve-tune`` for 1, 4 and 8 users on the demo model and Qwen2.5-Coder-0.5B, each
tuned server side by side with llama-server's own defaults under the same load.

    python bench/serving_bench.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--users 1,4,8] [--trials 10]
                                  [--rounds 4] [--ctx-per-user 1024] [--spec] [--out bench/serving_results.md]

Writes the table (``--out``), the raw results (same name, ``.json``) and the plot (same name, ``.png``).
Run it on a quiet machine: the load is CPU-bound and a second busy process would be measured too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from autotune import engine
from autotune.engine import bundled
from autotune.facts import catalog
from autotune.facts.probe import probe
from autotune.output import plots
from autotune.search.progress import Lines
from autotune.stages import serving


def fmt(rows: list[dict], key: str, digits: int = 1) -> str:
    vals = [r[key] for r in rows if r.get("ok") and r.get(key) is not None]
    if not vals:
        return "-"
    q = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else [vals[0]] * 3
    return f"{statistics.median(vals):.{digits}f} ({q[0]:.{digits}f}-{q[2]:.{digits}f})"


def table(results: list[dict], cpu: str, args: argparse.Namespace) -> str:
    lines = [f"On this machine ({cpu}): `autotune serve-tune MODEL --users N --ctx-per-user {args.ctx_per_user}"
             f"{' --spec' if args.spec else ''} "
             f"--trials {args.trials}`, then the best tuned configs and llama-server's defaults side by side in "
             f"{args.rounds} rotated rounds, each round one fresh server under the same load ({serving.ServeOptions().requests_per_user} "
             f"requests per user, the shipped mix). Medians (q25-q75).", "",
             "| model | users | config | aggregate tok/s | user decode tok/s | TTFT p50 s | TTFT p95 s | failed | search min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for label, rows in r["side_by_side"].items():
            name = label + (" **(chosen)**" if label == r["chosen"] else "")
            failed = sum(x["failed"] for x in rows)
            lines.append(f"| {r['model']} | {r['users']} | {name} | {fmt(rows, 'throughput')} | {fmt(rows, 'user_tps')} "
                         f"| {fmt(rows, 'ttft_p50', 2)} | {fmt(rows, 'ttft_p95', 2)} | {failed} | {r['search_s'] / 60:.1f} |")
    lines += ["", "| model | users | verdict | chosen command |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['users']} | {r['verdict']} | `llama-server {' '.join(r['command'][2:])}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--users", default="1,4,8")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ctx-per-user", type=int, default=1024)
    ap.add_argument("--spec", action="store_true", help="also search n-gram speculation per slot (serve-tune --spec)")
    ap.add_argument("--out", default="bench/serving_results.md")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out = Path(args.out)
    server = engine.llama_server(quiet=False)
    hw = probe(bundled, measure_bandwidth=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = str(catalog.fetch(name, quiet=False))
            for users in map(int, args.users.split(",")):
                opts = serving.ServeOptions(users=users, ctx_per_user=args.ctx_per_user, trials=args.trials,
                                            rounds=args.rounds, storage=f"sqlite:///{tmp}/serve.db",
                                            spec=args.spec)
                start = time.perf_counter()
                say = Lines(lambda t, n=name, u=users: print(f"[{n} x{u}] {t}", flush=True))
                res = serving.tune(model, opts, say, server)
                results.append({"model": name, "users": users, "search_s": time.perf_counter() - start, **res.to_json()})
                out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    out.write_text(table(results, hw.cpu_model, args))
    for name in args.models.split(","):
        fig = plots.serving({r["users"]: serving.ServeResult.from_json(r) for r in results if r["model"] == name},
                            f"{name}: tuned llama-server vs its defaults")
        fig.savefig(out.with_name(f"{out.stem}_{name}.png"), dpi=110)
    print(out.read_text())


if __name__ == "__main__":
    main()
