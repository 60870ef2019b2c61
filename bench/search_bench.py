"""Search quality and cost on real models, in one run on this machine.

The default run answers "is the default ``autotune search`` as good as what a user would otherwise run, on
every speed they feel, and how long does it take". For each model:

1. the default ``autotune search`` (``tune()`` with the default options, a fresh storage) gives the tuning wall
   time and the recommendation; with ``--before TREE`` the same command of an older autotune checkout (another
   process, the same machine, right before) gives the time and recommendation to compare with;
2. the recommendation(s) and every baseline the search measured (llama-cpp-python's defaults, llama.cpp's own
   tools' defaults, the probe's sensible config; with the switch the engine self-check pinned) are measured
   again in rotated rounds of fresh processes: decode, prefill and time to first token per config, each
   recommendation against the best baseline *on that metric*.

``--grid`` adds the older question (how many trials the sampler needs): an exhaustive grid over a reduced space
gives the ground truth, and the study's seeded TPE sampler is replayed over the grid's real samples for many
seeds.

    python bench/search_bench.py [--models smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b]
                                 [--before TREE | --before-from OLD.json]
                                 [--out bench/search_results.md] [--rounds 4] [--grid [--passes 1]]
    python bench/search_bench.py --from-json bench/search_results.json   # analyse saved samples again

Raw samples go next to the table (same name, ``.json``). Run it on a quiet machine: a second busy
process on 2 cores halves the 2-thread decode speed and the table would measure that.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from autotune import engine
from autotune.engine import Measurement, Workload, bundled
from autotune.facts import catalog
from autotune.facts.gguf_model import ModelFacts, read_facts
from autotune.facts.probe import Hardware, probe
from autotune.search import loop, pipeline, request, study
from autotune.search.recommend import METRICS, Candidate, Spread, measure_rounds
from autotune.search.space import SearchSpace, attention_label
from autotune.vocabulary.metrics import BY_NAME
from autotune.vocabulary.settings import Settings

GRID = {
    "n_threads": (1, 2),
    "n_threads_batch": (1, 2),
    "attention": (attention_label(False, "f16", "f16"), attention_label(True, "f16", "f16"),
                  attention_label(True, "q8_0", "q8_0")),
    "n_ubatch": (128, 512),
}
N_CTX = 4096  # what the default search uses for these models: min(4096, trained context)
WORK = Workload(prompt_tokens=256, gen_tokens=32, reps=3)
TRIAL_REPS = pipeline.HOST_WORKLOAD.reps  # repetitions inside one trial of the default search (on a CPU)
TARGET = 0.97


def grid_space() -> SearchSpace:
    base = engine.defaults(N_CTX)
    return SearchSpace(base=base, params={k: v for k, v in GRID.items() if k in ("attention", "n_ubatch")},
                       int_ranges={k: (min(GRID[k]), max(GRID[k])) for k in ("n_threads", "n_threads_batch")})


def measure(model: str, configs: dict[str, Settings], rounds: int, what: str, work: Workload = WORK,
            metrics: tuple[str, ...] = METRICS) -> dict[str, dict[str, list[float]]]:
    """Samples per config label and metric, in the recommender's own rotated rounds of fresh processes."""
    candidates = [Candidate(label, s) for label, s in configs.items()]
    done = itertools.count(1)

    def show(label: str, m: Measurement) -> None:
        result = f"{m.decode:.1f} tok/s decode, {m.prefill:.1f} prefill" if m.ok else m.error
        print(f"  {what} {next(done)}/{len(candidates) * rounds} {label}: {result}", flush=True)

    measure_rounds(engine.bundled, model, candidates, work, rounds, on_run=show)
    return {c.label: {m: c.samples(m, work) for m in metrics} for c in candidates}


def decode_only(samples: dict[str, dict[str, list[float]]]) -> dict[str, list[float]]:
    return {label: by_metric["decode"] for label, by_metric in samples.items()}


