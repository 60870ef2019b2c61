"""Command-line glue: parse flags, call the modules, print tables or JSON. No logic of its own.

Every user-facing failure is an ``AutotuneError`` and becomes one line on stderr with a non-zero exit;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import AutotuneError
from .pipeline import (
    Reporter,  # parsing the arguments loads Optuna anyway (the search choices come from it)
)

console = Console()
MIB = 2**20
GIB = 2**30


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:,.1f} MiB"


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# --------------------------------------------------------------------------------------------- probe


def cmd_probe(args: argparse.Namespace) -> int:
    from .probe import probe

    hw = probe(measure_bandwidth=not args.no_bandwidth)
    if args.json:
        print_json(hw.to_dict())
        return 0
    t = Table(title="autotune probe", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("CPU", hw.cpu_model)
    t.add_row("cores", f"{hw.physical_cores} physical, {hw.logical_cores} logical (size thread pools by physical)")
    t.add_row("engine CPU features", " ".join(hw.cpu_features) or "-")
    t.add_row("RAM", f"{gib(hw.ram_total)} total, {gib(hw.ram_available)} available")
    t.add_row("swap", f"{gib(hw.swap_total)} total, {gib(hw.swap_free)} free")
    bw = f"{hw.bandwidth_gbs:.1f} GB/s (measured copy)" if hw.bandwidth_gbs else "not measured"
    t.add_row("memory bandwidth", bw)
    t.add_row("engine", f"llama-cpp-python {hw.engine_version}, backend {hw.backend}, "
              f"{'can' if hw.can_offload else 'cannot'} offload to GPU")
    if not hw.gpus:
        t.add_row("GPUs", "none found")
    for g in hw.gpus:
        extra = ", ".join(x for x in (g.driver and f"driver {g.driver}", g.compute_capability and f"cc {g.compute_capability}") if x)
        t.add_row(f"gpu{g.index} ({g.backend})", f"{g.name}: {gib(g.vram_free)} free of {gib(g.vram_total)}"
                  + (f" ({extra})" if extra else ""))
    for note in hw.notes:
        t.add_row("note", note)
    t.add_row("fingerprint", hw.fingerprint())
    console.print(t)
    return 0


# -------------------------------------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    """The engine self-check on its own, and a look at the environment: does a short real run of the model
    survive on this machine, and if every load dies, why?"""
    from . import catalog, engine, health, space
    from .engine import diagnose
    from .gguf_model import read_facts
    from .probe import probe

    model = args.model or str(catalog.fetch(quiet=False))
    facts = read_facts(model)
    hw = probe(measure_bandwidth=False)
    pins = space.parse_pins(args.set or [])
    start = engine.defaults(min(4096, facts.n_ctx_train or 4096)).replace(**pins)
    if args.recheck:
        health.forget(model, start, hw, frozenset(pins))
    with console.status("the environment: the model's vocabulary loaded with either C++ runtime first ..."):
        env = diagnose.diagnose(model)
    crash, verdict = "", None
    with console.status("engine self-check: load, a multi-token batch, a few decode steps ..."):
        try:
            verdict = health.check(model, start, hw, pinned=frozenset(pins))
        except health.EngineCrash as e:
            crash = str(e)
    if args.json:
        print_json({**(dataclasses.asdict(verdict) if verdict else {"ok": False, "crash": crash}), "model": model,
                    "cpu_features": list(hw.cpu_features),
                    "environment": {**dataclasses.asdict(env), "order_fault": env.order_fault}})
        return 3 if crash else 0
    console.print(f"engine: llama-cpp-python {hw.engine_version}, backend {hw.backend}; CPU features: "
                  + " ".join(hw.cpu_features))
    for line in env.lines():
        console.print(line, markup=False)
    if crash:
        print(f"autotune: error: {crash}", file=sys.stderr)
        return 3
    assert verdict is not None
    console.print(verdict.line())
    return 0


# ------------------------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    from .gguf_model import read_facts

    facts = read_facts(args.model)
    if args.json:
        print_json(facts.summary())
        return 0
    t = Table(title=f"autotune inspect: {facts.path}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    kv = facts.n_head_kv
    rows = [
        ("name", facts.name),
        ("architecture", facts.architecture),
        ("file type", f"{facts.file_type} ({mib(facts.file_size)} on disk)"),
        ("parameters", f"{facts.n_params / 1e9:.3f} B"),
        ("layers", str(facts.n_layer)),
        ("embedding / FFN", f"{facts.n_embd} / {facts.n_ff}"),
        ("heads / KV heads", f"{facts.n_head} / {kv[0] if len(set(kv)) == 1 else list(kv)}"
         + (f"  (GQA x{facts.n_head // max(kv)})" if 0 < max(kv) < facts.n_head else "")),
        ("K / V head dim", f"{facts.head_dim_k} / {facts.head_dim_v}"),
        ("experts", f"{facts.n_expert} per layer, {facts.n_expert_used} used per token, on "
                    f"{len(facts.moe_layers)} of {facts.n_layer} layers" if facts.n_expert else "none (dense)"),
        ("trained context", f"{facts.n_ctx_train:,}"),
        ("sliding window", f"{facts.n_swa} tokens on layers {[i for i, s in enumerate(facts.swa_layers) if s]}"
         if facts.uses_swa else "none"),
        ("vocab", f"{facts.vocab_type}, {facts.n_vocab:,} tokens, BOS {facts.bos_id} (add {facts.add_bos}), "
         f"EOS {facts.eos_id} (add {facts.add_eos})"),
        ("weights", f"{mib(facts.weight_bytes)} total"),
        ("token embedding", mib(facts.token_embd_bytes)),
        ("output layer", mib(facts.output_bytes) + (" (tied to token embedding)" if facts.tied_embeddings else "")),
    ]
    sizes = facts.layer_bytes
    if sizes:
        same = len(set(sizes)) == 1
        rows.append(("per layer", f"{mib(sizes[0])} x {len(sizes)}" if same else
                     f"{mib(min(sizes))} .. {mib(max(sizes))} (sum {mib(sum(sizes))})"))
    for r in rows:
        t.add_row(*r)
    console.print(t)
    return 0


# -------------------------------------------------------------------------------------------- memory


def cmd_memory(args: argparse.Namespace) -> int:
    from . import memory
    from .errors import EngineDied, ModelError
    from .gguf_model import read_facts
    from .probe import probe
    from .settings import Settings

    facts = read_facts(args.model)
    s = Settings(
        n_ctx=args.ctx, n_gpu_layers=args.ngl, n_batch=args.batch, n_ubatch=args.ubatch, flash_attn=args.fa == "on",
        type_k=args.type_k, type_v=args.type_v, swa_full=args.swa_full == "on", use_extra_bufts=args.repack == "on",
        n_cpu_moe=args.n_cpu_moe,
    ).check()  # contradictory flags (n_ubatch > n_batch included) are the user's to fix, not ours to clamp
    hw = probe(measure_bandwidth=False)
    notes = []
    warning = memory.beyond_trained(facts, s.n_ctx)
    if warning:
        notes.append(warning)
    gap = memory.replay_gap(facts)
    if gap:
        notes.append(f"priced by the engine's own dry run ({gap})")
    if s.n_gpu_layers and not hw.offload_gpus:
        notes.append("no GPU this engine build can offload to: --ngl is ignored, everything stays on the host")
    elif hw.offload_gpus and not memory.gpu_engine(hw):
        notes.append("the GPU split follows llama.cpp's placement rules, priced by a host-only engine (projected)")
    out: dict[str, Any] = {"model": facts.path, "architecture": facts.architecture, "notes": notes}
    top = max(facts.n_ctx_train or 131072, s.n_ctx)
    pairs = memory.cache_pairs(("f16", "q8_0", "q4_0"), s.flash_attn)
    started = time.perf_counter()
    out["estimate"] = memory.estimate(facts, s, hw).to_dict()
    if args.ctx_sweep:
        ctxs, n = [], 512
        while n < top:
            ctxs.append(n)
            n *= 2
        out["ctx_sweep"] = memory.ctx_sweep(facts, s, hw, ctxs + [top], [k for k, _ in pairs])
    if args.max_ctx:
        gpus = bool(hw.offload_gpus)
        offloads = sorted({0, s.n_gpu_layers, facts.n_layer + 1} if gpus else {0})
        rows = []
        for tk, tv in pairs:
            for ngl in offloads:
                choice = s.replace(type_k=tk, type_v=tv, n_gpu_layers=ngl)
                best = memory.max_ctx(facts, choice, hw, limit=top)
                e = memory.estimate(facts, choice.replace(n_ctx=best or 256), hw)
                rows.append({"type_k": tk, "type_v": tv, "n_gpu_layers": ngl, "max_ctx": best,
                             "total": e.total if best else None})
        out["max_ctx"] = rows
    if args.verify:
        out["verify"] = [
            {"predicted": r["predicted"], "engine": r["engine"], "error_pct": r["error_pct"], "error": r["error"]}
            for r in memory.verify(facts, [s], hw)
        ]
        if memory.gpu_engine(hw):  # and the real peak beside it
            out["peak"] = memory.peak(facts, s, hw)
    cost = memory.dryrun.COST
    out["dry_runs"] = {"children": cost.runs, "settings": cost.settings, "seconds": round(cost.seconds, 3),
                       "wall_s": round(time.perf_counter() - started, 3)}
    if args.json:
        print_json(out)
        return 0
    for note in notes:
        console.print(f"note: {note}")
    est = out["estimate"]
    t = Table(title=f"memory: {facts.name}, n_ctx {est['n_ctx']:,}, K {s.type_k} / V {s.type_v}, "
                    f"FA {args.fa}, ub {est['n_ubatch']}, GPU layers {est['gpu_layers']}"
                    + (" + output" if est["output_on_gpu"] else ""))
    t.add_column("")
    for d in est["devices"]:
        t.add_column(d["device"], justify="right")
    for key, label in (("weights", "weights"), ("repack", "AMX / CPU repack"), ("kv", "KV cache"), ("compute", "compute"),
                       ("output", "output"), ("overhead", "fixed overhead"), ("total", "[bold]total[/bold]"),
                       ("budget", "free memory"), ("margin", "margin kept free")):
        t.add_row(label, *(mib(d[key]) for d in est["devices"]))
    t.add_row("fits", *("[green]yes[/green]" if d["fits"] else "[red]no[/red]" for d in est["devices"]))
    console.print(t)
    caches = ", ".join(f"{c['cells']:,} cells (K {mib(c['k'])}, V {mib(c['v'])})" for c in est["kv_caches"])
    verdict = "fits" if est["fits"] else f"does NOT fit: {mib(est['shortfall'])} over"
    console.print(f"KV caches: {caches}\ntotal {mib(est['total'])}: {verdict} "
                  "(keeping max(512 MiB, 5 %) of each device free; overhead is a fixed allowance)")
    paid = (f": {cost.settings} settings in {cost.runs} child process(es), {cost.seconds:.2f} s"
            if cost.runs else ", answered from the cache" if est["source"] != memory.REPLAY else "")
    console.print(f"source: {est['source']}{paid}")
    if "ctx_sweep" in out:
        t = Table(title=f"footprint against context (FA {'on' if s.flash_attn else 'off'}, ub {s.n_ubatch}, "
                        f"{'GPU layers ' + str(s.n_gpu_layers) if hw.offload_gpus else 'CPU'})")
        t.add_column("n_ctx", justify="right")
        for tk, tv in pairs:
            t.add_column(f"K {tk} / V {tv}\nKV / total", justify="right")
        by_ctx: dict[int, dict[tuple[str, str], dict[str, Any]]] = {}
        for r in out["ctx_sweep"]:
            by_ctx.setdefault(r["n_ctx"], {})[(r["type_k"], r["type_v"])] = r
        for n, cells in by_ctx.items():
            t.add_row(f"{n:,}", *(
                f"{mib(c['kv'])} / " + (f"{mib(c['total'])}" if c["fits"] else f"[red]{mib(c['total'])}[/red]")
                for c in (cells[p] for p in pairs)))
        console.print(t)
        console.print("[red]red[/red]: does not fit this machine's free memory with the safety margin")
    if "max_ctx" in out:
        t = Table(title=f"largest context that fits (FA {'on' if s.flash_attn else 'off'}, limit {top:,})")
        for col in ("K / V", "GPU layers", "max n_ctx", "total at max"):
            t.add_column(col, justify="right" if col != "K / V" else "left")
        for r in out["max_ctx"]:
            t.add_row(f"{r['type_k']} / {r['type_v']}", str(r["n_gpu_layers"]),
                      f"{r['max_ctx']:,}" if r["max_ctx"] else "[red]none[/red]", mib(r["total"]))
        console.print(t)
    for r in out.get("verify", []):
        if r["engine"] is None:
            raise ModelError(f"{facts.path}: the engine refused these settings: {r['error']}")
        t = Table(title="prediction vs the engine's dry run (no allocation)")
        for col in ("component", "predicted", "engine", "error"):
            t.add_column(col, justify="left" if col == "component" else "right")
        for k in memory.COMPONENTS:
            err = r["error_pct"][k] if r["error_pct"] else None
            t.add_row(k, mib(r["predicted"][k]) if r["predicted"] else "unsupported", mib(r["engine"][k]),
                      "-" if err is None else f"{err:+.2f} %")
        console.print(t)
        console.print("The dry run cannot see the AMX / CPU_REPACK buffers or the fixed overhead: both are left out here. "
                      "Errors are taken at the log's 0.01 MiB resolution.")
    if "peak" in out:
        p = out["peak"]
        if not p["ok"]:
            raise EngineDied(f"{facts.path}: the real run for the peak failed: {p['error']}")
        console.print(f"real run ({p['prompt']}-token prompt after {p['depth']:,} tokens of history): GPU peak "
                      f"{mib(p['peak_vram'])} (NVML), the engine's GPU buffers {mib(p['gpu_buffers'])}; predicted "
                      f"{mib(p['predicted_gpu'])} ({p['error_pct']:+.1f} %)")
    return 0


# ----------------------------------------------------------------------------------------------- fit


def cmd_fit(args: argparse.Namespace) -> int:
    from . import memory
    from .fit import fit
    from .gguf_model import read_facts
    from .probe import probe
    from .settings import Settings

    facts = read_facts(args.model)
    base = Settings(n_batch=args.batch, n_ubatch=args.ubatch, use_extra_bufts=args.repack == "on").check()
    keep = None if args.margin is None else int(args.margin * 2**20)
    hw = probe(measure_bandwidth=False)
    started = time.perf_counter()
    rows = fit(facts, hw, args.ctx, base, tuple(t.strip() for t in args.kv.split(",") if t.strip()), keep,
               args.beyond_trained)
    target = rows[0].settings.n_ctx
    cost = memory.dryrun.COST
    if args.json:
        print_json({"model": facts.path, "n_ctx": target, "margin": "default" if keep is None else keep,
                    "placements": [r.to_dict() for r in rows], "wall_s": round(time.perf_counter() - started, 3),
                    "dry_runs": {"children": cost.runs, "settings": cost.settings, "seconds": round(cost.seconds, 3)}})
        return 0
    warning = memory.beyond_trained(facts, target)
    if warning:
        console.print(f"note: {warning}")
    first = next((r.estimate for r in rows if r.estimate), None)
    devices = [d.device for d in first.devices] if first else ["host"]
    t = Table(title=f"fit: {facts.name} at n_ctx {target:,} (flash attention on; keeping "
                    f"{'max(512 MiB, 5 %)' if keep is None else mib(keep)} free per device)")
    for col in ("K / V", "placement", *(f"{d} at {target:,}" for d in devices), "holds it", "largest n_ctx"):
        t.add_column(col, justify="left" if col in ("K / V", "placement") else "right")
    for r in rows:
        use = [mib(r.estimate.device(d).total) if r.estimate else "refused" for d in devices]
        t.add_row(f"{r.settings.type_k} / {r.settings.type_v}", r.what, *use,
                  "[green]yes[/green]" if r.holds_target else "[red]no[/red]",
                  f"{r.max_ctx:,}" if r.max_ctx else "[red]none[/red]")
    console.print(t)
    holding = [r for r in rows if r.holds_target]
    if holding:
        one = holding[0].settings
        pin = " ".join(f"--set {k}={getattr(one, k)}" for k in ("type_k", "type_v", "n_gpu_layers", "n_cpu_moe")
                       if k.startswith("type") or getattr(one, k))
        console.print(f"{len(holding)} placement(s) hold {target:,} tokens: the search should measure them "
                      f"(autotune search {facts.path} --ctx {target}; to try one alone: {pin})")
    else:
        best = max(rows, key=lambda r: r.max_ctx)
        console.print(f"[red]no placement holds {target:,} tokens[/red]; the most is {best.max_ctx:,} "
                      f"({best.settings.type_k} / {best.settings.type_v}, {best.what})")
    console.print(f"priced by {rows[0].estimate.source if rows[0].estimate else 'the engine'}"
                  + (f": {cost.settings} settings in {cost.runs} dry-run child process(es), {cost.seconds:.2f} s"
                     if cost.runs else "") + f"; {time.perf_counter() - started:.2f} s in all")
    return 0


# -------------------------------------------------------------------------------------------- search


def cmd_search(args: argparse.Namespace) -> int:
    import shlex

    from . import export, flags, pipeline, space
    from .settings import Settings

    start, model, ctx = None, args.model, args.ctx
    if args.from_cmdline:
        cmd = flags.parse_server_flags(shlex.split(args.from_cmdline))
        start, model = cmd.settings, args.model or cmd.model or None
        ctx = ctx or (start.n_ctx if start.n_ctx != Settings().n_ctx else None)
        if cmd.other:
            console.print(f"from your command line, kept as you had them (not tuned): {shlex.join(cmd.other)}")
        if start.draft_model:
            console.print("your draft model is left to the draft stage (--draft PATH); the study tunes the main model")
    given = {k: v for k, v in (("prompt_tokens", args.prompt_tokens), ("gen_tokens", args.gen_tokens),
                               ("reps", args.reps)) if v is not None}
    workload = dataclasses.replace(pipeline.HOST_WORKLOAD, **given) if given else None  # None: the machine's
    options = pipeline.TuneOptions(
        ctx=ctx, objective=args.objective or pipeline.TuneOptions.objective, trade=args.objective is not None,
        patience=args.patience, pareto=args.pareto, trials=args.trials, timeout=args.timeout,
        trial_timeout=args.trial_timeout, storage=args.storage, pins=space.parse_pins(args.set or []), seed=args.seed,
        workload=workload, top_k=args.top_k, rounds=args.rounds,
        kv_quality=args.kv_quality, recommend=not args.no_recommend, draft=args.draft, depth=args.depth,
        start=start, engine=args.engine)
    try:
        tuned = pipeline.tune(model, options, CliReporter())
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the study is saved; run the same command again to resume[/]")
        return 130
    if tuned is None:
        return 0
    print_recommendation(tuned.record)
    if args.out:
        with open(args.out, "w") as f:
            f.write(export.render(tuned.record, args.format))
        console.print(f"wrote {args.out} ({args.format})")
    return 0


class CliReporter(Reporter):
    """``tune``'s progress on the terminal: spinners, tables, a progress bar."""

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[Callable[[str], None]]:
        with console.status(text) as status:
            yield status.update

    def note(self, text: str) -> None:
        console.print(f"[yellow]{text}[/]")

    def health(self, verdict: Any) -> None:
        console.print(verdict.line())

    def study(self, st: Any, storage_url: str) -> None:
        finished = [t for t in st.get_trials(deepcopy=False) if t.state.is_finished()]
        console.print(f"[bold]study[/] {st.study_name}  ({len(finished)} finished trials stored in {storage_url})")

    def kv_quality(self, quality: dict[str, Any], forced: dict[str, Any]) -> None:
        print_kv_quality(quality, forced)

    def space(self, sp: Any, hw: Any, pins: dict[str, Any], forced: dict[str, Any]) -> None:
        print_space(sp, hw, pins, forced)

    @contextlib.contextmanager
    def trials(self, total: int, objective: str) -> Iterator[Callable[[Any], None]]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]trial {task.completed}/{task.total}"), BarColumn(), TimeElapsedColumn(),
                       TextColumn("{task.description}"), console=console)
        unit = "s" if objective == "ttft" else "tok/s"
        with bar:
            task = bar.add_task("starting", total=total)

            def show(p: Any) -> None:
                best = f"best {p.best:.2f} {unit}" if p.best is not None else "best -"
                bar.update(task, completed=p.done, description=f"{best} | {p.complete} ok, {p.pruned} pruned, "
                           f"{p.failed} failed | {p.last[:60]}")

            yield show

    def trials_done(self, st: Any) -> None:
        print_trials_summary(st)

    def draft(self, config: dict[str, Any], report: Any) -> None:
        if report is not None:
            print_draft_report(report.to_dict())
        else:
            console.print(config["draft"]["recommendation"]["verdict"])

    def depth_sweep(self, rows: list[dict[str, Any]]) -> None:
        t = Table(title="the recommendation against context depth (tokens already in the cache)")
        for col in ("depth", "decode tok/s", "prefill tok/s", "time to first token"):
            t.add_column(col, justify="right")
        for r in rows:
            if r["ok"]:
                t.add_row(f"{r['depth']:,}", f"{r['decode']:.1f}", f"{r['prefill']:.1f}", f"{r['ttft'] * 1000:.0f} ms")
            else:
                t.add_row(f"{r['depth']:,}", f"[red]{r['error'][:60]}[/red]", "", "")
        console.print(t)


