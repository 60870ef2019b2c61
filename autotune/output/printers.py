"""What the commands print: one function per output, rich tables on the terminal. They read results and never
run the engine or the pipeline; ``cli`` calls them."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from .. import memory
from ..search.pipeline import DepthPoint, TuneReporter
from ..vocabulary.errors import EngineDied, ModelError
from ..vocabulary.metrics import FELT, metric
from ..vocabulary.settings import KV_SHORTLIST

if TYPE_CHECKING:  # types only: the report brings in matplotlib, which the other commands never load
    import optuna

    from ..facts.gguf_model import ModelFacts
    from ..facts.probe import Hardware
    from ..memory.describe import Checked, LargestCtx, MemoryReport, SweepPoint
    from ..memory.fit import Placement
    from ..memory.layout import MemoryEstimate
    from ..search import loop
    from ..search.config import TunedRecord
    from ..search.health import Doctor, Verdict
    from ..search.kvgate import KvQuality
    from ..search.space import SearchSpace
    from ..search.storage import StudySummary
    from ..stages.draft import DraftReport
    from ..stages.serving import ServeOptions, ServeResult
    from ..stages.speculation import SpecReport
    from ..vocabulary.settings import Settings
    from .report import Report

console = Console()
MIB = 2**20
GIB = 2**30


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:,.1f} MiB"


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def probe(hw: Hardware) -> None:
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
    t.add_row(
        "engine",
        f"llama-cpp-python {hw.engine_version}, backend {hw.backend}, "
        f"{'can' if hw.can_offload else 'cannot'} offload to GPU",
    )
    if not hw.gpus:
        t.add_row("GPUs", "none found")
    for g in hw.gpus:
        extra = ", ".join(
            x for x in (g.driver and f"driver {g.driver}", g.compute_capability and f"cc {g.compute_capability}") if x
        )
        t.add_row(
            f"gpu{g.index} ({g.backend})",
            f"{g.name}: {gib(g.vram_free)} free of {gib(g.vram_total)}"
            + (f", budget {mib(g.budget)}" if g.budget is not None else "")
            + (f" ({extra})" if extra else ""),
        )
    for note in hw.notes:
        t.add_row("note", note)
    t.add_row("fingerprint", hw.fingerprint())
    console.print(t)


def doctor(hw: Hardware, found: Doctor) -> None:
    """The engine build, the environment's load-order check, and the self-check's verdict (``health.Doctor``)."""
    console.print(
        f"engine: llama-cpp-python {hw.engine_version}, backend {hw.backend}; CPU features: "
        + " ".join(hw.cpu_features)
    )
    for line in found.environment.lines():
        console.print(line, markup=False)
    if found.verdict is not None:
        console.print(found.verdict.line())


def inspect(facts: ModelFacts) -> None:
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
        (
            "heads / KV heads",
            f"{facts.n_head} / {kv[0] if len(set(kv)) == 1 else list(kv)}"
            + (f"  (GQA x{facts.n_head // max(kv)})" if 0 < max(kv) < facts.n_head else ""),
        ),
        ("K / V head dim", f"{facts.head_dim_k} / {facts.head_dim_v}"),
        (
            "experts",
            f"{facts.n_expert} per layer, {facts.n_expert_used} used per token, on "
            f"{len(facts.moe_layers)} of {facts.n_layer} layers"
            if facts.n_expert
            else "none (dense)",
        ),
        ("trained context", f"{facts.n_ctx_train:,}"),
        (
            "sliding window",
            f"{facts.n_swa} tokens on layers {[i for i, s in enumerate(facts.swa_layers) if s]}"
            if facts.uses_swa
            else "none",
        ),
        (
            "vocab",
            f"{facts.vocab_type}, {facts.n_vocab:,} tokens, BOS {facts.bos_id} (add {facts.add_bos}), "
            f"EOS {facts.eos_id} (add {facts.add_eos})",
        ),
        ("weights", f"{mib(facts.weight_bytes)} total"),
        ("token embedding", mib(facts.token_embd_bytes)),
        ("output layer", mib(facts.output_bytes) + (" (tied to token embedding)" if facts.tied_embeddings else "")),
    ]
    sizes = facts.layer_bytes
    if sizes:
        same = len(set(sizes)) == 1
        rows.append(
            (
                "per layer",
                f"{mib(sizes[0])} x {len(sizes)}"
                if same
                else f"{mib(min(sizes))} .. {mib(max(sizes))} (sum {mib(sum(sizes))})",
            )
        )
    for r in rows:
        t.add_row(*r)
    console.print(t)


def memory_report(out: MemoryReport, facts: ModelFacts, s: Settings, hw: Hardware) -> None:
    """``memory.describe``'s record as tables; a refusal or a failed real run is the one-line error."""
    for note in out.notes:
        console.print(f"note: {note}")
    _estimate(out.estimate, facts, s)
    if out.ctx_sweep is not None:
        _ctx_sweep(out.ctx_sweep, s, hw)
    if out.max_ctx is not None:
        _max_ctx(out.max_ctx, s, max(facts.n_ctx_train or 131072, s.n_ctx))
    if out.check is not None:
        _checked(out.check, facts)


