"""Speculative decoding on the real pair: Qwen2.5-Coder 1.5B (main) with the 0.5B as draft, SmolLM2-135M as
the vocab-incompatible candidate. Prints verdicts, then per draft length and prompt kind: acceptance,
accepted tokens per main step, decode tok/s against the main alone, and whether the greedy output
matched, and the share of decode time spent drafting; then the measured memory next to the prediction. Fetches the models once (about 1.7 GB).

    python bench/draft_bench.py [--quick] [--threads N] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autotune import catalog, draft
from autotune.probe import probe
from autotune.settings import Settings

MIB = 2**20


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n=4 only, code only, two rounds")
    ap.add_argument("--threads", type=int, help="engine threads (default: physical cores)")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--out", help="write the full report as JSON here")
    args = ap.parse_args(argv)
    main_path = str(catalog.fetch("qwen2.5-coder-1.5b"))
    candidates = [str(catalog.fetch("qwen2.5-coder-0.5b")), str(catalog.fetch("smollm2-135m"))]
    hw = probe(measure_bandwidth=False)
    threads = args.threads or hw.physical_cores
    settings = Settings(n_ctx=args.ctx, n_threads=threads, n_threads_batch=threads, flash_attn=True)
    plan = draft.Plan(ns=(4,), kinds=("code",), rounds=2) if args.quick else draft.Plan()
    report = draft.evaluate(main_path, candidates, settings, hw, plan,
                            on_run=lambda label, kind, m: print(f"  {label} [{kind}]: "
                                                                 + (f"{m.decode:.1f} tok/s" if m.ok else m.error),
                                                                 file=sys.stderr))
    data = report.to_dict()
    print(f"## Draft candidates for {report.main.name}\n")
    print("| candidate | params | verdict | reasons / advice |\n|---|---|---|---|")
    for c in data["candidates"]:
        params = f"{c['n_params'] / 1e9:.2f}B" if c["n_params"] else "-"
        print(f"| {Path(c['path']).name} | {params} | {'compatible' if c['compatible'] else 'rejected'} | "
              f"{'; '.join(c['reasons'] + c['warnings']) or '-'} |")
    print(f"\n## Measured ({hw.cpu_model}, {threads} threads, {plan.rounds} rounds x {plan.reps} reps, "
          f"{plan.prompt_tokens}-token prompt, {plan.gen_tokens} generated)\n")
    print("| configuration | text | decode tok/s median (IQR) | speedup | acceptance | accepted/step | drafting | output |")
    print("|---|---|---|---|---|---|---|---|")
    for r in data["results"]:
        for kind, e in r["kinds"].items():
            s = e["decode"]
            spread = f"{s['median']:.1f} ({s['q25']:.1f}-{s['q75']:.1f})" if s["n"] else "failed"
            if "speedup" not in e:
                print(f"| {r['label']} | {kind} | {spread} | - | - | - | - | reference |")
                continue
            verdict = " clear win" if e["clear_win"] else " clear loss" if e["clear_loss"] else " (noise)"
            speed = f"x{e['speedup']:.2f}{verdict}" if e["speedup"] else "-"
            acc = f"{e['acceptance']:.0%}" if e["acceptance"] is not None else "-"
            aps = f"{e['accepted_per_step']:.2f}" if e["accepted_per_step"] is not None else "-"
            share = f"{e['draft_share']:.0%}" if e["draft_share"] is not None else "-"
            out = "same" if e["outputs_match"] else e["mismatch"]
            print(f"| {r['label']} | {kind} | {spread} | {speed} | {acc} | {aps} | {share} | {out} |")
    print(f"\n**{data['recommendation']['verdict']}**\n")
    print_memory(report, plan)
    print(f"\nwall time: {report.wall_s:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=2))
    return 0


def print_memory(report: draft.DraftReport, plan: draft.Plan) -> None:
    """The predicted host memory of main + draft (draft on the CPU) next to each configuration's measured
    peak RSS; the logits llama-cpp-python keeps grow with the context, so they are also given for the
    tokens these runs used."""
    compatible = [c for c in report.candidates if c.compatible and c.memory.get("placements")]
    if not compatible or not report.rows:
        return
    cpu = next(r for r in compatible[0].memory["placements"] if r["placement"] == "cpu")
    host = next(d for d in cpu["devices"] if d["device"] == "host")
    used = plan.prompt_tokens + plan.gen_tokens + max(plan.ns)
    spec_used = draft.speculative_host_bytes(report.main, report.settings.replace(
        n_batch=min(report.settings.n_batch, plan.prompt_tokens)), used)
    print("| | MiB |\n|---|---|")
    print(f"| predicted main alone (host) | {host['main'] / MIB:,.0f} |")
    print(f"| predicted draft (host, {cpu['draft_n_ctx']:,}-token draft context) | {host['draft'] / MIB:,.0f} |")
    print(f"| predicted speculative logits, full context | {host['speculative'] / MIB:,.0f} |")
    print(f"| predicted speculative logits, {used} tokens used | {spec_used / MIB:,.0f} |")
    for r in report.rows:
        if r["peak_rss"]:
            print(f"| measured peak RSS, {r['label']} (median) | {r['peak_rss'] / MIB:,.0f} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
