"""Command-line glue: parse flags, call the modules, print tables or JSON. No logic of its own.

Every user-facing failure is an ``AutotuneError`` and becomes one line on stderr with a non-zero exit;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import AutotuneError

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
         + (f"  (GQA x{facts.n_head // max(kv)})" if max(kv) < facts.n_head else "")),
        ("K / V head dim", f"{facts.head_dim_k} / {facts.head_dim_v}"),
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
    raise AutotuneError("autotune memory is not available yet")


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

    sp = sub.add_parser("inspect", help="what a GGUF file says about its model")
    sp.add_argument("model")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("memory", help="predict the memory a configuration needs, per device")
    sp.add_argument("model")
    sp.add_argument("--ctx", type=int, default=4096)
    sp.add_argument("--ngl", type=int, default=0, help="layers offloaded to the GPU")
    sp.add_argument("--type-k", default="f16")
    sp.add_argument("--type-v", default="f16")
    sp.add_argument("--fa", choices=("on", "off"), default="off")
    sp.add_argument("-b", "--batch", type=int, default=512)
    sp.add_argument("-ub", "--ubatch", type=int, default=512)
    sp.add_argument("--swa-full", choices=("on", "off"), default="on")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--ctx-sweep", action="store_true", help="footprint against context length per K/V type")
    sp.add_argument("--max-ctx", action="store_true", help="largest context that fits, per K/V type and offload")
    sp.add_argument("--verify", action="store_true", help="compare with the engine's own dry run")
    sp.set_defaults(func=cmd_memory)
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
