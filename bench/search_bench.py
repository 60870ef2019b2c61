"""Search quality and cost on real models, in one run on this machine.

For each model: an exhaustive grid over a reduced space (every config measured with repetitions) gives
the ground truth; a seeded TPE study over the same space shows how many trials it needs to find a config
whose grid value reaches 97 % of the grid optimum; the default ``autotune search`` (30 trials, then the
side-by-side re-measurement) gives the wall time and the recommended config against the engine defaults.

    python bench/search_bench.py [--models smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from autotune import catalog, runner, study
from autotune.gguf_model import read_facts
from autotune.probe import probe
from autotune.runner import Workload
from autotune.space import SearchSpace, attention_label

GRID = {
    "n_threads": (1, 2),
    "n_threads_batch": (1, 2),
    "attention": (attention_label(False, "f16", "f16"), attention_label(True, "f16", "f16"),
                  attention_label(True, "q8_0", "q8_0")),
    "n_ubatch": (128, 512),
}
WORK = Workload(prompt_tokens=256, gen_tokens=32, reps=3)


def grid_space(n_ctx: int) -> SearchSpace:
    base = study.engine_defaults(n_ctx)
    return SearchSpace(base=base, params={k: v for k, v in GRID.items() if k in ("attention", "n_ubatch")},
                       int_ranges={"n_threads": (1, 2), "n_threads_batch": (1, 2)})


def measure_grid(model: str, sp: SearchSpace, passes: int) -> dict[tuple, list[float]]:
    """Decode tok/s samples for every grid config; several passes spread the machine's drift."""
    keys = list(itertools.product(*GRID.values()))
    samples: dict[tuple, list[float]] = {k: [] for k in keys}
    for _ in range(passes):
        for k in keys:
            m = runner.run(model, sp.settings_from(dict(zip(GRID, k))), WORK)
            samples[k] += m.decode_tps if m.ok else []
    return samples


def trials_to_reach(model: str, sp: SearchSpace, truth: dict[tuple, float], target: float, n: int = 30) -> int | None:
    """Trials a seeded TPE study needs before its best trial is a config whose *grid* value >= target."""
    facts = read_facts(model)
    hw = probe(measure_bandwidth=False)
    with tempfile.TemporaryDirectory() as tmp:
        req = study.StudyRequest(model_path=model, facts=facts, hw=hw, space=sp, workload=dataclasses.replace(WORK, reps=2),
                                 storage=f"sqlite:///{tmp}/bench.db")
        st = study.open_study(req)
        for i in range(n):
            study.run_trials(st, req, 1)
            best = st.best_trial
            key = tuple(best.params[k] for k in GRID)
            if truth.get(key, 0.0) >= target:
                return i + 1
    return None


def default_search(model: str) -> tuple[float, dict]:
    """Wall time and tuned config of the default ``autotune search`` (30 trials + recommendation)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "autotune.cli", "search", model, "--out", f"{tmp}/tuned.json"],
                              capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"search failed on {model}: {done.stderr.strip()[-500:]}")
        import json

        return wall, json.loads(Path(f"{tmp}/tuned.json").read_text())


def fmt(s: dict) -> str:
    return f"{s['median']:.1f} ({s['low']:.1f}-{s['high']:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--out", default="bench/search_results.md")
    ap.add_argument("--skip-default-search", action="store_true")
    ap.add_argument("--passes", type=int, default=1, help="grid passes (each run repeats %d times)" % WORK.reps)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows = []
    for name in args.models.split(","):
        model = str(catalog.fetch(name, quiet=False))
        sp = grid_space(1024)
        t0 = time.perf_counter()
        samples = measure_grid(model, sp, args.passes)
        grid_s = time.perf_counter() - t0
        truth = {k: statistics.median(v) for k, v in samples.items() if v}
        best_key = max(truth, key=truth.get)
        default_key = tuple(sp.params_of(sp.base)[k] for k in GRID)
        reach = trials_to_reach(model, sp, truth, 0.97 * truth[best_key])
        row = {
            "model": name,
            "grid_best": f"{truth[best_key]:.1f} {dict(zip(GRID, best_key))}",
            "grid_defaults": f"{truth.get(default_key, 0):.1f}",
            "grid_configs": len(truth),
            "grid_s": grid_s,
            "trials_to_97": reach,
        }
        if not args.skip_default_search:
            wall, config = default_search(model)
            rec = config["recommendation"]
            row.update(search_wall_s=wall, recommended=fmt(config["metrics"]["decode"]),
                       defaults=fmt(rec["baseline_metrics"]["decode"]), supported=rec["supported"],
                       speedup=rec["speedup"], chosen=rec["chosen"])
        rows.append(row)
        print(row, flush=True)
    lines = [
        f"Decode tok/s on this machine ({probe(measure_bandwidth=False).cpu_model}, 2 cores); medians with (min-max).",
        "",
        "| model | grid optimum (decode) | grid: engine defaults | trials to 97 % of grid optimum | grid configs / time "
        "| default search: recommended | engine defaults | supported win | speedup | search wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['grid_best']} | {r['grid_defaults']} | {r['trials_to_97'] or '> 30'} "
            f"| {r['grid_configs']} / {r['grid_s']:.0f} s | {r.get('recommended', '-')} | {r.get('defaults', '-')} "
            f"| {r.get('supported', '-')} | {('x%.2f' % r['speedup']) if r.get('speedup') else '-'} "
            f"| {('%.0f s' % r['search_wall_s']) if 'search_wall_s' in r else '-'} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