def print_space(sp: Any, hw: Any, pins: dict[str, Any], forced: dict[str, Any]) -> None:
    """What the study will search, so a user sees before the first trial what is tuned and what is held."""
    t = Table(title="search space")
    t.add_column("knob")
    t.add_column("values")
    for name, (low, high) in sp.int_ranges.items():
        hint = f"  (physical cores: {hw.physical_cores})" if name.startswith("n_threads") else ""
        t.add_row(name, f"{low} … {high}{hint}")
    for name, choices in sp.params.items():
        label = {"batch_factor": "n_batch = n_ubatch ×", "attention": "flash_attn:type_k:type_v"}.get(name, name)
        t.add_row(label, ", ".join(str(c) for c in choices))
    for name, value in pins.items():
        t.add_row(name, f"{value}  [dim](pinned by --set)[/]")
    for name, value in forced.items():
        t.add_row(name, f"{value}  [dim](pinned by the engine self-check)[/]")
    console.print(t)


def print_kv_quality(quality: dict[str, Any], forced: dict[str, Any]) -> None:
    errors = {r.get("error") for r in quality.values()}
    if len(errors) == 1 and None not in errors and "f16 reference" in str(next(iter(errors))):
        console.print(f"KV cache quality: no reference runs (the f16 cache {next(iter(errors))}): every quantized "
                      "K/V cache is excluded, since its effect on the outputs cannot be measured")
        return
    switch = ", ".join(f"{k}={v}" for k, v in forced.items())
    t = Table(title="KV cache quantization vs f16 (fixed text)",
              caption="reference: an f16 K/V cache with the study's starting settings"
                      + (f" and {switch} (pinned by the engine self-check)" if switch else ""))
    for col in ("K/V", "top-1 agreement", "mean KL", "verdict"):
        t.add_column(col)
    for pair, r in sorted(quality.items()):
        if "error" in r:
            t.add_row(pair, "-", "-", f"excluded: {r['error'][:50]}")
        else:
            t.add_row(pair, f"{r['top1_agreement']:.3f}", f"{r['mean_kl']:.4f}",
                      "[red]excluded[/]" if r["excluded"] else "[green]kept[/]")
    console.print(t)


