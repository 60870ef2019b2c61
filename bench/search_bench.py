"""Search quality and cost on real models, in one run on this machine.

For each model:

1. an exhaustive grid over a reduced space, every config measured with repetitions, gives the ground
   truth (the search's own context, 4096, so the numbers compare);
2. the study's seeded TPE sampler is replayed over those real grid samples for many seeds (each trial
   draws the trial's repetitions from the config's measured samples), which says how many trials it
   needs to *visit* a config within 97 % of the grid optimum, and how many until its *best-measured*
   trial is one — a distribution, where one live study would give a single noisy number;
3. the default ``autotune search`` (full space, 30 trials, the side-by-side re-measurement) gives the
   tuning wall time and the recommended config;
4. the recommended config, the grid optimum and the engine defaults are measured again in rotated
   rounds of fresh processes, so "recommended / grid optimum" and "recommended / defaults" compare like with like.

    python bench/search_bench.py [--models smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b]
                                 [--out bench/search_results.md] [--skip-default-search] [--passes 1]
    python bench/search_bench.py --from-json bench/search_results.json   # analyse saved samples again

Raw samples go next to the table (same name, ``.json``). Run it on a quiet machine: a second busy
process on 2 cores halves the 2-thread decode speed and the table would measure that.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from autotune import catalog, engine, pipeline, study
from autotune.engine import Measurement, Workload
from autotune.gguf_model import ModelFacts, read_facts
from autotune.probe import Hardware, probe
from autotune.recommend import Candidate, Spread, measure_rounds
from autotune.settings import Settings
from autotune.space import SearchSpace, attention_label

GRID = {
    "n_threads": (1, 2),
    "n_threads_batch": (1, 2),
    "attention": (attention_label(False, "f16", "f16"), attention_label(True, "f16", "f16"),
                  attention_label(True, "q8_0", "q8_0")),
    "n_ubatch": (128, 512),
}
N_CTX = 4096  # what the default search uses for these models: min(4096, trained context)
WORK = Workload(prompt_tokens=256, gen_tokens=32, reps=3)
TRIAL_REPS = pipeline.TuneOptions().workload.reps  # repetitions inside one trial of the default search
TARGET = 0.97


def grid_space() -> SearchSpace:
    base = engine.defaults(N_CTX)
    return SearchSpace(base=base, params={k: v for k, v in GRID.items() if k in ("attention", "n_ubatch")},
                       int_ranges={k: (min(GRID[k]), max(GRID[k])) for k in ("n_threads", "n_threads_batch")})


def measure(model: str, configs: dict[str, Settings], rounds: int, what: str) -> dict[str, list[float]]:
    """Decode tok/s samples per config label, in the recommender's own rotated rounds of fresh processes."""
    candidates = [Candidate(label, s) for label, s in configs.items()]
    done = itertools.count(1)

    def show(label: str, m: Measurement) -> None:
        result = f"{m.decode:.1f} tok/s" if m.ok else m.error
        print(f"  {what} {next(done)}/{len(candidates) * rounds} {label}: {result}", flush=True)

    measure_rounds(model, candidates, WORK, rounds, on_run=show)
    return {c.label: c.samples("decode", WORK) for c in candidates}


def replay(model: str, facts: ModelFacts, hw: Hardware, sp: SearchSpace, samples: dict[tuple, list[float]],
           truth: dict[tuple, float], seeds: int, with_sensible: bool = True,
           n: int = 30) -> list[tuple[int | None, int | None]]:
    """(trials to visit, trials until the best-measured trial is) a config with truth >= TARGET x optimum,
    for the study's own sampler (seeded TPE, defaults and sensible enqueued first) over measured samples.
    A config the grid could not measure is told as failed, as the real study does.

    ``with_sensible=False`` takes the probe's sensible config out (told as failed, not counted), which
    shows what the TPE sampler finds on its own where that heuristic guessed wrong."""
    target = TARGET * max(truth.values())
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            req = study.StudyRequest(model_path=model, facts=facts, hw=hw, space=sp, seed=seed,
                                     workload=WORK, storage=f"sqlite:///{tmp}/replay{seed}.db")
            st = study.open_study(req)
            draw = random.Random(seed)
            visited = best = None
            for i in range(1, n + 1):
                trial = st.ask()
                while not with_sensible and trial.user_attrs.get("role") == "sensible":
                    st.tell(trial, state=optuna.trial.TrialState.FAIL)
                    trial = st.ask()
                sp.suggest(trial)
                key = tuple(trial.params[k] for k in GRID)
                if samples.get(key):
                    st.tell(trial, statistics.median(draw.choice(samples[key]) for _ in range(TRIAL_REPS)))
                else:
                    st.tell(trial, state=optuna.trial.TrialState.FAIL)
                if visited is None and truth.get(key, 0.0) >= target:
                    visited = i
                if best is None and study.best_value(st) is not None \
                        and truth.get(tuple(st.best_trial.params[k] for k in GRID), 0.0) >= target:
                    best = i
            out.append((visited, best))
    return out


