"""The tuned config as other tools want it: llama-server, llama-bench, Python, LM Studio, Ollama, KoboldCpp.

Every format reads one ``TunedRecord`` (``search.config``, whose ``to_json`` is the JSON format) and spells its
``Settings`` with the knob table (``knobs.KNOBS``); llama.cpp's own spelling (llama-server, llama-bench, a user's
command line read back) is ``flags``.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from ..search.config import TunedRecord
from ..vocabulary.errors import ConfigError
from ..vocabulary.flags import LLAMA_CPP, bench_flags, server_flags, spelled
from ..vocabulary.knobs import BY_NAME, KNOBS
from ..vocabulary.settings import Settings, layer_list, parse_layers

FORMATS = ("json", "llama-server", "llama-bench", "python", "lmstudio", "ollama", "koboldcpp")
_KOBOLD_QUANTKV = {"f16": 0, "q8_0": 1, "q4_0": 2}


def render(config: TunedRecord, fmt: str) -> str:
    """The config in format ``fmt`` (one of FORMATS)."""
    s = config.settings
    model = config.model.get("path", "model.gguf")
    layers = config.moe_layers() if fmt in ("llama-server", "llama-bench", "python", "koboldcpp") else None
    if fmt == "json":
        return json.dumps(config.to_json(), indent=2)
    if fmt == "llama-server":
        notes = [f"written for llama-server of {LLAMA_CPP}", *_missing(s, "server", "llama-server")]
        return "\n".join([*(f"# {n}" for n in notes), shlex.join(["llama-server", *server_flags(s, model, layers)])])
    if fmt == "llama-bench":
        notes = [
            f"written for llama-bench of {LLAMA_CPP}",
            "llama-bench sizes the context to the test and runs one thread count (-t): "
            f"n_ctx={s.n_ctx} and n_threads_batch={s.n_threads_batch} are not written",
            *_missing(s, "bench", "llama-bench"),
        ]
        return "\n".join(
            [*(f"# {n}" for n in notes), shlex.join(["llama-bench", *bench_flags(s, model, moe_layers=layers)])]
        )
    if fmt == "python":
        return f"# written for llama-cpp-python {_engine_version()}\n" + python_kwargs(s, model, layers)
    if fmt == "lmstudio":
        return json.dumps(
            {"written_for": UNCHECKED.format(tool="LM Studio's SDK load config (llm.load.* keys)"), **lmstudio(s)},
            indent=2,
        )
    if fmt == "ollama":
        return f"# {UNCHECKED.format(tool='an Ollama Modelfile')}\n" + ollama_modelfile(s, model)
    if fmt == "koboldcpp":
        notes = [UNCHECKED.format(tool="KoboldCpp's command line"), *_missing(s, "kobold", "KoboldCpp")]
        if (s.type_k, s.type_v) != ("f16", "f16") and not (s.type_k == s.type_v and s.type_k in _KOBOLD_QUANTKV):
            notes.append(
                f"KoboldCpp has one cache type for K and V (--quantkv): the tuned K={s.type_k}, "
                f"V={s.type_v} is not written"
            )
        return "\n".join([*(f"# {n}" for n in notes), shlex.join(["koboldcpp", *koboldcpp_flags(s, model, layers)])])
    raise ConfigError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


# Knobs a format writes jointly, outside the table's per-knob spellings.
# Which layers' experts stay on the host, and (where the tool has no --n-cpu-ffn) the dense FFN layers, are tensor
# overrides (``flags.overrides``).
_PLACED = ("moe_host_from", "moe_host_layers")
_JOINT = {
    "server": ("use_mmap", "use_mlock", *_PLACED),
    "bench": ("use_mmap", "use_mlock", "n_ctx", "n_threads_batch", *_PLACED, "n_cpu_ffn"),
    "kobold": ("type_k", "type_v", *_PLACED, "n_cpu_ffn"),
    "ollama": ("flash_attn", "type_k", "type_v"),
}


def _missing(s: Settings, spelling: str, tool: str) -> list[str]:
    """A note for every tuned value ``tool`` has no setting for, rather than dropping it silently: the knob's
    own sentence (``Knob.missing``) or a plain one. Values equal to llama-cpp-python's default are left out."""
    notes = []
    for k in KNOBS:
        value = getattr(s, k.name)
        if getattr(k, spelling) is not None or k.name in _JOINT.get(spelling, ()) or value == k.default_value():
            continue
        if (k.needs and not getattr(s, k.needs)) or (k.spec and s.spec_type not in k.spec):
            continue
        if k.name == "spec_type" and value == "draft-simple" and getattr(BY_NAME["draft_model"], spelling):
            continue  # the tool's own draft-model setting speculates this way
        notes.append(
            k.missing.format(tool=tool, value=value)
            if k.missing
            else f"{tool} has no setting for {k.label}: the tuned value was {value}"
        )
    return notes


# Tools autotune does not run: the spelling follows their documentation, and the export says so.
UNCHECKED = "written for {tool} as documented; not run by autotune's tests"


