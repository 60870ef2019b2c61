"""Command-line glue: parse flags, call the pipeline or a command's entry point, hand the result to ``printers``.

Every user-facing failure is an ``AutotuneError`` and becomes one line on stderr with a non-zero exit;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from . import __version__
from .output import printers
from .output.printers import console, print_json
from .vocabulary.errors import AutotuneError

if TYPE_CHECKING:
    from .engine import Engine
    from .facts.probe import Hardware
    from .search.config import TunedRecord
    from .search.pipeline import Stage, TuneReporter


def _options(cls: Any, args: argparse.Namespace, **given: Any) -> Any:
    """``cls`` (a dataclass of options) from the flags named like its fields, with ``given`` over them."""
    return cls(**{**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}, **given})


def _pins(args: argparse.Namespace) -> dict[str, Any]:
    from .search.space import parse_pins

    return parse_pins(args.set or [])


def _hardware(bandwidth: bool = False) -> Any:
    from .engine import bundled
    from .facts.probe import probe

    return probe(bundled, measure_bandwidth=bandwidth)


def _budget(args: argparse.Namespace) -> tuple[int, ...] | None:
    """``--gpu-budget`` as MiB per GPU (SettingsError, one line, for a bad value)."""
    from .facts.probe import parse_gpu_budget

    return parse_gpu_budget(args.gpu_budget)


def _model(args: argparse.Namespace) -> str:
    from .facts import catalog

    return args.model or str(catalog.fetch(quiet=False))


def cmd_probe(args: argparse.Namespace) -> int:
    hw = _hardware(bandwidth=not args.no_bandwidth)
    print_json(hw.to_dict()) if args.json else printers.probe(hw)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import engine
    from .facts.gguf_model import read_facts
    from .search import health

    model, hw = _model(args), _hardware()
    start = engine.defaults(read_facts(model).default_ctx)
    with console.status("the environment, then the engine self-check: load, a batch, a few decode steps ..."):
        found = health.doctor(model, start, hw, engine.bundled, _pins(args), args.recheck)
    if args.json:
        env = found.environment
        print_json(
            {
                **(dataclasses.asdict(found.verdict) if found.verdict else {"ok": False, "crash": found.crash}),
                "model": model,
                "cpu_features": list(hw.cpu_features),
                "environment": {**dataclasses.asdict(env), "order_fault": env.order_fault},
            }
        )
    else:
        printers.doctor(hw, found)
    if found.crash:
        print(f"autotune: error: {found.crash}", file=sys.stderr)
        return 3
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .facts.gguf_model import read_facts

    facts = read_facts(args.model)
    print_json(facts.summary()) if args.json else printers.inspect(facts)
    return 0


def _settings(args: argparse.Namespace, **more: Any) -> Any:
    """The settings ``memory`` and ``fit`` price, from their flags; contradictions (n_ubatch > n_batch included)
    are the user's to fix, not ours to clamp."""
    from .vocabulary.settings import Settings

    return Settings(n_batch=args.batch, n_ubatch=args.ubatch, use_extra_bufts=args.repack == "on", **more).check()


