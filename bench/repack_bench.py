"""Extra buffer types (llama.cpp's repack: AMX / CPU_REPACK weight layouts) on vs off, per catalog model.

For each model, both arms are measured in rotated rounds of fresh processes (``recommend.measure_rounds``):
decode and prefill tok/s as median (q25-q75) over every repetition, the model buffers the engine logged and
the peak RSS. An arm that crashes is reported with its reason. The engine self-check's time is measured too
(a fresh verdict, not a remembered one). Which build ran is printed: on a Xeon with AMX the default build
crashes with extra buffers on; a build without AMX kernels shows what CPU_REPACK is worth.

    python bench/repack_bench.py [--rounds 4] [--models smollm2-135m,...] [--out bench/repack_results.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autotune import engine
from autotune.engine import Workload, bundled
from autotune.facts import catalog
from autotune.facts.probe import probe
from autotune.search import health, recommend
from autotune.search.recommend import Candidate, Spread
from autotune.vocabulary.settings import Settings

WORK = Workload(prompt_tokens=256, gen_tokens=32, reps=3)
MIB = 2**20


def fmt(s: Spread) -> str:
    return f"{s.median:.1f} ({s.q25:.1f}-{s.q75:.1f})" if s.n else "crashed"


def measure(name: str, rounds: int, threads: int) -> dict:
    path = str(catalog.fetch(name))
    base = Settings(n_ctx=2048, n_threads=threads, n_threads_batch=threads)
    arms = [Candidate("on", base), Candidate("off", base.replace(use_extra_bufts=False))]
    recommend.measure_rounds(engine.bundled, path, arms, WORK, rounds)
    hw = probe(bundled, measure_bandwidth=False)
    health.forget(path, base, hw, engine.bundled)  # a fresh verdict: the check's own cost
    verdict = health.check(path, base, hw, engine.bundled)
    out = {"model": name, "self_check_s": verdict.seconds, "self_check_pins": verdict.pins}
    for arm in arms:
        out[arm.label] = {
            "decode": arm.spread("decode", WORK).to_dict(), "prefill": arm.spread("prefill", WORK).to_dict(),
            # a real load (no batch): it works even where decoding with these buffers crashes
            "buffers": engine.loaded_buffers(path, arm.settings),
            "peak_rss": max((r.peak_rss for r in arm.runs), default=0),
            "failures": arm.failures[:1],
        }
    return out


def table(rows: list[dict], build: str) -> str:
    lines = [f"Engine build: {build}", "",
             "| model | repack | decode tok/s | prefill tok/s | model buffers, real load (MiB) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for arm in ("on", "off"):
            a = r[arm]
            bufs = ", ".join(f"{k} {v / MIB:,.1f}" for k, v in a["buffers"].items()) or "-"
            decode = Spread(**a["decode"])
            rss = f"{a['peak_rss'] / MIB:,.0f}" if decode.n else f"- ({a['failures'][0].split(';')[0]})"
            lines.append(f"| {r['model']} | {arm} | {fmt(decode)} | {fmt(Spread(**a['prefill']))} | {bufs} | {rss} |")
    lines.append("")
    lines.append("Self-check: " + "; ".join(f"{r['model']} {r['self_check_s']:.1f} s"
                                             + (f" (pinned {r['self_check_pins']})" if r["self_check_pins"] else "")
                                             for r in rows))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default=",".join(catalog.CATALOG))
    p.add_argument("--out", help="append the markdown table here; the JSON goes beside it")
    args = p.parse_args()
    info = engine.build_info()
    build = f"llama-cpp-python {info.version}, features {' '.join(info.cpu_features)}"
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, args.rounds, args.threads))
        print(json.dumps(rows[-1]), file=sys.stderr)
    text = table(rows, build)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")
        with open(Path(args.out).with_suffix(".json"), "a") as f:
            f.write(json.dumps({"build": build, "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