def default_search(model: str) -> tuple[float, dict, list[float | None]]:
    """Wall time, tuned config and per-trial decode values of the default ``autotune search`` (``tune()`` with
    the default options, on a fresh storage)."""
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/studies.db"
        start = time.perf_counter()
        tuned = pipeline.tune(model, pipeline.TuneOptions(storage=storage))
        wall = time.perf_counter() - start
        assert tuned is not None
        trials = optuna.load_study(study_name=tuned.study_name, storage=storage).get_trials(deepcopy=False)
        return wall, tuned.record, [t.value if t.state == optuna.trial.TrialState.COMPLETE else None for t in trials]


def fmt(values: list[float]) -> str:
    s = Spread.of(values)
    return f"{s.median:.1f} ({s.q25:.1f}-{s.q75:.1f})"


def fmt_trials(values: list[int | None]) -> str:
    """Median (range) of trials over the seeds; a seed that never got there counts as > 30."""
    ranked = sorted(values, key=lambda v: float("inf") if v is None else v)
    shown = ["> 30" if v is None else str(v) for v in ranked]
    missed = ranked.count(None)
    return f"{shown[(len(shown) - 1) // 2]} ({shown[0]}-{shown[-1]})" + (f", {missed}/{len(values)} seeds > 30" if missed else "")


def bench_model(name: str, args: argparse.Namespace) -> dict:
    """Every measurement for one model: the grid, the default search and the head-to-head (raw samples)."""
    model = str(catalog.fetch(name, quiet=False))
    sp = grid_space()
    grid = {json.dumps(dict(zip(GRID, k))): sp.settings_from(dict(zip(GRID, k)))
            for k in itertools.product(*GRID.values())}
    t0 = time.perf_counter()
    samples = measure(model, grid, args.passes, "grid")  # passes are rounds: several spread the machine's drift
    row: dict = {"model": name, "grid_s": time.perf_counter() - t0, "passes": args.passes, "grid_samples": samples}
    if not args.skip_default_search:
        wall, config, values = default_search(model)
        rec = config["recommendation"]
        truth = grid_truth(row)
        best_key = max(truth, key=truth.get)
        configs = {"recommended": Settings.from_dict(config["settings"]),
                   "grid optimum": sp.settings_from(dict(zip(GRID, best_key))),
                   "engine defaults": sp.base}
        row.update(search_wall_s=wall, trial_values=values, chosen=rec["chosen"], supported=rec["supported"],
                   speedup=rec["speedup"], recommended_settings=config["settings"],
                   head_to_head=measure(model, configs, args.rounds, "head-to-head"))
    return row


def grid_samples(row: dict) -> dict[tuple, list[float]]:
    return {tuple(json.loads(k)[g] for g in GRID): v for k, v in row["grid_samples"].items()}


def grid_truth(row: dict) -> dict[tuple, float]:
    return {k: statistics.median(v) for k, v in grid_samples(row).items() if v}


