"""Which of the recommended settings earn their keep: each one taken back to the engine default alone.

Reads the recommended configs that ``bench/search_bench.py`` saved, then measures, per model, the
recommended config and one variant per setting that differs from the engine defaults (that setting
back to its default), in rotated rounds of fresh processes, as ``search_bench.py`` measures.

    python bench/knob_ablation.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--rounds 4]
                                  [--source bench/search_results.json] [--out bench/knob_ablation.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from search_bench import WORK, fmt, measure

from autotune.engine import defaults as engine_defaults
from autotune.engine import bundled
from autotune.facts import catalog
from autotune.facts.probe import probe
from autotune.search.recommend import Spread
from autotune.vocabulary.settings import Settings


def variants(rec: Settings) -> dict[str, Settings]:
    """The recommended config, and per differing setting the config with that one setting at its default."""
    base = engine_defaults(rec.n_ctx)
    out = {"recommended": rec}
    for f in dataclasses.fields(Settings):
        default, chosen = getattr(base, f.name), getattr(rec, f.name)
        if default != chosen:
            v = rec.replace(**{f.name: default})
            if not v.refusals(False):  # e.g. V quantized without flash attention: the engine refuses it
                out[f"{f.name} {chosen} -> {default}"] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--source", default="bench/search_results.json")
    ap.add_argument("--out", default="bench/knob_ablation.md")
    args = ap.parse_args()
    recommended = {r["model"]: r["recommended_settings"] for r in json.loads(Path(args.source).read_text())}
    lines = [f"Decode tok/s on this machine ({probe(bundled, measure_bandwidth=False).cpu_model}), {args.rounds} rotated "
             f"rounds x {WORK.reps} repetitions; median (q25-q75) and ratio to the recommended config.", ""]
    for name in args.models.split(","):
        model = str(catalog.fetch(name, quiet=False))
        configs = variants(Settings.from_dict(recommended[name]))
        samples = measure(model, configs, args.rounds, name)
        ref = statistics.median(samples["recommended"])
        lines += [f"### {name}", "", "| config | decode tok/s | vs recommended |", "|---|---|---|"]
        for label, v in samples.items():
            lines.append(f"| {label} | {fmt(v)} | {Spread.of(v).median / ref:.2f} |")
        lines.append("")
        Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