def cmd_memory(args: argparse.Namespace) -> int:
    from . import memory
    from .facts.gguf_model import read_facts
    from .search import oracle

    budget = _budget(args)
    facts, hw = read_facts(args.model), _hardware().with_gpu_budget(budget)
    s = _settings(
        args,
        n_ctx=args.ctx,
        n_gpu_layers=args.ngl,
        flash_attn=args.fa == "on",
        type_k=args.type_k,
        type_v=args.type_v,
        swa_full=args.swa_full == "on",
        n_cpu_moe=args.n_cpu_moe,
    )
    out = memory.describe(facts, s, hw, args.ctx_sweep, args.max_ctx, oracle.check if args.verify else None)
    print_json(out.to_json()) if args.json else printers.memory_report(out, facts, s, hw)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from .facts.gguf_model import read_facts
    from .memory.fit import fit

    budget = _budget(args)
    facts, hw = read_facts(args.model), _hardware().with_gpu_budget(budget)
    keep = None if args.margin is None else int(args.margin * 2**20)
    started = time.perf_counter()
    rows = fit(
        facts,
        hw,
        args.ctx,
        _settings(args),
        tuple(t.strip() for t in args.kv.split(",") if t.strip()),
        keep,
        args.beyond_trained,
    )
    seconds = time.perf_counter() - started
    print_json(printers.fit_json(facts, rows, keep, seconds, hw)) if args.json else printers.fit(
        facts, rows, keep, seconds, hw
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from . import engine
    from .output import export
    from .search import pipeline
    from .vocabulary import flags
    from .vocabulary.settings import Settings

    start, model, ctx, budget = None, args.model, args.ctx, _budget(args)
    if args.from_cmdline:
        cmd = flags.parse_server_flags(shlex.split(args.from_cmdline))
        start, model = cmd.settings, args.model or cmd.model or None
        ctx = ctx or (start.n_ctx if start.n_ctx != Settings().n_ctx else None)
        if cmd.other:
            console.print(f"from your command line, kept as you had them (not tuned): {shlex.join(cmd.other)}")
        if start.spec_type != "none":
            console.print(
                f"your speculation ({start.spec_type}) is left to the speculation stage (--spec); the study "
                "tunes the main model"
            )
    given = {k: getattr(args, k) for k in ("prompt_tokens", "gen_tokens", "reps") if getattr(args, k) is not None}
    options = _options(
        pipeline.TuneOptions,
        args,
        ctx=ctx,
        objective=args.objective or pipeline.TuneOptions.objective,
        trade=args.objective is not None,
        pins=_pins(args),
        recommend=not args.no_recommend,
        start=start,
        workload=dataclasses.replace(pipeline.HOST_WORKLOAD, **given) if given else None,
        gpu_budget=budget,
    )
    measurer, reporter = engine.make(args.engine), printers.Terminal()
    stage = _spec_stage(args, measurer, reporter) if args.spec else None
    try:
        tuned = pipeline.tune(model, options, reporter, measurer, stage)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the study is saved; run the same command again to resume[/]")
        return 130
    if tuned is None:
        return 0
    printers.recommendation(tuned.record)
    if args.out:
        with open(args.out, "w") as f:
            f.write(export.render(tuned.record, args.format))
        console.print(f"wrote {args.out} ({args.format})")
    return 0


def _spec_stage(args: argparse.Namespace, measurer: Engine, reporter: TuneReporter) -> Stage:
    """``search --spec``: the speculation stage on the tuned record, in the user's llama-server where it is the
    engine, else the reference build."""
    from . import engine
    from .engine import external
    from .search.progress import Lines
    from .stages import speculation

    plan = speculation.Plan(target=args.spec_for, storage=args.storage)

    def stage(record: TunedRecord, hw: Hardware) -> TunedRecord:
        with reporter.step("measuring speculative decoding in llama-server with the tuned settings ...") as status:
            server = (
                measurer
                if isinstance(measurer, external.Tool) and measurer.kind == "llama-server"
                else engine.llama_server()
            )
            record, report = speculation.search_stage(record, args.spec, hw, plan, Lines(status), server)
        printers.spec_report(report)
        return record

    return stage


def cmd_export(args: argparse.Namespace) -> int:
    from .output import export
    from .search import storage
    from .search.config import TunedRecord
    from .vocabulary.errors import ConfigError

    source = args.study or args.source
    if not source:
        raise ConfigError("export what? give a tuned config JSON or a study name (--study NAME)")
    if not args.study and (source.endswith(".json") or os.path.isfile(source)):
        config = TunedRecord.load(source)
    else:
        config = TunedRecord.from_json(
            storage.recommendation(source, args.storage or storage.default_url()), f"study {source}"
        )
    text = export.render(config, args.format)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + ("" if text.endswith("\n") else "\n"))
    else:
        print(text)
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from .search import storage

    rows = storage.summaries(args.storage)
    print_json([r.to_json() for r in rows]) if args.json else printers.studies(rows, storage.storage_url(args.storage))
    return 0


