"""llama.cpp's command-line spelling: llama-server and llama-bench flags for a ``Settings`` (from the knob table),
their load modes, and a user's llama-server command line read back. The external engine runs these lines and
``export`` writes them; both read them here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import SettingsError
from .knobs import BY_NAME, DENSE_FFN_REGEX, EXPERTS_REGEX, KNOBS
from .settings import Settings, coerce, layer_list, parse_layers

# The llama.cpp these spellings were checked against: the one llama-cpp-python 0.3.36 vendors, whose
# llama-server and llama-bench the export tests run (and whose --version they compare with this line).
LLAMA_CPP = "llama.cpp 0.5.0-dev, as vendored by llama-cpp-python 0.3.36"


def spelled(s: Settings, tool: str, moe_layers: Iterable[int] | None = None) -> list[str]:
    """The command-line spelling of every knob ``tool`` has one for, in table order, then the tensor overrides
    that keep layers' weights in host memory (``moe_layers``, the model's expert layers, is needed only for the
    experts of the last N layers)."""
    out: list[str] = []
    for k in KNOBS:
        flag = getattr(k, tool)
        if flag is None or (k.needs and not getattr(s, k.needs)) or (k.spec and s.spec_type not in k.spec):
            continue
        if k.name == "n_cpu_moe" and s.experts_by_layer():
            continue  # named layer by layer in the overrides below
        out += [word.replace("{spec_type}", s.spec_type) for word in flag.render(getattr(s, k.name))]
    return out + overrides(s, tool, moe_layers)


def knob_flags(name: str, value: Any, tool: str) -> list[str]:
    """One knob's spelling in ``tool`` at ``value``: nothing where the tool has no flag for it or the value is
    the one its flag leaves unwritten."""
    flag = getattr(BY_NAME[name], tool)
    return flag.render(value) if flag is not None else []


# -ot's pattern for the experts (or dense FFN weights) of a set of layers: one regex, layers as alternatives.
_OT_TOOLS = {"server": ("-ot", ","), "bench": ("-ot", ";"), "kobold": ("--overridetensors", ",")}
_OT_LAYERS = re.compile(r"blk\\\.(?:(\d+)|\(((?:\d+\|)*\d+)\))(.*)=CPU")


def layer_pattern(layers: Iterable[int], tensors: str) -> str:
    """The -ot entry keeping the ``tensors`` (EXPERTS_REGEX or DENSE_FFN_REGEX) of ``layers`` on the host."""
    return f"blk\\.({'|'.join(str(i) for i in sorted(layers))}){tensors}=CPU"


def overrides(s: Settings, tool: str, moe_layers: Iterable[int] | None = None) -> list[str]:
    """Tensor overrides (-ot) for what the tool's own flags cannot say: the experts of the last N or of chosen
    layers, and (llama-bench and KoboldCpp have no --n-cpu-ffn) the dense FFN weights of the first N. One flag,
    entries joined the way the tool splits them (llama-bench: ';' within one test)."""
    if tool not in _OT_TOOLS:
        return []
    entries = []
    if s.experts_by_layer():
        if moe_layers is None and not s.moe_host_layers:
            raise SettingsError(
                f"the experts of the {s.moe_host_from} {s.n_cpu_moe} layers are written layer by "
                "layer: the model's expert layers are needed"
            )
        layers = s.experts_on_host(parse_layers(s.moe_host_layers) if moe_layers is None else moe_layers)
        if layers:
            entries.append(layer_pattern(layers, EXPERTS_REGEX))
    if s.n_cpu_ffn and getattr(BY_NAME["n_cpu_ffn"], tool) is None:
        entries.append(layer_pattern(s.ffn_on_host(), DENSE_FFN_REGEX))
    flag, joiner = _OT_TOOLS[tool]
    return [flag, joiner.join(entries)] if entries else []


def read_overrides(value: str) -> tuple[set[int], set[int], list[str]]:
    """An -ot value read back: the layers whose experts, and those whose dense FFN weights, it keeps on the host,
    and the entries of any other shape, kept as written."""
    experts: set[int] = set()
    ffn: set[int] = set()
    rest = []
    for entry in value.split(","):
        m = _OT_LAYERS.fullmatch(entry)
        into = {EXPERTS_REGEX: experts, DENSE_FFN_REGEX: ffn}.get(m.group(3)) if m else None
        if m is None or into is None:
            rest.append(entry)
        else:
            into.update(int(i) for i in (m.group(1) or m.group(2)).split("|"))
    return experts, ffn, rest


# -lm/--load-mode replaced --no-mmap and --mlock in llama-server and -mmp in llama-bench.
_LOAD_MODES = {(True, False): "mmap", (False, False): "none", (True, True): "mmap+mlock", (False, True): "mlock"}


def load_mode(s: Settings) -> str:
    return _LOAD_MODES[(s.use_mmap, s.use_mlock)]


def server_flags(s: Settings, model: str, moe_layers: Iterable[int] | None = None) -> list[str]:
    """llama-server (and llama-cli) flags in the spelling of ``LLAMA_CPP``; defaults are written out too (its
    defaults differ from llama-cpp-python's: ``--swa-full`` is off there, flash attention is auto)."""
    return ["-m", model, *spelled(s, "server", moe_layers), "-lm", load_mode(s)]


def bench_flags(
    s: Settings,
    model: str,
    prompt: int = 256,
    gen: int = 32,
    depth: int = 0,
    reps: int = 3,
    moe_layers: Iterable[int] | None = None,
) -> list[str]:
    """llama-bench flags measuring ``s`` on one prompt/generate test (JSON out). llama-bench sizes the context
    to the test and has one thread count: the context and the batch thread count are not written."""
    return [
        "-m",
        model,
        "-p",
        str(prompt),
        "-n",
        str(gen),
        "-d",
        str(depth),
        "-r",
        str(reps),
        *spelled(s, "bench", moe_layers),
        "-lm",
        load_mode(s),
        "-o",
        "json",
    ]


@dataclass(frozen=True)
class ServerCommand:
    """A llama-server command line read back: the model, the settings autotune knows, and everything else
    (ports, chat templates, values it cannot take) kept as written."""

    model: str
    settings: Settings
    other: tuple[str, ...] = ()


def parse_server_flags(argv: list[str]) -> ServerCommand:
    """Read a llama-server command line, as ``server_flags`` writes it or as a user runs it: older spellings
    (--no-mmap, --mlock, --draft-max) are understood; flags autotune does not tune, and values it cannot
    take (``-ngl all``, ``-fa auto``), are kept in ``other`` rather than refused."""
    takes: dict[str, str] = {}
    switches: dict[str, tuple[str, Any]] = {
        "--no-mmap": ("use_mmap", False),
        "--mmap": ("use_mmap", True),
        "--mlock": ("use_mlock", True),
    }
    skips: dict[str, int] = {}  # flags written alongside another, read past
    values: dict[str, Any] = {}
    for k in KNOBS:
        if k.server is None:
            continue
        for name in (k.server.name, *k.server.aliases):
            if "{spec_type}" in name:  # one spelling per kind; which kind it was for, --spec-type says
                takes.update((name.replace("{spec_type}", kind), k.name) for kind in k.spec)
                continue
            if k.server.switch:
                switches[name] = (k.name, k.server.when)
            else:
                takes[name] = k.name
        if k.server.switch:
            values[k.name] = not k.server.when  # a switch's absence means the other value
        if k.server.extra:
            skips[k.server.extra[0]] = len(k.server.extra) - 1
    model, other = "", []
    experts: set[int] = set()  # layers kept on the host by -ot patterns of the expert and dense FFN shapes
    ffn: set[int] = set()
    args = list(argv[1:] if argv and not argv[0].startswith("-") else argv)
    i = 0
    while i < len(args):
        a, value = args[i], args[i + 1] if i + 1 < len(args) else None
        if a in ("-m", "--model", "-lm", "--load-mode") or a in takes:
            if value is None:
                raise SettingsError(f"flag {a} needs a value")
            if a in ("-m", "--model"):
                model = value
            elif a in ("-lm", "--load-mode") and value in _LOAD_MODES.values():
                values["use_mmap"], values["use_mlock"] = next(k for k, v in _LOAD_MODES.items() if v == value)
            elif a in takes and _takes(takes[a], value):
                values[takes[a]] = value
            else:
                other += [a, value]
            i += 2
        elif a in ("-ot", "--override-tensor"):
            if value is None:
                raise SettingsError(f"flag {a} needs a value")
            found, dense, rest = read_overrides(value)
            experts |= found
            ffn |= dense
            other += [a, ",".join(rest)] if rest else []
            i += 2
        elif a in switches:
            name, v = switches[a]
            values[name] = v
            i += 1
        elif a in skips:
            i += 1 + skips[a]
        else:  # not ours: keep it, with its value when the next word is not a flag
            takes_value = value is not None and (not value.startswith("-") or value[1:].replace(".", "").isdigit())
            other += [a, value] if takes_value and value is not None else [a]
            i += 2 if takes_value else 1
    s = Settings.from_dict(values)
    ffn |= s.ffn_on_host()
    first = next(n for n in range(len(ffn) + 1) if n not in ffn)  # --n-cpu-ffn names the first N layers ...
    if ffn - set(range(first)):  # ... any others stay as the user wrote them
        other += ["-ot", layer_pattern(ffn - set(range(first)), DENSE_FFN_REGEX)]
    return ServerCommand(model, _with_experts(s.replace(n_cpu_ffn=first), experts), tuple(other))


def _first(layers: set[int]) -> bool:
    return layers == set(range(len(layers)))


def _with_experts(s: Settings, experts: set[int]) -> Settings:
    """The settings with the experts -ot keeps on the host added: llama.cpp applies -ncmoe and -ot alike, so the
    layers on the host are their union. The experts of the first N layers read back as -ncmoe N."""
    if not experts:
        return s
    layers = experts | set(range(s.n_cpu_moe))
    first = _first(layers)
    return s.replace(n_cpu_moe=len(layers) if first else 0, moe_host_layers="" if first else layer_list(layers))


def _takes(name: str, value: str) -> bool:
    """Whether setting ``name`` can hold ``value`` (llama-server's "auto" and "all" it cannot)."""
    try:
        coerce(name, value)
    except SettingsError:
        return False
    return value != "auto"