def _estimate(est: MemoryEstimate, facts: ModelFacts, s: Settings) -> None:
    cost = memory.dryrun.COST
    t = Table(
        title=f"memory: {facts.name}, n_ctx {est.n_ctx:,}, K {s.type_k} / V {s.type_v}, "
        f"FA {'on' if s.flash_attn else 'off'}, ub {est.n_ubatch}, GPU layers {est.gpu_layers}"
        + (" + output" if est.output_on_gpu else "")
    )
    t.add_column("")
    for d in est.devices:
        t.add_column(d.device, justify="right")
    for label, value in (
        ("weights", lambda d: d.weights),
        ("AMX / CPU repack", lambda d: d.repack),
        ("KV cache", lambda d: d.kv),
        ("compute", lambda d: d.compute),
        ("output", lambda d: d.output),
        ("fixed overhead", lambda d: d.overhead),
        ("[bold]total[/bold]", lambda d: d.total),
        ("free memory", lambda d: d.budget),
        ("margin kept free", lambda d: memory.margin(d.budget)),
    ):
        t.add_row(label, *(mib(value(d)) for d in est.devices))
    if any(d.limit is not None for d in est.devices):
        t.add_row("GPU budget (--gpu-budget)", *(mib(d.limit) for d in est.devices))
    t.add_row("fits", *("[green]yes[/green]" if d.fits() else "[red]no[/red]" for d in est.devices))
    console.print(t)
    caches = ", ".join(f"{c.cells:,} cells (K {mib(c.k)}, V {mib(c.v)})" for c in est.kv_caches)
    verdict = "fits" if est.fits else f"does NOT fit: {mib(est.shortfall)} over"
    fixed = "learned from runs on this GPU" if est.gpu_overhead_learned else "default, not yet measured here"
    console.print(
        f"KV caches: {caches}\ntotal {mib(est.total)}: {verdict} "
        "(keeping max(512 MiB, 5 %) of each device free; overhead is a fixed allowance"
        + (f", on GPUs {fixed})" if len(est.devices) > 1 else ")")
    )
    paid = (
        f": {cost.settings} settings in {cost.runs} child process(es), {cost.seconds:.2f} s"
        if cost.runs
        else ", answered from the cache"
        if est.source != memory.REPLAY
        else ""
    )
    console.print(f"source: {est.source}{paid}")


def _ctx_sweep(points: tuple[SweepPoint, ...], s: Settings, hw: Hardware) -> None:
    t = Table(
        title=f"footprint against context (FA {'on' if s.flash_attn else 'off'}, ub {s.n_ubatch}, "
        f"{'GPU layers ' + str(s.n_gpu_layers) if hw.offload_gpus else 'CPU'})"
    )
    t.add_column("n_ctx", justify="right")
    pairs = memory.cache_pairs(KV_SHORTLIST, s.flash_attn)
    for tk, tv in pairs:
        t.add_column(f"K {tk} / V {tv}\nKV / total", justify="right")
    by_ctx: dict[int, dict[tuple[str, str], SweepPoint]] = {}
    for p in points:
        by_ctx.setdefault(p.n_ctx, {})[(p.type_k, p.type_v)] = p
    for n, cells in by_ctx.items():
        t.add_row(
            f"{n:,}",
            *(
                f"{mib(c.kv)} / " + (f"{mib(c.total)}" if c.fits else f"[red]{mib(c.total)}[/red]")
                for c in (cells[p] for p in pairs)
            ),
        )
    console.print(t)
    console.print("[red]red[/red]: does not fit this machine's free memory with the safety margin")