def timed_search(model: str, tree: str | None, tmp: str) -> tuple[float, dict]:
    """Wall time and tuned config of the default ``autotune search MODEL`` on a fresh storage: this autotune's
    ``tune()``, or (``tree``) the CLI of another checkout, run in its own process."""
    storage = f"sqlite:///{tmp}/{'before' if tree else 'now'}.db"
    start = time.perf_counter()
    if tree is None:
        tuned = pipeline.tune(model, pipeline.TuneOptions(storage=storage), pipeline.TuneReporter(), engine.bundled)
        assert tuned is not None
        return time.perf_counter() - start, tuned.record.to_json()
    out = Path(tmp) / "before.json"
    cli = "import sys; from autotune.cli import main; sys.argv[0] = 'autotune'; sys.exit(main())"
    subprocess.run([sys.executable, "-c", cli, "search", model, "--storage", storage, "--out", str(out)],
                   cwd=tree, env={**os.environ, "PYTHONPATH": tree}, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads(out.read_text())


def bench_search(name: str, args: argparse.Namespace) -> dict:
    """The default search (and the older one), then every recommendation and baseline side by side."""
    model = str(catalog.fetch(name, quiet=False))
    row: dict = {"model": name}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            row["before_s"], before = timed_search(model, args.before, tmp)
            row["before_settings"] = before["settings"]
        elif args.before_from:  # the older search's time and answer, from an earlier run of this bench
            saved = next(r for r in json.loads(Path(args.before_from).read_text()) if r["model"] == name)
            row.update(before_s=saved["before_s"], before_settings=saved["before_settings"],
                       before_from=args.before_from)
        row["search_s"], config = timed_search(model, None, tmp)
    rec = config["recommendation"]
    row.update(settings=config["settings"], chosen=rec["chosen"], verdict=rec["verdict"],
               second_stage=config["study"].get("second_stage"), workload=config["workload"])
    configs = {"recommended": Settings.from_dict(config["settings"])}
    if "before_settings" in row:
        configs["previous recommendation"] = Settings.from_dict(row["before_settings"])
    for label, b in rec["baselines"].items():
        if b["ran"]:
            configs[label] = Settings.from_dict(b["settings"])
    work = Workload(**{**config["workload"], "reps": WORK.reps})
    row["baselines"] = [label for label in configs if label not in ("recommended", "previous recommendation")]
    row["side_by_side"] = measure(model, configs, args.rounds, "side by side", work)
    return row


def best_baselines(row: dict) -> dict[str, str]:
    """Per metric, the baseline with the best median."""
    h = row["side_by_side"]
    return {m: max(row["baselines"], key=lambda b: BY_NAME[m].sign * statistics.median(h[b][m])) for m in METRICS}


def versus(row: dict, label: str, metric: str) -> str:
    """``label`` against the best baseline on ``metric``: the ratio (>1 better) and what the spread says."""
    h, base = row["side_by_side"], best_baselines(row)[metric]
    a, b = Spread.of(h[label][metric]), Spread.of(h[base][metric])
    r = a.median / b.median if BY_NAME[metric].higher_is_better else b.median / a.median
    up = BY_NAME[metric].sign * (a.median - b.median) > 0
    apart = a.q25 > b.q75 or a.q75 < b.q25
    return f"x{r:.2f}" + (" (better)" if apart and up else " (worse)" if apart else " (within noise)")


def search_table(rows: list[dict], cpu: str) -> str:
    def med(values: list[float], metric: str) -> str:
        s = Spread.of(values)
        k = 1000 if metric == "ttft" else 1
        return f"{s.median * k:.1f} ({s.q25 * k:.1f}-{s.q75 * k:.1f})"

    work = rows[0]["workload"]
    lines = [
        f"On this machine ({cpu}, 2 cores, nothing else running): the default `autotune search MODEL`, then every "
        f"config re-measured side by side in {rows[0]['side_by_side_rounds']} rotated rounds of fresh processes x "
        f"{WORK.reps} repetitions (prompt {work['prompt_tokens']} tokens after {work['depth']} of history, "
        f"{work['gen_tokens']} generated). Medians (q25-q75); each recommendation against the best baseline on that "
        "metric; 'worse'/'better' only where the interquartile ranges are apart.",
        "",
        "| model | config | decode tok/s | prefill tok/s | TTFT ms | decode vs best baseline | prefill vs best "
        "baseline | TTFT vs best baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h = r["side_by_side"]
        best = best_baselines(r)
        for label in h:
            if not h[label]["decode"]:
                continue
            mark = [f"best on {m}" for m in METRICS if best[m] == label]
            name = label + (f" ({', '.join(mark)})" if mark else "")
            vs = [versus(r, label, m) if label not in r["baselines"] else "" for m in METRICS]
            lines.append(f"| {r['model']} | {name} | " + " | ".join(med(h[label][m], m) for m in METRICS)
                         + " | " + " | ".join(vs) + " |")
    lines += ["", "| model | tuning wall time: previous autotune | now | now / previous | what the search said |",
              "|---|---|---|---|---|"]
    for r in rows:
        before = f"{r['before_s'] / 60:.1f} min" if "before_s" in r else "-"
        ratio = f"{r['search_s'] / r['before_s']:.2f}" if "before_s" in r else "-"
        said = r["verdict"].split("the best baseline that runs. ")[-1]  # the crash sentences are the table's
        lines.append(f"| {r['model']} | {before} | {r['search_s'] / 60:.1f} min | {ratio} | {said} |")
    sources = sorted({r["before_from"] for r in rows if "before_from" in r})
    if sources:
        lines += ["", f"The previous autotune's times are from an earlier run of this bench on this machine "
                  f"({', '.join(sources)}); its recommendations are measured again above."]
    settings = ["", "Recommended settings (what differs from llama-cpp-python's defaults):", ""]
    for r in rows:
        diff = {k: v for k, v in r["settings"].items() if v != Settings().to_dict().get(k)}
        settings.append(f"- {r['model']}: " + ", ".join(f"{k}={v}" for k, v in diff.items()))
        if "before_settings" in r:
            diff = {k: v for k, v in r["before_settings"].items() if v != Settings().to_dict().get(k)}
            settings.append("  - previous autotune: " + ", ".join(f"{k}={v}" for k, v in diff.items()))
    return "\n".join(lines + settings) + "\n"


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
            req = request.StudyRequest(model_path=model, facts=facts, hw=hw, space=sp, seed=seed,
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
                if best is None and loop.best_value(st) is not None \
                        and truth.get(tuple(st.best_trial.params[k] for k in GRID), 0.0) >= target:
                    best = i
            out.append((visited, best))
    return out


def default_search(model: str) -> tuple[float, dict, list[float | None]]:
    """Wall time, tuned config and per-trial decode values of the default ``autotune search`` (fresh storage)."""
    with tempfile.TemporaryDirectory() as tmp:
        wall, record = timed_search(model, None, tmp)
        trials = optuna.load_study(study_name=record["study"]["name"],
                                   storage=record["study"]["storage"]).get_trials(deepcopy=False)
        return wall, record, [t.value if t.state == optuna.trial.TrialState.COMPLETE else None for t in trials]


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
    samples = decode_only(measure(model, grid, args.passes, "grid", metrics=("decode",)))  # passes are rounds
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
                   head_to_head=decode_only(measure(model, configs, args.rounds, "head-to-head", metrics=("decode",))))
    return row


def grid_samples(row: dict) -> dict[tuple, list[float]]:
    return {tuple(json.loads(k)[g] for g in GRID): v for k, v in row["grid_samples"].items()}


def grid_truth(row: dict) -> dict[tuple, float]:
    return {k: statistics.median(v) for k, v in grid_samples(row).items() if v}


def analyse(row: dict, seeds: int) -> dict:
    """What the raw samples say: grid optimum, how many configs come within 97 %, replayed studies."""
    model = str(catalog.fetch(row["model"]))
    facts, hw = read_facts(model), probe(bundled, measure_bandwidth=False)
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
    ap.add_argument("--before", metavar="TREE", help="an older autotune checkout: time its default search too")
    ap.add_argument("--before-from", metavar="JSON", help="instead of --before: the older search's time and "
                    "recommendation as an earlier run with --before saved them (its .json)")
    ap.add_argument("--rounds", type=int, default=4, help="side-by-side rounds")
    ap.add_argument("--grid", action="store_true", help="also the grid and the replayed sampler (slow)")
    ap.add_argument("--skip-default-search", action="store_true", help="with --grid: the grid and replay only")
    ap.add_argument("--passes", type=int, default=1, help=f"grid passes (each run repeats {WORK.reps} times)")
    ap.add_argument("--seeds", type=int, default=20, help="replayed studies per model")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: analyse the raw samples a run saved")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cpu = probe(bundled, measure_bandwidth=False).cpu_model
    out = Path(args.out)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        rows = []
        for name in args.models.split(","):
            rows.append(bench_model(name, args) if args.grid else
                        {**bench_search(name, args), "side_by_side_rounds": args.rounds})
            out.with_suffix(".json").write_text(json.dumps(rows, indent=1))  # a later failure keeps these
    if rows and "side_by_side" in rows[0]:
        text = search_table(rows, cpu)
    else:
        text = table(rows, [analyse(r, args.seeds) for r in rows], cpu)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
