"""Speculative decoding in llama-server: ``autotune spec`` on the Qwen2.5-Coder 1.5B with the 0.5B (and the
vocabulary-incompatible SmolLM2-135M) as draft candidates, and on the demo model (n-gram kinds only: nothing is
smaller than it). Every kind that applies, on code, prose and edits, side by side with no speculation.

    python bench/spec_bench.py [--models pair,demo] [--prompts 1] [--gen-tokens 64] [--rounds 4]
                               [--out bench/spec_results.md]

Writes the table (``--out``) and the raw reports (same name, ``.json``). Fetches the models once (about 1.7 GB).
Run it on a quiet machine: decode is CPU-bound and a second busy process would be measured too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from autotune.engine import bundled
from autotune.facts import catalog
from autotune.facts.probe import probe

MODELS = {"pair": ("qwen2.5-coder-1.5b", ("qwen2.5-coder-0.5b", "smollm2-135m")),
          "demo": (catalog.DEMO_MODEL, ())}


def run(name: str, args: argparse.Namespace) -> dict:
    """``autotune spec`` as a user runs it, its JSON report back."""
    main, drafts = MODELS[name]
    cmd = [str(Path(sys.executable).with_name("autotune")), "spec", str(catalog.fetch(main)), "--json",
           "--prompts", str(args.prompts), "--gen-tokens", str(args.gen_tokens), "--rounds", str(args.rounds),
           "--storage", args.storage]
    if drafts:
        cmd += ["--draft", *(str(catalog.fetch(d)) for d in drafts)]
    if args.trials:
        cmd += ["--trials", str(args.trials)]
    print("$", " ".join(cmd), file=sys.stderr)
    start = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return {"name": name, "main": main, "drafts": list(drafts), "report": json.loads(out),
            "wall_s": time.perf_counter() - start}


def cell(e: dict, key: str, digits: int = 2, prefix: str = "") -> str:
    s = e[key]
    return f"{prefix}{s['median']:.{digits}f} ({s['q25']:.{digits}f}-{s['q75']:.{digits}f})" if s and s["n"] else "-"


def table(results: list[dict], cpu: str, args: argparse.Namespace) -> str:
    lines = [f"On this machine ({cpu}): `autotune spec MODEL --prompts {args.prompts} --gen-tokens {args.gen_tokens} "
             f"--rounds {args.rounds}` with the reference llama-server: each kind's llama.cpp defaults and a study "
             "of their parameters, then every kind's best per kind of work re-measured beside no speculation in "
             f"{args.rounds} rotated rounds of fresh servers, greedy. Decode tok/s and speed-up (per round, against "
             "that round's no speculation) as median (q25-q75); \"at most\": what its accepted tokens could save (every "
             "one a decode step); a win needs the interquartile ranges apart and its first quartile within that.", ""]
    for res in results:
        d = res["report"]
        lines += [f"### {Path(d['model']).name}" + (f" (drafts: {', '.join(res['drafts'])})" if res["drafts"] else ""),
                  "", "| speculation | work | decode tok/s | speed-up | at most | vs none | acceptance | accepted/step | reply |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in d["results"]:
            for w, e in r["workloads"].items():
                acc = f"{e['acceptance']:.0%} of {e['drafted']}" if e["acceptance"] is not None else "-"
                aps = f"{e['accepted_per_step']:.2f}" if e["accepted_per_step"] is not None else "-"
                most = f"x{e['ceiling']:.2f}" if e["ceiling"] else "-"
                versus = e["versus"] + (" (noise)" if e["doubt"] else "")
                lines.append(f"| {r['label']} | {w} | {cell(e, 'decode', 1)} | {cell(e, 'speedup', 2, 'x')} | {most} | "
                             f"{versus} | {acc} | {aps} | {'same' if e['unchanged'] else 'differs'} |")
        lines += [""] + [f"- not measured: {s['kind']}: {s['why']}" for s in d["skipped"]]
        lines += [f"- {v}" for v in d["verdicts"].values()]
        lines += [f"- **{d['recommendation']['verdict'].split(':')[0]}**; the stage took {d['wall_s']:.0f} s", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="pair,demo", help="pair, demo or both")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--trials", type=int, help="study trials (default: the stage's, two per kind)")
    ap.add_argument("--storage", default="sqlite:///bench/spec_studies.db")
    ap.add_argument("--out", default="bench/spec_results.md")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",")]
    if unknown := [m for m in names if m not in MODELS]:
        ap.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    results = [run(n, args) for n in names]
    text = table(results, probe(bundled, measure_bandwidth=False).cpu_model, args)
    print(text)
    out = Path(args.out)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