def _max_ctx(rows: tuple[LargestCtx, ...], s: Settings, top: int) -> None:
    t = Table(title=f"largest context that fits (FA {'on' if s.flash_attn else 'off'}, limit {top:,})")
    for col in ("K / V", "GPU layers", "max n_ctx", "total at max"):
        t.add_column(col, justify="right" if col != "K / V" else "left")
    for r in rows:
        t.add_row(
            f"{r.type_k} / {r.type_v}",
            str(r.n_gpu_layers),
            f"{r.max_ctx:,}" if r.max_ctx else "[red]none[/red]",
            mib(r.total),
        )
    console.print(t)


def _checked(checked: Checked, facts: ModelFacts) -> None:
    for r in checked.verify:
        if r.engine is None:
            raise ModelError(f"{facts.path}: the engine refused these settings: {r.error}")
        t = Table(title="prediction vs the engine's dry run (no allocation)")
        for col in ("component", "predicted", "engine", "error"):
            t.add_column(col, justify="left" if col == "component" else "right")
        for k in memory.COMPONENTS:
            err = r.error_pct[k] if r.error_pct else None
            t.add_row(
                k,
                mib(r.predicted[k]) if r.predicted else "unsupported",
                mib(r.engine[k]),
                "-" if err is None else f"{err:+.2f} %",
            )
        console.print(t)
        console.print(
            "The dry run cannot see the AMX / CPU_REPACK buffers or the fixed overhead: both are left out here. "
            "Errors are taken at the log's 0.01 MiB resolution."
        )
    p = checked.peak
    if p is not None:
        if not p.ok:
            raise EngineDied(f"{facts.path}: the real run for the peak failed: {p.error}")
        console.print(
            f"real run ({p.prompt}-token prompt after {p.depth:,} tokens of history): GPU peak "
            f"{mib(p.peak_vram)} (NVML), the engine's GPU buffers {mib(p.gpu_buffers)}; predicted "
            f"{mib(p.predicted_gpu)} ({'-' if p.error_pct is None else f'{p.error_pct:+.1f} %'})"
        )


def _budgets(hw: Hardware) -> str:
    """The GPU budgets in words ("" where none is set), for the lines that say what memory is kept free."""
    found = [f"gpu{g.index} {mib(g.budget)}" for g in hw.offload_gpus if g.budget is not None]
    return f"; GPU budget {', '.join(found)}, fixed overhead included" if found else ""


def fit_json(
    facts: ModelFacts, rows: list[Placement], keep: int | None, seconds: float, hw: Hardware
) -> dict[str, Any]:
    cost = memory.dryrun.COST
    return {
        "model": facts.path,
        "n_ctx": rows[0].settings.n_ctx,
        "margin": "default" if keep is None else keep,
        "gpu_budget": {f"gpu{g.index}": g.budget for g in hw.offload_gpus if g.budget is not None} or None,
        "placements": [r.to_dict() for r in rows],
        "wall_s": round(seconds, 3),
        "dry_runs": {"children": cost.runs, "settings": cost.settings, "seconds": round(cost.seconds, 3)},
    }


def fit(facts: ModelFacts, rows: list[Placement], keep: int | None, seconds: float, hw: Hardware) -> None:
    target, cost = rows[0].settings.n_ctx, memory.dryrun.COST
    warning = memory.beyond_trained(facts, target)
    if warning:
        console.print(f"note: {warning}")
    first = next((r.estimate for r in rows if r.estimate), None)
    devices = [d.device for d in first.devices] if first else ["host"]
    t = Table(
        title=f"fit: {facts.name} at n_ctx {target:,} (flash attention on; keeping "
        f"{'max(512 MiB, 5 %)' if keep is None else mib(keep)} free per device{_budgets(hw)})"
    )
    for col in ("K / V", "placement", *(f"{d} at {target:,}" for d in devices), "holds it", "largest n_ctx"):
        t.add_column(col, justify="left" if col in ("K / V", "placement") else "right")
    for r in rows:
        use = [mib(r.estimate.device(d).total) if r.estimate else "refused" for d in devices]
        t.add_row(
            f"{r.settings.type_k} / {r.settings.type_v}",
            r.what,
            *use,
            "[green]yes[/green]" if r.holds_target else "[red]no[/red]",
            f"{r.max_ctx:,}" if r.max_ctx else "[red]none[/red]",
        )
    console.print(t)
    holding = [r for r in rows if r.holds_target]
    if holding:
        one = holding[0].settings
        pin = " ".join(
            f"--set {k}={getattr(one, k)}"
            for k in ("type_k", "type_v", "n_gpu_layers", "n_cpu_moe", "moe_host_from")
            if k.startswith("type") or getattr(one, k) not in (0, "first")
        )
        console.print(
            f"{len(holding)} placement(s) hold {target:,} tokens: the search should measure them "
            f"(autotune search {facts.path} --ctx {target}; to try one alone: {pin})"
        )
    else:
        best = max(rows, key=lambda r: r.max_ctx)
        console.print(
            f"[red]no placement holds {target:,} tokens[/red]; the most is {best.max_ctx:,} "
            f"({best.settings.type_k} / {best.settings.type_v}, {best.what})"
        )
    console.print(
        f"priced by {rows[0].estimate.source if rows[0].estimate else 'the engine'}"
        + (
            f": {cost.settings} settings in {cost.runs} dry-run child process(es), {cost.seconds:.2f} s"
            if cost.runs
            else ""
        )
        + f"; {seconds:.2f} s in all"
    )


