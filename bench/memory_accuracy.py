"""How close the memory model comes to the engine: prints a markdown table of max and median error per
component over the full grid, and the time of one estimate.

Grid: the three catalog models plus synthetic header-only shapes from 135M to 70B (llama, qwen2, qwen3
and a Gemma 3 sliding-window shape), contexts 512 .. 131072, K/V caches f16 / q8_0 / q4_0, flash attention on and off,
a few micro-batch sizes, swa_full on and off. KV, compute and output are checked against the engine's
no-allocation dry run; weights and the CPU_REPACK buffer against a real load (mmap and not) of the
catalog models and a Q4_0 synthetic one, since the dry run cannot see weight buffers.

    python bench/memory_accuracy.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

from autotune import engine, memory
from autotune.engine import bundled
from autotune.facts import catalog, synth
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import probe
from autotune.search import oracle
from autotune.vocabulary.settings import KV_SHORTLIST, Settings

CTXS = (512, 2048, 8192, 32768, 131072)
SYNTH = ("135m", "1b", "8b", "14b", "70b", "gemma3-4b", "qwen3-8b")


def grid(ctxs: tuple[int, ...], swa: bool) -> list[Settings]:
    out = []
    for n in ctxs:
        for fa in (False, True):
            for tk, tv in memory.cache_pairs(KV_SHORTLIST, fa):
                for batch, ubatch in ((512, 512), (2048, 256), (2048, 2048)):
                    for swa_full in ((True, False) if swa else (True,)):
                        out.append(Settings(n_ctx=n, n_batch=batch, n_ubatch=ubatch, flash_attn=fa, type_k=tk,
                                            type_v=tv, swa_full=swa_full, n_threads=1, n_threads_batch=1))
    return out


def models(tmp: Path, quick: bool) -> tuple[list[str], list[str]]:
    """Models for the dry-run grid, and models small enough for a real load (weights and repack)."""
    names = ["smollm2-135m"] if quick else list(catalog.CATALOG)
    real = [str(catalog.fetch(n)) for n in names]
    donor = real[0]
    paths = list(real)
    for shape in (("135m", "70b", "gemma3-4b", "qwen3-8b") if quick else SYNTH):
        paths.append(str(synth.write_model(tmp / f"{shape}.gguf", donor, synth.SHAPES[shape], header_only=True)))
    qwen2 = dataclasses.replace(synth.SHAPES["70b"], arch="qwen2")
    paths.append(str(synth.write_model(tmp / "qwen2-72b.gguf", donor, qwen2, header_only=True)))
    q4 = synth.write_model(tmp / "135m-q4_0.gguf", donor, synth.SHAPES["135m"], weight_type="Q4_0", header_only=True)
    return paths, real + [str(q4)]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="demo model and a few synthetic shapes only")
    args = ap.parse_args(argv)
    hw = probe(bundled, measure_bandwidth=False)
    errors: list[dict[str, float | None]] = []
    worst: dict[str, tuple[float, str]] = {}
    timings: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        grid_models, loadable = models(Path(tmp), args.quick)
        for path in grid_models:
            facts = read_facts(path)
            settings = grid((512, 8192, 131072) if args.quick else CTXS, facts.uses_swa)
            for row in oracle.verify(facts, settings, hw):
                if row["error_pct"] is None:
                    print(f"engine refused {Path(path).name} {row['settings']}: {row['error']}", file=sys.stderr)
                    continue
                errors.append(row["error_pct"])
                for k, v in row["error_pct"].items():
                    if v is not None and abs(v) > worst.get(k, (-1.0, ""))[0]:
                        s = row["settings"]
                        worst[k] = (abs(v), f"{facts.name} ctx {s.n_ctx} {s.type_k}/{s.type_v} "
                                            f"fa {s.flash_attn} ub {s.n_ubatch}")
            for s in settings[:: max(1, len(settings) // 10)]:
                memory.reserve.compute_buffers.cache_clear()
                t0 = time.perf_counter()
                memory.estimate(facts, s, hw)
                timings.append(time.perf_counter() - t0)
        for path in loadable:
            facts = read_facts(path)
            for mmap in (True, False):
                real = engine.loaded_buffers(path, Settings(use_mmap=mmap))
                e = memory.estimate(facts, Settings(n_threads=1, n_threads_batch=1, use_mmap=mmap), hw)
                host = e.device(memory.HOST)
                errors.append({
                    "weights (real load)": memory.error_pct(memory.as_logged(host.weights),
                                                       real.get("CPU_Mapped" if mmap else "CPU", 0)),
                    "repack (real load)": memory.error_pct(memory.as_logged(host.repack), real.get("CPU_REPACK", 0)),
                })
    summary = memory.summarize(errors)
    print(f"memory model vs engine ({len(errors)} comparisons; errors at the log's 0.01 MiB resolution)\n")
    print("| component | max abs error % | median abs error % | checks |")
    print("|---|---|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {v['max']:.4f} | {v['median']:.4f} | {v['n']} |")
    print(f"\nestimate time (cold cache; target: a median under 50 ms): median {statistics.median(timings) * 1000:.1f} ms, "
          f"max {max(timings) * 1000:.1f} ms over {len(timings)} estimates")
    for k, (v, where) in worst.items():
        if v > 0:
            print(f"worst {k}: {v:.4f} % at {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