def _spec_arg(value: str) -> str:
    """``--spec``: checked while parsing, so a typo fails before the search, not after it."""
    from .facts.gguf_model import read_facts

    if value in ("auto", "ngram"):
        return value
    try:
        read_facts(value)
    except AutotuneError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def cmd_draft(args: argparse.Namespace) -> int:
    from .facts.gguf_model import read_facts
    from .search import baselines
    from .search.config import TunedRecord
    from .stages import draft

    facts, hw = read_facts(args.model), _hardware()
    settings = (
        TunedRecord.load(args.config).settings if args.config else baselines.sensible(hw, facts, facts.default_ctx)
    )
    settings = settings.replace(**({"n_ctx": args.ctx} if args.ctx else {}), **_pins(args))
    report = draft.check(args.model, args.candidates, settings, hw)
    print_json(report.to_json()) if args.json else printers.draft_report(report)
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    from . import engine
    from .facts.gguf_model import read_facts
    from .search import baselines, health
    from .search.config import TunedRecord
    from .search.progress import Lines
    from .stages import speculation

    plan = _options(
        speculation.Plan,
        args,
        workloads=tuple(args.workloads),
        gpu_budget=_budget(args),
        drafts=tuple(args.draft or ()),
        ngram=not args.no_ngram,
    )
    facts, hw = read_facts(args.model), _hardware().with_gpu_budget(plan.gpu_budget)
    settings = (
        TunedRecord.load(args.config).settings if args.config else baselines.sensible(hw, facts, facts.default_ctx)
    )
    pins = _pins(args)
    settings = settings.replace(**({"n_ctx": args.ctx} if args.ctx else {}), **pins)
    server = engine.llama_server(args.server)
    status_console = printers.Console(stderr=True)
    with status_console.status("engine self-check, then the study, then the rounds ...") as status:
        # the reference llama-server runs the same ggml: where a run crashes, the check's switch avoids it there too
        verdict = health.check(args.model, settings, hw, engine.bundled, pinned=frozenset(pins), timeout=plan.timeout)
        status_console.print(verdict.line())
        settings = settings.replace(**verdict.pins)
        report = speculation.evaluate(args.model, settings, hw, plan, Lines(status.update), server)
    print_json(report.to_json()) if args.json else printers.spec_report(report)
    return 0