class Terminal(TuneReporter):
    """``tune``'s progress on the terminal: spinners, tables, a progress bar."""

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[Callable[[str], None]]:
        with console.status(text) as status:
            yield status.update

    def note(self, text: str) -> None:
        console.print(f"[yellow]{text}[/]")

    def health(self, verdict: Verdict) -> None:
        console.print(verdict.line())

    def study(self, st: optuna.Study, storage_url: str) -> None:
        finished = [t for t in st.get_trials(deepcopy=False) if t.state.is_finished()]
        console.print(f"[bold]study[/] {st.study_name}  ({len(finished)} finished trials stored in {storage_url})")

    def kv_quality(self, quality: KvQuality, forced: dict[str, Any]) -> None:
        kv_quality(quality, forced)

    def space(self, sp: SearchSpace, hw: Hardware, pins: dict[str, Any], forced: dict[str, Any]) -> None:
        space(sp, hw, pins, forced)

    @contextlib.contextmanager
    def trials(self, total: int, objective: str) -> Iterator[Callable[[loop.Progress], None]]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("[bold]trial {task.completed}/{task.total}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
        )
        unit = metric(objective).unit
        with bar:
            task = bar.add_task("starting", total=total)

            def show(p: loop.Progress) -> None:
                best = f"best {p.best:.2f} {unit}" if p.best is not None else "best -"
                bar.update(
                    task,
                    completed=p.done,
                    description=f"{best} | {p.complete} ok, {p.pruned} pruned, {p.failed} failed | {p.last[:60]}",
                )

            yield show

    def trials_done(self, st: optuna.Study) -> None:
        trials_summary(st)

    def depth_sweep(self, rows: tuple[DepthPoint, ...]) -> None:
        t = Table(title="the recommendation against context depth (tokens already in the cache)")
        for col in ("depth", "decode tok/s", "prefill tok/s", "time to first token"):
            t.add_column(col, justify="right")
        for r in rows:
            if r.ok and r.decode is not None and r.prefill is not None and r.ttft is not None:
                t.add_row(f"{r.depth:,}", f"{r.decode:.1f}", f"{r.prefill:.1f}", f"{r.ttft * 1000:.0f} ms")
            else:
                t.add_row(f"{r.depth:,}", f"[red]{r.error[:60]}[/red]", "", "")
        console.print(t)


def space(sp: SearchSpace, hw: Hardware, pins: dict[str, Any], forced: dict[str, Any]) -> None:
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
    for g in hw.offload_gpus:
        if g.budget is not None:
            t.add_row(
                f"gpu{g.index} budget",
                f"{mib(g.budget)} of {gib(g.vram_free)} free  [dim](--gpu-budget: the "
                "placement fits it, a trial whose peak passes it fails)[/]",
            )
    console.print(t)


def kv_quality(quality: KvQuality, forced: dict[str, Any]) -> None:
    errors = {p.error for p in quality.pairs}
    if len(errors) == 1 and None not in errors and "f16 reference" in str(next(iter(errors))):
        console.print(
            f"KV cache quality: no reference runs (the f16 cache {next(iter(errors))}): every quantized "
            "K/V cache is excluded, since its effect on the outputs cannot be measured"
        )
        return
    switch = ", ".join(f"{k}={v}" for k, v in forced.items())
    t = Table(
        title="KV cache quantization vs f16 (fixed text)",
        caption="reference: an f16 K/V cache with the study's starting settings"
        + (f" and {switch} (pinned by the engine self-check)" if switch else ""),
    )
    for col in ("K/V", "top-1 agreement", "mean KL", "verdict"):
        t.add_column(col)
    for p in sorted(quality.pairs, key=lambda p: p.pair):
        if p.error is not None:
            t.add_row(p.pair, "-", "-", f"excluded: {p.error[:50]}")
        else:
            t.add_row(
                p.pair,
                f"{p.top1_agreement:.3f}",
                f"{p.mean_kl:.4f}",
                "[red]excluded[/]" if p.excluded else "[green]kept[/]",
            )
    console.print(t)


