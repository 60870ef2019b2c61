"""``autotune fit`` against llama.cpp's own ``llama-fit-params`` on the same files and the same budget.

llama-fit-params is built from the vendored llama.cpp of the installed llama-cpp-python (a reference, not a
dependency)::

    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -DLLAMA_CURL=OFF && cmake --build build -j2 \\
        --target llama-fit-params

On a machine without a GPU both answer one question: the largest context whose memory fits the host. Both
get its budget as llama-fit-params takes it (total RAM, 1024 MiB kept free) and llama.cpp's defaults
(n_batch 2048, n_ubatch 512, flash attention on, f16 cache). Each answer is then priced the same way: the
weights from the tensor table plus the engine's own KV, compute and output figures at that context (no
mmap: on a CPU every weight is read for every token, so all of it must be resident). Models are the catalog
files and header-only files of real shapes (``autotune.facts.synth``).

    python bench/fit_bench.py --fit-params build/bin/llama-fit-params [--out bench/fit_results.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autotune import memory
from autotune.engine import bundled
from autotune.facts import catalog, synth
from autotune.facts.gguf_model import read_facts
from autotune.facts.probe import probe
from autotune.memory.fit import fit
from autotune.vocabulary.settings import Settings

MIB = 2**20
KEEP = 1024 * MIB  # llama-fit-params' default --fit-target
SHAPES = ("8b", "14b", "70b", "qwen3-8b", "gemma3-4b", "qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v2-lite",
          "phi3-mini", "gemma2-2b", "mamba-130m")


def fit_params(binary: str, model: str, no_repack: bool) -> tuple[int | None, float, str]:
    """(-c it chose or None, seconds, its last line)."""
    start = time.perf_counter()
    done = subprocess.run([binary, "-m", model, *(["-nr"] if no_repack else [])], capture_output=True, text=True)
    took = time.perf_counter() - start
    m = re.search(r"-c (\d+)", done.stdout)
    tail = (done.stdout.strip().splitlines() or done.stderr.strip().splitlines() or [""])[-1]
    if done.returncode != 0:
        tail = f"exit {done.returncode}: " + next((ln for ln in reversed(done.stderr.splitlines())
                                                  if "error" in ln.lower() or "ASSERT" in ln or "fail" in ln), tail)
    return (int(m.group(1)) if m and done.returncode == 0 else None), took, tail.strip()


def cold_cache(tmp: str) -> None:
    """A cache of this run's own (catalog models linked in): autotune's timings include its dry runs."""
    models = catalog.cache_dir() / "models"
    cache = Path(tmp) / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(models, target_is_directory=True)
    os.environ["AUTOTUNE_CACHE"] = str(cache)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fit-params", required=True, help="path of the llama-fit-params binary")
    ap.add_argument("--out", default="bench/fit_results.md")
    args = ap.parse_args()
    hw = probe(bundled, measure_bandwidth=False)
    hw = dataclasses.replace(hw, ram_available=hw.ram_total)  # llama-fit-params budgets total RAM on a CPU
    base = Settings(n_batch=2048, n_ubatch=512, flash_attn=True, use_mmap=False)
    donor = catalog.fetch("smollm2-135m")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [(name, str(catalog.fetch(name))) for name in catalog.CATALOG]
        cold_cache(tmp)
        for shape in SHAPES:
            path = synth.write_model(Path(tmp) / f"{shape}.gguf", donor, synth.SHAPES[shape], "Q4_K",
                                     header_only=True, vocab=2048)
            models.append((f"{shape} (header-only Q4_K)", str(path)))
        for label, path in models:
            facts = read_facts(path)
            for repack in (True, False):
                s = base.replace(use_extra_bufts=repack)
                ref_ctx, ref_s, ref_line = fit_params(args.fit_params, path, not repack)
                memory.dryrun.COST.__init__()
                start = time.perf_counter()
                ours = fit(facts, hw, None, s, ("f16", "q8_0", "q4_0"), KEEP)
                error = ""
                if all(r.estimate is None for r in ours):  # the engine's dry run dies on every placement
                    try:
                        memory.estimate(facts, s.replace(n_ctx=4096), hw)
                    except Exception as e:  # e.g. DeepSeek's attn_k_b in the AMX buffer
                        error = str(e).split("; engine:")[0].removeprefix(f"{path}: ")
                took = time.perf_counter() - start

                def priced(n_ctx: int | None, settings: Settings = s) -> float | None:
                    if not n_ctx:
                        return None
                    try:
                        e = memory.estimate(facts, settings.replace(n_ctx=n_ctx), hw)
                    except Exception:
                        return None
                    return sum(d.weights + d.repack + d.kv + d.compute + d.output for d in e.devices) / MIB

                by_kv = {r.settings.type_k: r.max_ctx for r in ours}
                budget = (hw.ram_total - KEEP) / MIB
                rows.append({
                    "model": label, "trained": facts.n_ctx_train, "repack": repack,
                    "fit_params_ctx": ref_ctx, "fit_params_mib": priced(ref_ctx), "fit_params_s": ref_s,
                    "fit_params_says": ref_line, "ours_ctx": by_kv.get("f16"), "ours_mib": priced(by_kv.get("f16")),
                    "ours_q8_0": by_kv.get("q8_0"), "ours_q4_0": by_kv.get("q4_0"), "ours_s": took,
                    "ours_error": error, "budget_mib": budget,
                })
                print(json.dumps(rows[-1]), flush=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"ram_total": hw.ram_total, "rows": rows}, indent=1))
    Path(args.out).write_text(table(rows, hw.ram_total))
    return 0


def table(rows: list[dict], ram_total: int) -> str:
    def ctx(n: int | None) -> str:
        return f"{n:,}" if n else "none"

    def cost(mib: float | None, budget: float) -> str:
        if mib is None:
            return "-"
        return f"{mib:,.0f}" + (" **over**" if mib > budget else "")

    out = [f"Budget: {ram_total / 2**30:.1f} GiB total RAM, 1024 MiB kept free ({(ram_total - KEEP) / MIB:,.0f} MiB), "
           "no GPU. MiB = weights + KV + compute + output at that context, priced by autotune's exact estimate.",
           "",
           "| model | extra buffers | trained | llama-fit-params -c | its MiB | autotune fit (f16) | its MiB | "
           "q8_0 K/V | q4_0 K/V | fit-params s | autotune s (cold) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = ctx(r["fit_params_ctx"]) if r["fit_params_ctx"] else f"failed ({r['fit_params_says'][:60]})"
        ours = ctx(r["ours_ctx"]) if not r["ours_error"] else f"refused ({r['ours_error'][:60]})"
        out.append(f"| {r['model']} | {'on' if r['repack'] else 'off (-nr)'} | {r['trained']:,} | {ref} | "
                   f"{cost(r['fit_params_mib'], r['budget_mib'])} | {ours} | {cost(r['ours_mib'], r['budget_mib'])} | "
                   f"{ctx(r['ours_q8_0'])} | {ctx(r['ours_q4_0'])} | {r['fit_params_s']:.2f} | {r['ours_s']:.2f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