def cmd_serve_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import engine
    from .facts.gguf_model import read_facts
    from .search.progress import Lines
    from .stages import serving

    opts = _options(serving.ServeOptions, args, gpu_budget=_budget(args))
    model = _model(args)
    server = engine.llama_server(args.server, quiet=False)
    console.print(
        f"serving study: {read_facts(model).name}, {opts.users} users x {opts.ctx_per_user:,} tokens, "
        f"{opts.requests} requests per load, llama-server {server.path}"
    )
    result = serving.tune(model, opts, Lines(lambda text: console.print(f"  {text}")), server)
    printers.serving(result, opts)
    if args.out:
        serving.save(result, Path(args.out))
        console.print(f"wrote {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    from .output import report

    printers.report(report.build(args.source, args.out, storage=args.storage))
    return 0


# ------------------------------------------------------------------------------------------- parser


def _parents() -> dict[str, argparse.ArgumentParser]:
    """Flags several commands share, written once."""

    def parser(*specs: tuple[tuple[str, ...], dict[str, Any]]) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False)
        for names, kw in specs:
            p.add_argument(*names, **kw)
        return p

    return {
        "json": parser((("--json",), {"action": "store_true"})),
        "storage": parser((("--storage",), {"help": "Optuna storage URL (default: sqlite in ./studies)"})),
        "set": parser(
            (("--set",), {"action": "append", "metavar": "NAME=VALUE", "help": "pin a setting, e.g. n_threads=2"})
        ),
        "model?": parser(
            (("model",), {"nargs": "?", "help": "GGUF file (default: the SmolLM2-135M demo model, fetched once)"})
        ),
        "model": parser((("model",), {})),
        "budget": parser(
            (
                ("--gpu-budget",),
                {
                    "metavar": "MIB",
                    "help": "use at most this much of each GPU, fixed overhead included (one value for "
                    "every GPU, or one per GPU: 12288,8192); room for a desktop or a second model",
                },
            )
        ),
        "batches": parser(
            (("-b", "--batch"), {"type": int, "default": 512}),
            (("-ub", "--ubatch"), {"type": int, "default": 512}),
            (
                ("--repack",),
                {
                    "choices": ("on", "off"),
                    "default": "on",
                    "help": "extra weight buffer types (AMX, CPU_REPACK); off is llama.cpp's --no-repack",
                },
            ),
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    from .output.export import FORMATS
    from .search.pipeline import GPU_WORKLOAD, HOST_WORKLOAD, TuneOptions
    from .stages.serving import ServeOptions
    from .stages.speculation import Plan
    from .vocabulary.metrics import OBJECTIVES
    from .vocabulary.settings import KV_SHORTLIST

    p = argparse.ArgumentParser(prog="autotune", description="Hardware-aware configuration autotuner for llama.cpp")
    p.add_argument("--version", action="version", version=f"autotune {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)
    par = _parents()

    def command(name: str, func: Any, help: str, *parents: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, parents=[par[x] for x in parents])
        sp.set_defaults(func=func)
        return sp

    sp = command("probe", cmd_probe, "what this machine is: cores, RAM, GPUs, engine build, bandwidth", "json")
    sp.add_argument("--no-bandwidth", action="store_true", help="skip the ~1 s bandwidth measurement")
    sp = command(
        "doctor",
        cmd_doctor,
        "engine self-check and environment: does a short real run survive here, and if not, why",
        "model?",
        "set",
        "json",
    )
    sp.add_argument(
        "--recheck", action="store_true", help="run the check again instead of reading the remembered verdict"
    )
    command("inspect", cmd_inspect, "what a GGUF file says about its model", "model", "json")

    sp = command(
        "memory",
        cmd_memory,
        "predict the memory a configuration needs, per device",
        "model",
        "batches",
        "json",
        "budget",
    )
    sp.add_argument(
        "--ctx",
        type=int,
        default=4096,
        help="context length; above the trained context it also raises the --ctx-sweep/--max-ctx limit",
    )
    sp.add_argument("--ngl", type=int, default=0, help="layers offloaded to the GPU")
    sp.add_argument(
        "--n-cpu-moe",
        type=int,
        default=0,
        metavar="N",
        help="keep the experts of the first N layers in host memory (mixture-of-experts models)",
    )
    sp.add_argument("--type-k", default="f16")
    sp.add_argument("--type-v", default="f16")
    sp.add_argument("--fa", choices=("on", "off"), default="off")
    sp.add_argument("--swa-full", choices=("on", "off"), default="on")
    sp.add_argument("--ctx-sweep", action="store_true", help="footprint against context length per K/V type")
    sp.add_argument("--max-ctx", action="store_true", help="largest context that fits, per K/V type and offload")
    sp.add_argument(
        "--verify", action="store_true", help="compare with the engine's own dry run (and a GPU's real peak)"
    )

    sp = command(
        "fit",
        cmd_fit,
        "placements that hold a context on this machine, and the largest context each allows",
        "model",
        "batches",
        "json",
        "budget",
    )
    sp.add_argument("--ctx", type=int, help="the context you need (default: the trained context)")
    sp.add_argument(
        "--beyond-trained",
        action="store_true",
        help="allow and offer contexts beyond the trained one (RoPE-scaled use)",
    )
    sp.add_argument(
        "--margin",
        type=float,
        metavar="MIB",
        help="memory to keep free on each device (default: max(512 MiB, 5 %% of its free memory))",
    )
    sp.add_argument("--kv", default=",".join(KV_SHORTLIST), help="K/V cache types to consider")

    d = TuneOptions()
    sp = command(
        "search",
        cmd_search,
        "tune the settings with real engine runs (default: the demo model)",
        "model?",
        "storage",
        "set",
        "budget",
    )
    sp.add_argument("--ctx", type=int, help="context length you need (default: min(4096, trained context))")
    sp.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help=f"the speed to maximize (default: {d.objective}, losing no other speed to the best "
        "baseline beyond noise; naming it lets the other speeds be traded for it)",
    )
    sp.add_argument("--pareto", action="store_true", help="multi-objective: decode vs prefill vs memory")
    sp.add_argument("--trials", type=int, default=d.trials, help="the most trials, both stages together")
    sp.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        metavar="K",
        help="stop a stage once K trials in a row have not moved its best by 3 %% (0: run every trial)",
    )
    sp.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    sp.add_argument(
        "--trial-timeout", type=float, default=d.trial_timeout, help="kill one engine run after this many seconds"
    )
    sp.add_argument("--seed", type=int, default=d.seed)
    sp.add_argument(
        "--engine",
        metavar="KIND:PATH",
        help="measure with your own llama.cpp: llama-bench:PATH or llama-server:PATH (default: the "
        "bundled llama-cpp-python; memory is always priced by the bundled engine)",
    )
    sp.add_argument(
        "--from-cmdline",
        metavar="'llama-server ...'",
        help="start from the llama-server command line you run today: its settings are measured "
        "first and are a baseline; its model is used when MODEL is not given",
    )
    sp.add_argument(
        "--depth",
        type=int,
        metavar="N",
        help="measure with N tokens of history already in the cache, "
        "like llama-bench -d (default: an eighth of --ctx in 256-token blocks)",
    )
    for flag, field, what in (
        ("--prompt-tokens", "prompt_tokens", "tokens of the measured prompt"),
        ("--gen-tokens", "gen_tokens", "tokens generated per repetition"),
        ("--reps", "reps", "repetitions inside each trial's run"),
    ):
        sp.add_argument(
            flag,
            type=int,
            help=f"{what} (default: {getattr(HOST_WORKLOAD, field)}, or "
            f"{getattr(GPU_WORKLOAD, field)} when every layer is on a GPU)",
        )
    sp.add_argument("--top-k", type=int, default=d.top_k, help="candidates re-measured against the defaults")
    sp.add_argument("--rounds", type=int, default=d.rounds, help="interleaved re-measurement rounds")
    sp.add_argument("--kv-quality", choices=("strict", "relaxed", "off"), default=d.kv_quality)
    sp.add_argument("--no-recommend", action="store_true", help="only run trials")
    sp.add_argument("--out", help="write the tuned config here")
    sp.add_argument("--format", choices=FORMATS, default="json")
    sp.add_argument(
        "--spec",
        type=_spec_arg,
        metavar="auto|ngram|DRAFT",
        help="then measure speculative decoding in llama-server with the tuned settings: the n-gram kinds, "
        "plus a draft model (auto: compatible GGUFs next to the model or in the cache; or a GGUF); "
        "the config speculates only where it pays",
    )
    sp.add_argument(
        "--spec-for",
        dest="spec_for",
        choices=("all", "code", "prose", "edit"),
        default="all",
        help="the kind of work the tuned config speculates for (all: none made slower)",
    )

    sp = command("export", cmd_export, "write a tuned config in another tool's format", "storage")
    sp.add_argument("source", nargs="?", help="a tuned config JSON, or a study name")
    sp.add_argument("--study", help="a study's name (with --storage: a fleet's tuned config, no files to copy)")
    sp.add_argument("--format", choices=FORMATS, default="json")
    sp.add_argument("--out")
    command("studies", cmd_studies, "every study in a storage: model, machine, engine, trials, best", "storage", "json")

    sp = command(
        "draft",
        cmd_draft,
        "which draft models llama.cpp accepts for a main model, and their memory",
        "model",
        "set",
        "json",
    )
    sp.add_argument(
        "--candidates",
        nargs="+",
        required=True,
        metavar="DIR_OR_FILE",
        help="draft GGUF files, or directories whose *.gguf files are candidates",
    )
    sp.add_argument("--config", help="a tuned config JSON: price the drafts beside its settings")
    sp.add_argument("--ctx", type=int, help="context length (default: the config's, else min(4096, trained))")

    sp = command(
        "spec",
        cmd_spec,
        "speculative decoding in llama-server: every kind that applies, on code, prose and edits, against none",
        "model",
        "set",
        "json",
        "storage",
        "budget",
    )
    sp.add_argument("--draft", nargs="+", metavar="DIR_OR_FILE", help="draft models to try (files or directories)")
    sp.add_argument("--no-ngram", action="store_true", help="leave the n-gram kinds out")
    sp.add_argument("--config", help="a tuned config JSON: the main settings (default: sensible settings)")
    sp.add_argument("--ctx", type=int, help="context length (default: the config's, else min(4096, trained))")
    sp.add_argument("--server", help="your llama-server binary (default: the engine's own llama.cpp, built once)")
    sp.add_argument(
        "--workloads",
        type=lambda v: [w.strip() for w in v.split(",") if w.strip()],
        default=list(Plan.workloads),
        metavar="KIND,...",
        help="kinds of work: code, prose, edit",
    )
    sp.add_argument("--prompts", type=int, default=Plan.prompts, help="messages per kind of work (at most 2)")
    sp.add_argument("--gen-tokens", type=int, default=Plan.gen_tokens, help="reply length in tokens")
    sp.add_argument(
        "--trials",
        type=int,
        help="study trials (default: each kind's defaults, then one more per kind with parameters)",
    )
    sp.add_argument("--rounds", type=int, default=Plan.rounds, help="rotated side-by-side rounds")
    sp.add_argument(
        "--spec-for",
        dest="target",
        choices=("all", "code", "prose", "edit"),
        default="all",
        help="the kind of work the recommendation speculates for",
    )
    sp.add_argument(
        "--trial-timeout",
        dest="timeout",
        type=float,
        default=Plan.timeout,
        help="kill one server after this many seconds",
    )

    sp = command(
        "serve-tune",
        cmd_serve_tune,
        "tune llama-server for N concurrent users under a real load (default: the demo model)",
        "model?",
        "storage",
        "budget",
    )
    sp.add_argument("--users", type=int, default=ServeOptions.users, help="concurrent users the server must serve")
    sp.add_argument(
        "--ctx-per-user",
        type=int,
        default=ServeOptions.ctx_per_user,
        metavar="C",
        help="context each user's conversation needs",
    )
    sp.add_argument("--max-ttft", type=float, metavar="S", help="bound: p95 time to first token, seconds")
    sp.add_argument("--min-user-tps", type=float, metavar="X", help="bound: the median user's decode tok/s")
    sp.add_argument("--trials", type=int, default=ServeOptions.trials)
    sp.add_argument(
        "--rounds", type=int, default=ServeOptions.rounds, help="side-by-side rounds against llama-server's defaults"
    )
    sp.add_argument(
        "--requests-per-user",
        type=int,
        default=ServeOptions.requests_per_user,
        help="the load: users x this many requests",
    )
    sp.add_argument(
        "--time-limit",
        type=float,
        default=ServeOptions.time_limit,
        help="seconds one load may take, whatever is in flight",
    )
    sp.add_argument("--server", metavar="PATH", help="llama-server binary (default: the reference build)")
    sp.add_argument(
        "--spec",
        action="store_true",
        help="also search llama-server's n-gram speculation per slot; "
        "a speculating winner is measured beside itself without it",
    )
    sp.add_argument("--seed", type=int, default=ServeOptions.seed)
    sp.add_argument("--out", help="write the result (JSON) here")

    sp = command("report", cmd_report, "plots and an HTML page for a study or a tuned config")
    sp.add_argument("source", metavar="STUDY_OR_CONFIG", help="a tuned config JSON, or a study name")
    sp.add_argument("--out", required=True, metavar="DIR", help="directory for index.html and the PNGs")
    sp.add_argument("--storage", help="Optuna storage URL of the study (default: sqlite in ./studies, or the config's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
