"""llama.cpp's command-line spelling: llama-server and llama-bench flags for a ``Settings`` (from the knob table),
their load modes, and a user's llama-server command line read back. The external engine runs these lines and
``export`` writes them; both read them here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import SettingsError
from .knobs import KNOBS
from .settings import Settings, coerce

# The llama.cpp these spellings were checked against: the one llama-cpp-python 0.3.36 vendors, whose
# llama-server and llama-bench the export tests run (and whose --version they compare with this line).
LLAMA_CPP = "llama.cpp 0.5.0-dev, as vendored by llama-cpp-python 0.3.36"

def spelled(s: Settings, tool: str) -> list[str]:
    """The command-line spelling of every knob ``tool`` has one for, in table order."""
    out: list[str] = []
    for k in KNOBS:
        flag = getattr(k, tool)
        if flag is None or (k.needs and not getattr(s, k.needs)) or (k.spec and s.spec_type not in k.spec):
            continue
        out += [word.replace("{spec_type}", s.spec_type) for word in flag.render(getattr(s, k.name))]
    return out


# -lm/--load-mode replaced --no-mmap and --mlock in llama-server and -mmp in llama-bench.
_LOAD_MODES = {(True, False): "mmap", (False, False): "none", (True, True): "mmap+mlock", (False, True): "mlock"}


def load_mode(s: Settings) -> str:
    return _LOAD_MODES[(s.use_mmap, s.use_mlock)]


def server_flags(s: Settings, model: str) -> list[str]:
    """llama-server (and llama-cli) flags in the spelling of ``LLAMA_CPP``; defaults are written out too (its
    defaults differ from llama-cpp-python's: ``--swa-full`` is off there, flash attention is auto)."""
    return ["-m", model, *spelled(s, "server"), "-lm", load_mode(s)]


def bench_flags(s: Settings, model: str, prompt: int = 256, gen: int = 32, depth: int = 0, reps: int = 3) -> list[str]:
    """llama-bench flags measuring ``s`` on one prompt/generate test (JSON out). llama-bench sizes the context
    to the test and has one thread count: the context and the batch thread count are not written."""
    return ["-m", model, "-p", str(prompt), "-n", str(gen), "-d", str(depth), "-r", str(reps), *spelled(s, "bench"),
            "-lm", load_mode(s), "-o", "json"]


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
    switches: dict[str, tuple[str, Any]] = {"--no-mmap": ("use_mmap", False), "--mmap": ("use_mmap", True),
                                            "--mlock": ("use_mlock", True)}
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
        elif a in switches:
            name, v = switches[a]
            values[name] = v
            i += 1
        elif a in skips:
            i += 1 + skips[a]
        else:  # not ours: keep it, with its value when the next word is not a flag
            takes_value = value is not None and (not value.startswith("-") or value[1:].replace(".", "").isdigit())
            other += [a, value] if takes_value else [a]
            i += 2 if takes_value else 1
    return ServerCommand(model, Settings.from_dict(values), tuple(other))


def _takes(name: str, value: str) -> bool:
    """Whether setting ``name`` can hold ``value`` (llama-server's "auto" and "all" it cannot)."""
    try:
        coerce(name, value)
    except SettingsError:
        return False
    return value != "auto"