def trials_summary(st: optuna.Study) -> None:
    from optuna.trial import TrialState

    counts = {s: len(st.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    console.print(
        f"trials: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running"
    )
    best = [t for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if best and len(st.directions) == 1:
        console.print(f"best so far: trial {st.best_trial.number} = {st.best_value:.2f}")


def recommendation(config: TunedRecord) -> None:
    rec = config.evidence["recommendation"]
    m = config.metrics
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
            t.add_row(
                name,
                *(f"{r[m]['median']:.1f}" if r[m] else "-" for m in ("decode", "prefill")),
                f"{r['ttft']['median'] * 1000:.0f} ms" if r["ttft"] else "-",
                ", ".join(r["loses"]) or "-",
            )
        console.print(t)
    versus = rec.get("versus") or {}
    t = Table(
        title=f"recommended: {rec['chosen']}, against the best baseline on each metric (re-measured side by side)"
    )
    for col in (
        "metric",
        "recommended median",
        "spread (min-max)",
        "best baseline",
        "its median",
        "ratio",
        "spread says",
    ):
        t.add_column(col)
    for name, unit in ((f.name, f.unit) for f in map(metric, FELT)):
        a = m[name]
        v = versus.get(name)
        if v is None:  # no baseline ran
            t.add_row(name, f"{a['median']:.2f} {unit}", f"{a['low']:.2f}-{a['high']:.2f}", "none ran", "-", "-", "-")
            continue
        said = {"better": "[green]better[/]", "worse": "[red]worse[/]", "same": "within noise"}[v["verdict"]]
        t.add_row(
            name,
            f"{a['median']:.2f} {unit}",
            f"{a['low']:.2f}-{a['high']:.2f}",
            v["baseline"],
            f"{v['baseline_median']:.2f} {unit}",
            f"x{v['ratio']:.2f}" if v["ratio"] else "-",
            said,
        )
    console.print(t)
    console.print("settings: " + ", ".join(f"{k}={v}" for k, v in config.settings.to_dict().items() if v is not None))
    console.print(rec["verdict"])
    roof = rec["roofline"]
    if roof.get("fraction"):
        console.print(
            f"roofline: decode {roof['decode_tps']:.1f} tok/s is {roof['fraction']:.0%} of the "
            f"{roof['limit_tps']:.1f} tok/s that {roof['bandwidth_gbs']:.1f} GB/s allows "
            f"({roof['bytes_per_token'] / MIB:,.0f} MiB read per token)"
        )
    pred = config.memory
    if "total" in pred and rec.get("peak_rss"):
        console.print(
            f"memory: predicted {mib(pred['total'])}; measured peak RSS {mib(rec['peak_rss'])}, of which "
            f"{mib(rec['base_rss'])} was the Python process before the model loaded"
        )


def draft_report(d: DraftReport) -> None:
    t = Table(title=f"draft candidates for {d.main.name} ({d.main.n_params / 1e9:.2f}B)")
    for col in ("candidate", "params", "verdict", "why / advice"):
        t.add_column(col)
    for c in d.candidates:
        params = f"{c.facts.n_params / 1e9:.2f}B" if c.facts and c.facts.n_params else "-"
        verdict = "[green]compatible[/]" if c.compatible else "[red]rejected[/]"
        t.add_row(os.path.basename(c.path), params, verdict, "; ".join(c.reasons + c.warnings) or "-")
    console.print(t)
    for c in d.candidates:
        if c.memory_error is not None:
            console.print(f"memory of {os.path.basename(c.path)}: {c.memory_error}")
        if not c.placements:
            continue
        t = Table(
            title=f"memory in MiB: main + {os.path.basename(c.path)} in llama-server "
            f"(draft context {c.placements[0].draft_n_ctx:,})"
        )
        for col in ("draft on", "ngld", "draft KV", "device", "main", "draft", "total", "free", "fits"):
            t.add_column(col)
        for r in c.placements:
            for i, x in enumerate(x for x in r.devices if x.total):
                fits = (
                    ("[green]yes[/]" if x.fits else "[red]no[/]")
                    if i or r.fits
                    else f"[red]no[/] ({r.shortfall / MIB:,.0f} short)"
                )
                head = [f"{r.placement} ({r.kind})", str(r.draft_gpu_layers), f"{r.draft_kv / MIB:,.0f}"]
                t.add_row(
                    *(head if not i else ["", "", ""]),
                    x.device,
                    *(f"{n / MIB:,.0f}" for n in (x.main, x.draft, x.total, x.budget)),
                    fits,
                )
        console.print(t)
    console.print("whether a draft pays is measured in llama-server: autotune spec MODEL --draft DRAFT")


def spec_report(report: SpecReport) -> None:
    """``autotune spec``: each finalist per kind of work against no speculation, then the verdicts."""
    works = report.plan.workloads
    t = Table(
        title=f"speculation in llama-server, {report.plan.rounds} rotated rounds of fresh servers "
        "(decode tok/s median; speed-up over none per round; a win needs the interquartile ranges apart)"
    )
    for col in ("speculation", *works):
        t.add_column(col)
    for r in report.rows:
        cells = []
        for w in works:
            e = r["workloads"][w]
            if not e["decode"]["n"]:
                cells.append("[red]failed[/]")
                continue
            cell = f"{e['decode']['median']:.1f}"
            if e["speedup"] and r is not report.rows[0]:
                sp = e["speedup"]
                mark = {"better": "[green]faster[/]", "worse": "[red]slower[/]"}.get(e["versus"], "same")
                cell += f"  x{sp['median']:.2f} ({sp['q25']:.2f}-{sp['q75']:.2f}) {mark}"
            if e["acceptance"] is not None:
                cell += f"\n{e['acceptance']:.0%} accepted, {e['accepted_per_step'] or 0:.1f}/step"
            if e.get("doubt"):
                cell += f"\n[yellow]noise: x{e['ceiling']:.2f} at most[/]"
            if not e["unchanged"]:
                cell += "\n[yellow]reply differs[/]"
            cells.append(cell)
        t.add_row(r["label"], *cells)
    console.print(t)
    for r in report.rows:
        for f in r["failures"]:
            console.print(f"[yellow]{r['label']} failed[/]: {f}")
    for kind, why in report.skipped:
        console.print(f"not measured: {kind}: {why}")
    for line in report.verdicts.values():
        console.print(line)
    console.print(f"[bold]{report.verdict.split(':')[0]}[/] ({report.wall_s:.0f} s)")


def studies(rows: list[StudySummary], url: str) -> None:
    t = Table(title=f"studies in {url}")
    for col in ("study", "model", "machine", "engine", "trials", "best", "tuned config"):
        t.add_column(col, justify="right" if col in ("trials", "best") else "left")
    for r in rows:
        t.add_row(
            r.name,
            str(r.model),
            str(r.fingerprint),
            r.engine,
            str(r.trials),
            "-" if r.best is None else f"{r.best:.2f}",
            "yes" if r.recommendation else "no",
        )
    console.print(t)


def serving(result: ServeResult, opts: ServeOptions) -> None:
    table = Table(title=f"side by side, {opts.rounds} rotated rounds, {opts.users} users (medians, q25-q75)")
    for col in ("config", "aggregate tok/s", "user decode tok/s", "TTFT p50 s", "TTFT p95 s", "failed", "peak RSS"):
        table.add_column(col)
    for label, rows in result.side_by_side.items():
        ok = [r for r in rows if r.get("ok")]
        t = result.spread(label)
        med = [result.spread(label, k) for k in ("user_tps", "ttft_p50", "ttft_p95")]
        table.add_row(
            label + (" (chosen)" if label == result.chosen else ""),
            f"{t.median:.1f} ({t.q25:.1f}-{t.q75:.1f})" if t.n else "-",
            *(f"{m.median:.2f}" if m.n else "-" for m in med),
            str(sum(r["failed"] for r in rows)),
            mib(max((r.get("peak_rss") or 0 for r in ok), default=None)),
        )
    console.print(table)
    console.print(result.verdict)
    console.print("llama-server " + shlex.join(result.command))


def report(done: Report) -> None:
    names = ", ".join(p.name for p in done.images) or "none"
    console.print(f"wrote {done.index} and {len(done.images)} plots: {names}")
    for note in done.notes:
        console.print(f"[yellow]note[/]: {note}")