def analyse(row: dict, seeds: int) -> dict:
    """What the raw samples say: grid optimum, how many configs come within 97 %, replayed studies."""
    model = str(catalog.fetch(row["model"]))
    facts, hw = read_facts(model), probe(measure_bandwidth=False)
    sp = grid_space()
    samples, truth = grid_samples(row), grid_truth(row)
    best_key = max(truth, key=truth.get)
    target = TARGET * truth[best_key]
    default_key = tuple(sp.params_of(sp.base)[k] for k in GRID)
    out = {
        "grid_best": {"config": dict(zip(GRID, best_key)), "decode": truth[best_key]},
        "grid_defaults": truth.get(default_key),
        "grid_configs": len(truth),
        "near_optimal": sum(v >= target for v in truth.values()),
        "replay": {},
    }
    for label, with_sensible in (("study", True), ("tpe_alone", False)):
        runs = replay(model, facts, hw, sp, samples, truth, seeds, with_sensible)
        out["replay"][label] = {"visited": [v for v, _ in runs], "best_measured": [b for _, b in runs]}
    if "trial_values" in row:
        out["first_measured_97"] = next((i + 1 for i, v in enumerate(row["trial_values"])
                                         if v is not None and v >= target), None)
    return out


def table(rows: list[dict], facts: list[dict], cpu: str) -> str:
    lines = [
        f"Decode tok/s on this machine ({cpu}, 2 cores, nothing else running); medians with (q25-q75).",
        f"Grid: {' x '.join(f'{k} {v}' for k, v in GRID.items())} at n_ctx {N_CTX}, each config one run per pass of "
        f"{WORK.reps} repetitions (prompt {WORK.prompt_tokens}, {WORK.gen_tokens} generated tokens).",
        "Replay: the study's seeded TPE sampler over the grid's measured samples, one study per seed; trials "
        "until it visits a config within 97 % of the grid optimum / until its best-measured trial is one, "
        "median (range) over the seeds. 'TPE alone' takes the probe's sensible config out of the study.",
        "",
        "| model | grid optimum | grid: engine defaults | configs within 97 % | study: visit / best-measured "
        "| TPE alone: visit / best-measured | grid configs x passes / time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r, f in zip(rows, facts):
        g = f["grid_best"]
        cfg = ", ".join(f"{k} {v}" for k, v in g["config"].items())
        rp = f["replay"]
        lines.append(
            f"| {r['model']} | {g['decode']:.1f} ({cfg}) | {f['grid_defaults'] or 0:.1f} "
            f"| {f['near_optimal']} / {f['grid_configs']} "
            f"| {fmt_trials(rp['study']['visited'])} / {fmt_trials(rp['study']['best_measured'])} "
            f"| {fmt_trials(rp['tpe_alone']['visited'])} / {fmt_trials(rp['tpe_alone']['best_measured'])} "
            f"| {f['grid_configs']} x {r.get('passes', 1)} / {r['grid_s']:.0f} s |")
    searched = [(r, f) for r, f in zip(rows, facts) if "search_wall_s" in r]
    if searched:
        lines += [
            "",
            "Default `autotune search MODEL` (full space, 30 trials, re-measurement), then the recommended config, the grid "
            "optimum and the engine defaults measured again side by side in rotated rounds:",
            "",
            "| model | search wall time | first trial measured >= 97 % of grid optimum | search says | recommended "
            "| grid optimum | engine defaults | recommended / grid optimum | recommended / defaults |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r, f in searched:
            h = r["head_to_head"]
            med = {k: statistics.median(v) if v else 0.0 for k, v in h.items()}
            says = f"{r['chosen']}, x{r['speedup']:.2f}" + (" (supported)" if r["supported"] else " (not supported: defaults)")
            lines.append(
                f"| {r['model']} | {r['search_wall_s'] / 60:.1f} min | {f['first_measured_97'] or '> 30'} | {says} "
                f"| {fmt(h['recommended'])} | {fmt(h['grid optimum'])} | {fmt(h['engine defaults'])} "
                f"| {med['recommended'] / med['grid optimum']:.2f} | {med['recommended'] / med['engine defaults']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--out", default="bench/search_results.md")
    ap.add_argument("--skip-default-search", action="store_true")
    ap.add_argument("--passes", type=int, default=1, help=f"grid passes (each run repeats {WORK.reps} times)")
    ap.add_argument("--seeds", type=int, default=20, help="replayed studies per model")
    ap.add_argument("--rounds", type=int, default=3, help="head-to-head rounds")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: analyse the raw samples a run saved")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cpu = probe(measure_bandwidth=False).cpu_model
    out = Path(args.out)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        rows = []
        for name in args.models.split(","):
            rows.append(bench_model(name, args))
            out.with_suffix(".json").write_text(json.dumps(rows, indent=1))  # a later failure keeps these
    text = table(rows, [analyse(r, args.seeds) for r in rows], cpu)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