def print_trials_summary(st: Any) -> None:
    from optuna.trial import TrialState

    counts = {s: len(st.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    console.print(f"trials: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
                  f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running")
    best = [t for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if best and len(st.directions) == 1:
        console.print(f"best so far: trial {st.best_trial.number} = {st.best_value:.2f}")


def print_recommendation(config: dict[str, Any]) -> None:
    rec = config["recommendation"]
    m = config["metrics"]
    rows = rec.get("side_by_side") or []
    if rows:
        t = Table(title="re-measured side by side (medians)")
        for col in ("config", "decode tok/s", "prefill tok/s", "ttft", "loses to the best baseline on"):
            t.add_column(col)
        for r in rows:
            if not r["ran"]:
                t.add_row(r["label"], f"[red]{(r['failures'] or ['failed'])[0][:50]}[/]", "", "", "")
                continue
            name = f"[bold]{r['label']}[/] (chosen)" if r["chosen"] else r["label"]
            t.add_row(name, *(f"{r[m]['median']:.1f}" if r[m] else "-" for m in ("decode", "prefill")),
                      f"{r['ttft']['median'] * 1000:.0f} ms" if r["ttft"] else "-", ", ".join(r["loses"]) or "-")
        console.print(t)
    versus = rec.get("versus") or {}
    t = Table(title=f"recommended: {rec['chosen']}, against the best baseline on each metric (re-measured side by side)")
    for col in ("metric", "recommended median", "spread (min-max)", "best baseline", "its median", "ratio", "spread says"):
        t.add_column(col)
    for name, unit in (("decode", "tok/s"), ("prefill", "tok/s"), ("ttft", "s")):
        a = m[name]
        v = versus.get(name)
        if v is None:  # no baseline ran
            t.add_row(name, f"{a['median']:.2f} {unit}", f"{a['low']:.2f}-{a['high']:.2f}", "none ran", "-", "-", "-")
            continue
        said = {"better": "[green]better[/]", "worse": "[red]worse[/]", "same": "within noise"}[v["verdict"]]
        t.add_row(name, f"{a['median']:.2f} {unit}", f"{a['low']:.2f}-{a['high']:.2f}", v["baseline"],
                  f"{v['baseline_median']:.2f} {unit}", f"x{v['ratio']:.2f}" if v["ratio"] else "-", said)
    console.print(t)
    s = config["settings"]
    console.print("settings: " + ", ".join(f"{k}={v}" for k, v in s.items() if v is not None))
    console.print(rec["verdict"])
    roof = rec["roofline"]
    if "fraction" in roof and roof["fraction"]:
        console.print(f"roofline: decode {roof['decode_tps']:.1f} tok/s is {roof['fraction']:.0%} of the "
                      f"{roof['limit_tps']:.1f} tok/s that {roof['bandwidth_gbs']:.1f} GB/s allows "
                      f"({roof['bytes_per_token'] / MIB:,.0f} MiB read per token)")
    pred = config.get("memory", {})
    if "total" in pred and rec.get("peak_rss"):
        console.print(f"memory: predicted {mib(pred['total'])}; measured peak RSS {mib(rec['peak_rss'])}, of which "
                      f"{mib(rec['base_rss'])} was the Python process before the model loaded")


# -------------------------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from . import export, study
    from .errors import ConfigError

    source = args.study or args.source
    if not source:
        raise ConfigError("export what? give a tuned config JSON or a study name (--study NAME)")
    if not args.study and (source.endswith(".json") or os.path.isfile(source)):
        config = export.load_config(source)
    else:
        st = study.load_existing(source, args.storage or study.default_url())
        if "recommendation" not in st.user_attrs:
            raise ConfigError(f"study {source} has no recommendation yet: run autotune search to finish it")
        config = st.user_attrs["recommendation"]
    text = export.render(config, args.format)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + ("" if text.endswith("\n") else "\n"))
    else:
        print(text)
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from . import study

    rows = study.summaries(args.storage)
    if args.json:
        print_json(rows)
        return 0
    t = Table(title=f"studies in {study.storage_url(args.storage)}")
    for col in ("study", "model", "machine", "engine", "trials", "best", "tuned config"):
        t.add_column(col, justify="right" if col in ("trials", "best") else "left")
    for r in rows:
        t.add_row(r["name"], str(r["model"]), str(r["fingerprint"]), r["engine"], str(r["trials"]),
                  "-" if r["best"] is None else f"{r['best']:.2f}", "yes" if r["recommendation"] else "no")
    console.print(t)
    return 0


# --------------------------------------------------------------------------------------------- draft


def _int_list(value: str) -> tuple[int, ...]:
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return items


def _kinds(value: str) -> tuple[str, ...]:
    from .draft import PROMPT_KINDS

    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items or any(k not in PROMPT_KINDS for k in items):
        raise argparse.ArgumentTypeError(f"prompt kinds are {', '.join(PROMPT_KINDS)}; got {value!r}")
    return items


def _draft_arg(value: str) -> str:
    """``search --draft``: checked while parsing, so a typo fails before the search, not after it."""
    from .gguf_model import read_facts

    if value == "auto":
        return value
    try:
        read_facts(value)
    except AutotuneError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def cmd_draft(args: argparse.Namespace) -> int:
    from . import draft, export, health, space, study
    from .gguf_model import read_facts
    from .probe import probe

    facts = read_facts(args.model)
    hw = probe(measure_bandwidth=False)
    if args.config:
        settings = export.settings_of(export.load_config(args.config))
    else:
        settings = study.sensible(hw, facts, min(4096, facts.n_ctx_train or 4096))
    pins = space.parse_pins(args.set or [])
    settings = settings.replace(**pins, **({"n_ctx": args.ctx} if args.ctx else {}))
    status_console = Console(stderr=True)
    if not args.no_measure:
        with status_console.status("engine self-check: a short real run with these settings ..."):
            verdict = health.check(args.model, settings, hw, pinned=frozenset(pins), timeout=args.trial_timeout)
        status_console.print(verdict.line())
        settings = settings.replace(**verdict.pins)
    plan = None if args.no_measure else draft.Plan(ns=args.n, kinds=args.kinds, rounds=args.rounds,
                                                   prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                                                   reps=args.reps, timeout=args.trial_timeout)
    with status_console.status("checking candidates ...") as status:
        report = draft.evaluate(args.model, args.candidates, settings, hw, plan, on_run=lambda label, kind, m:
                                status.update(f"{label} [{kind}]: " + (f"{m.decode:.1f} tok/s" if m.ok else m.error[:60])))
    if args.json:
        print_json(report.to_dict())
    else:
        print_draft_report(report.to_dict())
    return 0


def print_draft_report(d: dict[str, Any]) -> None:
    t = Table(title=f"draft candidates for {d['main']['name']} ({d['main']['n_params'] / 1e9:.2f}B)")
    for col in ("candidate", "params", "verdict", "why / advice"):
        t.add_column(col)
    for c in d["candidates"]:
        params = f"{c['n_params'] / 1e9:.2f}B" if c["n_params"] else "-"
        verdict = "[green]compatible[/]" if c["compatible"] else "[red]rejected[/]"
        t.add_row(os.path.basename(c["path"]), params, verdict, "; ".join(c["reasons"] + c["warnings"]) or "-")
    console.print(t)
    for c in d["candidates"]:
        mem = c["memory"]
        if "error" in mem:
            console.print(f"memory of {os.path.basename(c['path'])}: {mem['error']}")
        if not mem.get("placements"):
            continue
        t = Table(title=f"memory in MiB: main + {os.path.basename(c['path'])} "
                        f"(draft context {mem['placements'][0]['draft_n_ctx']:,})")
        for col in ("draft on", "ngld", "draft KV", "device", "main", "draft", "logits", "total", "free", "fits"):
            t.add_column(col)
        for r in mem["placements"]:
            for i, x in enumerate(x for x in r["devices"] if x["total"]):
                fits = ("[green]yes[/]" if x["fits"] else "[red]no[/]") if i or r["fits"] else \
                    f"[red]no[/] ({r['shortfall'] / MIB:,.0f} short)"
                head = [f"{r['placement']} ({r['kind']})", str(r["draft_gpu_layers"]), f"{r['draft_kv'] / MIB:,.0f}"]
                t.add_row(*(head if not i else ["", "", ""]), x["device"],
                          *(f"{x[k] / MIB:,.0f}" for k in ("main", "draft", "speculative", "total", "budget")), fits)
        console.print(t)
        console.print("logits: what llama-cpp-python adds to the main when a draft is attached "
                      "(every token's logits kept; at a full context)")
    results = d["results"]
    for path in dict.fromkeys(r["draft_model"] for r in results[1:]):
        t = Table(title=f"decode with {os.path.basename(path)} vs the main alone (a speedup counts only when "
                        "the interquartile ranges are apart)")
        for col in ("draft", "text", "tok/s", "IQR", "speedup", "accept", "acc/step", "drafting", "output"):
            t.add_column(col)
        for r in [results[0]] + [r for r in results[1:] if r["draft_model"] == path]:
            name = "none" if r is results[0] else f"n={r['draft_max']}" + (
                f" ngld={r['draft_gpu_layers']}" if r["draft_gpu_layers"] else "")
            for kind, e in r["kinds"].items():
                s = e["decode"]
                cells = [f"{s['median']:.1f}", f"{s['q25']:.1f}-{s['q75']:.1f}"] if s["n"] else ["failed", "-"]
                if r is results[0]:
                    t.add_row(name, kind, *cells, "-", "-", "-", "-", "reference" if e["outputs_match"] else e["mismatch"])
                    continue
                sp = "-" if e["speedup"] is None else f"x{e['speedup']:.2f}" + (
                    " [green]clear[/]" if e["clear_win"] else " [red]slower[/]" if e["clear_loss"] else "")
                acc = "-" if e["acceptance"] is None else f"{e['acceptance']:.0%}"
                aps = "-" if e["accepted_per_step"] is None else f"{e['accepted_per_step']:.2f}"
                share = "-" if e["draft_share"] is None else f"{e['draft_share']:.0%}"
                t.add_row(name, kind, *cells, sp, acc, aps, share, "same" if e["outputs_match"] else e["mismatch"] or "-")
        console.print(t)
    for r in results:
        for f in r["failures"][:2]:
            console.print(f"[yellow]{r['label']} failed[/]: {f}")
    console.print(f"[bold]{d['recommendation']['verdict']}[/]")
    console.print(f"({d['wall_s']:.0f} s)")


# -------------------------------------------------------------------------------------------- report


def cmd_serve_tune(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from . import catalog, reference, serving
    from .engine import external
    from .errors import SettingsError
    from .gguf_model import read_facts
    from .probe import probe

    for name, low in (("users", 1), ("ctx_per_user", 64), ("trials", 1), ("rounds", 2), ("requests_per_user", 1)):
        if getattr(args, name) < low:
            raise SettingsError(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(args, name)})")
    for name in ("max_ttft", "min_user_tps", "time_limit"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SettingsError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    model = args.model or str(catalog.fetch(quiet=False))
    facts = read_facts(model)
    binary = external.parse(f"llama-server:{args.server}")[1] if args.server else reference.tool("llama-server",
                                                                                                quiet=False)
    opts = serving.ServeOptions(users=args.users, ctx_per_user=args.ctx_per_user, max_ttft=args.max_ttft,
                                min_user_tps=args.min_user_tps, trials=args.trials,
                                requests_per_user=args.requests_per_user, time_limit=args.time_limit,
                                rounds=args.rounds, storage=args.storage, seed=args.seed)
    console.print(f"serving study: {facts.name}, {opts.users} users x {opts.ctx_per_user:,} tokens, "
                  f"{opts.requests} requests per load, llama-server {binary}")
    result = serving.tune(model, facts, probe(), binary, opts, say=lambda text: console.print(f"  {text}"))
    table = Table(title=f"side by side, {opts.rounds} rotated rounds, {opts.users} users (medians, q25-q75)")
    for col in ("config", "aggregate tok/s", "user decode tok/s", "TTFT p50 s", "TTFT p95 s", "failed", "peak RSS"):
        table.add_column(col)
    for label, rows in result.side_by_side.items():
        ok = [r for r in rows if r.get("ok")]
        t = result.spread(label)
        med = [result.spread(label, k) for k in ("user_tps", "ttft_p50", "ttft_p95")]
        table.add_row(label + (" (chosen)" if label == result.chosen else ""),
                      f"{t.median:.1f} ({t.q25:.1f}-{t.q75:.1f})" if t.n else "-",
                      *(f"{m.median:.2f}" if m.n else "-" for m in med),
                      str(sum(r["failed"] for r in rows)),
                      mib(max((r.get("peak_rss") or 0 for r in ok), default=None)))
    console.print(table)
    console.print(result.verdict)
    console.print("llama-server " + shlex.join(result.command))
    if args.out:
        serving.save(result, Path(args.out))
        console.print(f"wrote {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    from . import report

    done = report.build(args.source, args.out, storage=args.storage)
    names = ", ".join(p.name for p in done.images) or "none"
    console.print(f"wrote {done.index} and {len(done.images)} plots: {names}")
    for note in done.notes:
        console.print(f"[yellow]note[/]: {note}")
    return 0


# ------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autotune", description="Hardware-aware configuration autotuner for llama.cpp")
    p.add_argument("--version", action="version", version=f"autotune {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("probe", help="what this machine is: cores, RAM, GPUs, engine build, bandwidth")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--no-bandwidth", action="store_true", help="skip the ~1 s bandwidth measurement")
    sp.set_defaults(func=cmd_probe)

    sp = sub.add_parser("doctor", help="engine self-check: does a short real run survive here, and which "
                                       "runtime switch avoids a crash")
    sp.add_argument("model", nargs="?", help="GGUF file (default: the demo model)")
    sp.add_argument("--set", action="append", metavar="NAME=VALUE", help="check with a setting pinned")
    sp.add_argument("--recheck", action="store_true", help="run the check again instead of reading the remembered verdict")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_doctor)

    sp = sub.add_parser("inspect", help="what a GGUF file says about its model")
    sp.add_argument("model")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("memory", help="predict the memory a configuration needs, per device")
    sp.add_argument("model")
    sp.add_argument("--ctx", type=int, default=4096,
                    help="context length; above the trained context it also raises the --ctx-sweep/--max-ctx limit")
    sp.add_argument("--ngl", type=int, default=0, help="layers offloaded to the GPU")
    sp.add_argument("--n-cpu-moe", type=int, default=0, metavar="N",
                    help="keep the experts of the first N layers in host memory (mixture-of-experts models)")
    sp.add_argument("--type-k", default="f16")
    sp.add_argument("--type-v", default="f16")
    sp.add_argument("--fa", choices=("on", "off"), default="off")
    sp.add_argument("-b", "--batch", type=int, default=512)
    sp.add_argument("-ub", "--ubatch", type=int, default=512)
    sp.add_argument("--swa-full", choices=("on", "off"), default="on")
    sp.add_argument("--repack", choices=("on", "off"), default="on",
                    help="extra weight buffer types (AMX, CPU_REPACK); off is llama.cpp's --no-repack "
                         "(setting use_extra_bufts)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--ctx-sweep", action="store_true", help="footprint against context length per K/V type")
    sp.add_argument("--max-ctx", action="store_true", help="largest context that fits, per K/V type and offload")
    sp.add_argument("--verify", action="store_true", help="compare with the engine's own dry run")
    sp.set_defaults(func=cmd_memory)

    sp = sub.add_parser("fit", help="placements that hold a context on this machine, and the largest context each allows")
    sp.add_argument("model")
    sp.add_argument("--ctx", type=int, help="the context you need (default: the trained context)")
    sp.add_argument("--beyond-trained", action="store_true",
                    help="allow and offer contexts beyond the trained one (RoPE-scaled use)")
    sp.add_argument("--margin", type=float, metavar="MIB",
                    help="memory to keep free on each device (default: max(512 MiB, 5 %% of its free memory))")
    sp.add_argument("--kv", default=",".join(("f16", "q8_0", "q4_0")), help="K/V cache types to consider")
    sp.add_argument("-b", "--batch", type=int, default=512)
    sp.add_argument("-ub", "--ubatch", type=int, default=512)
    sp.add_argument("--repack", choices=("on", "off"), default="on", help="extra weight buffer types (see memory)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_fit)

    from .export import FORMATS
    from .pipeline import GPU_WORKLOAD, HOST_WORKLOAD, TuneOptions
    from .study import OBJECTIVES

    default = TuneOptions()

    sp = sub.add_parser("search", help="tune the settings with real engine runs (default: the demo model)")
    sp.add_argument("model", nargs="?", help="GGUF file (default: the SmolLM2-135M demo model, fetched once)")
    sp.add_argument("--ctx", type=int, help="context length you need (default: min(4096, trained context))")
    sp.add_argument("--objective", choices=OBJECTIVES,
                    help=f"the speed to maximize (default: {default.objective}, losing no other speed to the best "
                         "baseline beyond noise; naming it lets the other speeds be traded for it)")
    sp.add_argument("--pareto", action="store_true", help="multi-objective: decode vs prefill vs memory")
    sp.add_argument("--trials", type=int, default=default.trials, help="the most trials, both stages together")
    sp.add_argument("--patience", type=int, default=default.patience, metavar="K",
                    help="stop a stage once K trials in a row have not moved its best by 3 %% (0: run every trial)")
    sp.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    sp.add_argument("--trial-timeout", type=float, default=default.trial_timeout,
                    help="kill one engine run after this many seconds")
    sp.add_argument("--storage", help="Optuna storage URL (default: sqlite in ./studies)")
    sp.add_argument("--set", action="append", metavar="NAME=VALUE", help="pin a setting, e.g. n_threads=2")
    sp.add_argument("--seed", type=int, default=default.seed)
    sp.add_argument("--engine", metavar="KIND:PATH",
                    help="measure with your own llama.cpp: llama-bench:PATH or llama-server:PATH (default: the "
                         "bundled llama-cpp-python; memory is always priced by the bundled engine)")
    sp.add_argument("--from-cmdline", metavar="'llama-server ...'",
                    help="start from the llama-server command line you run today: its settings are measured "
                         "first and are a baseline; its model is used when MODEL is not given")
    sp.add_argument("--depth", type=int, metavar="N",
                    help="measure with N tokens of history already in the cache, like llama-bench -d "
                         "(default: an eighth of --ctx in 256-token blocks)")
    host, gpu = HOST_WORKLOAD, GPU_WORKLOAD
    sp.add_argument("--prompt-tokens", type=int, help=f"tokens of the measured prompt (default: {host.prompt_tokens}, "
                    f"or {gpu.prompt_tokens} when every layer is on a GPU)")
    sp.add_argument("--gen-tokens", type=int, help=f"tokens generated per repetition (default: {host.gen_tokens}, or "
                    f"{gpu.gen_tokens} on a GPU)")
    sp.add_argument("--reps", type=int, help=f"repetitions inside each trial's run (default: {host.reps}, or "
                    f"{gpu.reps} on a GPU)")
    sp.add_argument("--top-k", type=int, default=default.top_k, help="candidates re-measured against the defaults")
    sp.add_argument("--rounds", type=int, default=default.rounds, help="interleaved re-measurement rounds")
    sp.add_argument("--kv-quality", choices=("strict", "relaxed", "off"), default=default.kv_quality)
    sp.add_argument("--no-recommend", action="store_true", help="only run trials")
    sp.add_argument("--out", help="write the tuned config here")
    sp.add_argument("--format", choices=FORMATS, default="json")
    # draft stage (pipeline._draft_stage): runs after the main settings are tuned
    sp.add_argument("--draft", type=_draft_arg, metavar="auto|PATH",
                    help="then measure speculative decoding with this draft (auto: compatible GGUFs next to the model "
                         "or in the cache); the config carries the draft when it pays")
    sp.set_defaults(func=cmd_search)

    sp = sub.add_parser("export", help="write a tuned config in another tool's format")
    sp.add_argument("source", nargs="?", help="a tuned config JSON, or a study name")
    sp.add_argument("--study", help="a study's name (with --storage: a fleet's tuned config, no files to copy)")
    sp.add_argument("--format", choices=FORMATS, default="json")
    sp.add_argument("--storage", help="Optuna storage URL of the study")
    sp.add_argument("--out")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("studies", help="every study in a storage: model, machine, engine, trials, best")
    sp.add_argument("--storage", help="Optuna storage URL (default: sqlite in ./studies)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_studies)

    sp = sub.add_parser("draft", help="which draft models fit a main model, and whether speculative decoding pays")
    sp.add_argument("model", help="the main GGUF model")
    sp.add_argument("--candidates", nargs="+", required=True, metavar="DIR_OR_FILE",
                    help="draft GGUF files, or directories whose *.gguf files are candidates")
    sp.add_argument("--config", help="a tuned config JSON: measure with its settings (default: sensible settings)")
    sp.add_argument("--set", action="append", metavar="NAME=VALUE", help="pin a main setting, e.g. n_threads=2")
    sp.add_argument("--ctx", type=int, help="context length (default: the config's, else min(4096, trained))")
    sp.add_argument("--n", type=_int_list, default=(2, 4, 8, 16), metavar="N,N,...", help="draft lengths to measure")
    sp.add_argument("--kinds", type=_kinds, default=("code", "prose"), metavar="KIND,...", help="prompt kinds: code, prose")
    sp.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each runs every configuration once per kind)")
    sp.add_argument("--reps", type=int, default=3, help="repetitions inside each run")
    sp.add_argument("--prompt-tokens", type=int, default=64)
    sp.add_argument("--gen-tokens", type=int, default=32,
                    help="reply length; the draft's prompt processing counts as decode time, so longer replies "
                         "show more of a draft's steady gain")
    sp.add_argument("--trial-timeout", type=float, default=300.0, help="kill one engine run after this many seconds")
    sp.add_argument("--no-measure", action="store_true", help="check compatibility and memory only")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_draft)

    sp = sub.add_parser("serve-tune", help="tune llama-server for N concurrent users under a real load "
                                           "(default: the demo model)")
    sp.add_argument("model", nargs="?", help="GGUF file (default: the SmolLM2-135M demo model)")
    sp.add_argument("--users", type=int, default=4, help="concurrent users the server must serve")
    sp.add_argument("--ctx-per-user", type=int, default=2048, metavar="C", help="context each user's conversation needs")
    sp.add_argument("--max-ttft", type=float, metavar="S", help="bound: p95 time to first token, seconds")
    sp.add_argument("--min-user-tps", type=float, metavar="X", help="bound: the median user's decode tok/s")
    sp.add_argument("--trials", type=int, default=12)
    sp.add_argument("--rounds", type=int, default=4, help="side-by-side rounds against llama-server's defaults")
    sp.add_argument("--requests-per-user", type=int, default=2, help="the load: users x this many requests")
    sp.add_argument("--time-limit", type=float, default=180.0, help="seconds one load may take, whatever is in flight")
    sp.add_argument("--server", metavar="PATH", help="llama-server binary (default: the reference build)")
    sp.add_argument("--storage", help="Optuna storage URL (default: sqlite in ./studies)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", help="write the result (JSON) here")
    sp.set_defaults(func=cmd_serve_tune)

    sp = sub.add_parser("report", help="plots and an HTML page for a study or a tuned config")
    sp.add_argument("source", metavar="STUDY_OR_CONFIG", help="a tuned config JSON, or a study name")
    sp.add_argument("--out", required=True, metavar="DIR", help="directory for index.html and the PNGs")
    sp.add_argument("--storage", help="Optuna storage URL of the study (default: sqlite in ./studies, or the config's)")
    sp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AutotuneError as e:
        if args.debug:
            raise
        print(f"autotune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("autotune: interrupted", file=sys.stderr)
        return 130



if __name__ == "__main__":
    sys.exit(main())