def _engine_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def llama_kwargs(s: Settings, model: str) -> dict[str, Any]:
    """``llama_cpp.Llama(**kwargs)`` for these settings (speculation is llama-server's: see ``python_kwargs``)."""
    return {"model_path": model, **s.llama_kwargs()}


# Llama(...) has no keyword for the model parameter use_extra_bufts: the pasted code (the user's program, not
# autotune's engine) sets it on the default model parameters Llama starts from.
_NO_REPACK = """import llama_cpp.llama_cpp

# llama.cpp --no-repack: Llama() has no keyword for it, so set it on the model parameters it starts from.
_default_model_params = llama_cpp.llama_cpp.llama_model_default_params


def _no_repack_params():
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


llama_cpp.llama_cpp.llama_model_default_params = _no_repack_params
"""


# Layers kept in host memory need llama.cpp's tensor buffer-type overrides, a C array: autotune's engine builds it
# (the pasted code then needs autotune installed, as a draft model does).
_MODEL_PARAMS = """import llama_cpp.llama_cpp

from autotune.engine.native import model_params
from autotune.vocabulary.settings import Settings

# llama.cpp's tensor overrides (--n-cpu-moe, -ot, --n-cpu-ffn){no_repack}: Llama() has no keyword for them, so set
# them on the model parameters it starts from.
_default_model_params = llama_cpp.llama_cpp.llama_model_default_params
llama_cpp.llama_cpp.llama_model_default_params = lambda: model_params(
    Settings({placement}use_extra_bufts={use_extra_bufts}), _default_model_params)
"""


def python_kwargs(s: Settings, model: str, moe_layers: tuple[int, ...] | None = None) -> str:
    """``Llama(...)`` code; the layers kept on the host are written as the layer set they resolve to for this model
    (``moe_layers``, where the last N are meant)."""
    kwargs = llama_kwargs(s, model)
    body = ",\n".join(f"    {k}={v!r}" for k, v in kwargs.items())
    placement = ""
    if s.experts_by_layer():
        layers = s.experts_on_host(moe_layers) if moe_layers is not None else parse_layers(s.moe_host_layers)
        placement += f"moe_host_layers={layer_list(layers)!r}, "
    elif s.n_cpu_moe:
        placement += f"n_cpu_moe={s.n_cpu_moe}, "
    if s.n_cpu_ffn:
        placement += f"n_cpu_ffn={s.n_cpu_ffn}, "
    if placement:
        params = _MODEL_PARAMS.format(
            placement=placement,
            use_extra_bufts=s.use_extra_bufts,
            no_repack="" if s.use_extra_bufts else " and --no-repack",
        )
    else:
        params = "" if s.use_extra_bufts else _NO_REPACK
    head = "from llama_cpp import Llama\n" + params
    note = (
        ""
        if s.spec_type == "none"
        else (
            f"# Speculative decoding ({s.spec_type}) was measured in llama-server, which speculates natively; Llama()\n"
            "# has no native draft-model or n-gram speculation: export --format llama-server to get it.\n"
        )
    )
    return f"{head}\n{note}llm = Llama(\n{body},\n)\n"


def lmstudio(s: Settings) -> dict[str, Any]:
    """An LM Studio SDK load config (``client.llm.model(key, config=...)``), plus the draft model."""
    out: dict[str, Any] = {}
    for k in KNOBS:
        if k.lmstudio is None or (k.needs and not getattr(s, k.needs)) or (k.spec and s.spec_type not in k.spec):
            continue
        path, encode = k.lmstudio
        *parents, key = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = encode(getattr(s, k.name))
    notes = _missing(s, "lmstudio", "LM Studio")
    if notes:
        out["notes"] = notes
    return out


def ollama_modelfile(s: Settings, model: str) -> str:
    lines = [f"FROM {model}"]
    lines += [f"PARAMETER {k.ollama[0]} {k.ollama[1](getattr(s, k.name))}" for k in KNOBS if k.ollama is not None]
    lines += [
        "# Ollama sets flash attention and the KV cache type for the whole server, not per model:",
        f"#   OLLAMA_FLASH_ATTENTION={1 if s.flash_attn else 0} OLLAMA_KV_CACHE_TYPE={s.type_k} ollama serve",
    ]
    if s.type_k != s.type_v:
        lines.append(f"#   (Ollama uses one type for K and V; autotune measured K={s.type_k}, V={s.type_v})")
    lines += [f"# {note}" for note in _missing(s, "ollama", "Ollama")]
    return "\n".join(lines) + "\n"


def koboldcpp_flags(s: Settings, model: str, moe_layers: tuple[int, ...] | None = None) -> list[str]:
    flags = ["--model", model, *spelled(s, "kobold", moe_layers)]
    if s.type_k == s.type_v and s.type_k in _KOBOLD_QUANTKV and s.type_k != "f16":  # one setting for K and V
        flags += ["--quantkv", str(_KOBOLD_QUANTKV[s.type_k])]
    return flags
