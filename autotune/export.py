"""The tuned config: a versioned JSON record, and the same settings as other tools want them.

Every format reads one ``Settings``. ``parse_server_flags`` is the inverse of the llama-server format,
so a command line someone already uses can be read back into Settings.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, SettingsError
from .settings import Settings

SCHEMA_VERSION = 1
NO_REPACK_MISSING = ("{tool} has no setting for extra buffer types (llama.cpp --no-repack); the tuned settings turn "
                     "them off (use_extra_bufts=False), so {tool} may run slower or faster, and where autotune's "
                     "engine self-check saw a crash with them on, {tool}'s engine may crash too")
FORMATS = ("json", "llama-server", "python", "lmstudio", "ollama", "koboldcpp")
_KOBOLD_QUANTKV = {"f16": 0, "q8_0": 1, "q4_0": 2}


def build_config(
    settings: Settings,
    model: dict[str, Any],
    hardware: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    predicted: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The tuned-config record (schema 1). ``model`` holds path, sha256, architecture and name."""
    return {
        "schema": SCHEMA_VERSION,
        "autotune_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "engine": {"name": "llama-cpp-python", "version": hardware.get("engine_version", ""),
                   "backend": hardware.get("backend", "")},
        "hardware": {**hardware, "fingerprint": hardware.get("fingerprint", "")},
        "model": model,
        "settings": settings.to_dict(),
        "metrics": metrics or {},
        "memory": predicted or {},
        **(extra or {}),
    }


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a tuned config back; ConfigError for anything invalid or newer than this autotune."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict) or "schema" not in data or "settings" not in data:
        raise ConfigError(f"{p}: not an autotune config (no schema/settings)")
    if not isinstance(data["schema"], int) or data["schema"] > SCHEMA_VERSION:
        raise ConfigError(f"{p}: config schema {data['schema']} is newer than this autotune understands "
                          f"({SCHEMA_VERSION}); upgrade autotune")
    try:
        Settings.from_dict(data["settings"]).check()
    except (SettingsError, TypeError, AttributeError) as e:
        raise ConfigError(f"{p}: invalid settings: {e}") from None
    return data


def settings_of(config: dict[str, Any]) -> Settings:
    return Settings.from_dict(config["settings"])


def render(config: dict[str, Any], fmt: str) -> str:
    """The config in format ``fmt`` (one of FORMATS)."""
    s = settings_of(config)
    model = config.get("model", {}).get("path", "model.gguf")
    if fmt == "json":
        return json.dumps(config, indent=2)
    if fmt == "llama-server":
        return shlex.join(["llama-server", *server_flags(s, model)])
    if fmt == "python":
        return python_kwargs(s, model)
    if fmt == "lmstudio":
        return json.dumps(lmstudio(s), indent=2)
    if fmt == "ollama":
        return ollama_modelfile(s, model)
    if fmt == "koboldcpp":
        command = shlex.join(["koboldcpp", *koboldcpp_flags(s, model)])
        return command if s.use_extra_bufts else command + "\n# " + NO_REPACK_MISSING.format(tool="KoboldCpp")
    raise ConfigError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def server_flags(s: Settings, model: str) -> list[str]:
    """llama-server (and llama-cli) flags, current llama.cpp names; defaults are written out too."""
    flags = [
        "-m", model,
        "-c", str(s.n_ctx),
        "-ngl", str(s.n_gpu_layers),
        "-t", str(s.n_threads),
        "-tb", str(s.n_threads_batch),
        "-b", str(s.n_batch),
        "-ub", str(s.n_ubatch),
        "-fa", "on" if s.flash_attn else "off",
        "-ctk", s.type_k,
        "-ctv", s.type_v,
    ]
    if s.swa_full:
        flags.append("--swa-full")  # the CLI default is off; llama-cpp-python's is on
    if not s.offload_kqv:
        flags.append("--no-kv-offload")
    if not s.use_mmap:
        flags.append("--no-mmap")
    if s.use_mlock:
        flags.append("--mlock")
    if not s.use_extra_bufts:
        flags.append("--no-repack")
    if s.draft_model:
        flags += ["-md", s.draft_model, "--draft-max", str(s.draft_max), "--draft-min", "0",
                  "-ngld", str(s.draft_gpu_layers)]
    return flags


def parse_server_flags(argv: list[str]) -> tuple[str, Settings]:
    """Read llama-server flags (as ``server_flags`` writes them) back into (model path, Settings)."""
    values: dict[str, Any] = {"swa_full": False}
    takes = {
        "-c": "n_ctx", "--ctx-size": "n_ctx", "-ngl": "n_gpu_layers", "--n-gpu-layers": "n_gpu_layers",
        "-t": "n_threads", "--threads": "n_threads", "-tb": "n_threads_batch", "--threads-batch": "n_threads_batch",
        "-b": "n_batch", "--batch-size": "n_batch", "-ub": "n_ubatch", "--ubatch-size": "n_ubatch",
        "-fa": "flash_attn", "--flash-attn": "flash_attn", "-ctk": "type_k", "--cache-type-k": "type_k",
        "-ctv": "type_v", "--cache-type-v": "type_v", "-md": "draft_model", "--model-draft": "draft_model",
        "--draft-max": "draft_max", "--draft": "draft_max", "-ngld": "draft_gpu_layers",
        "--gpu-layers-draft": "draft_gpu_layers",
    }
    switches = {"--swa-full": ("swa_full", True), "--no-kv-offload": ("offload_kqv", False),
                "-nkvo": ("offload_kqv", False), "--no-mmap": ("use_mmap", False), "--mlock": ("use_mlock", True),
                "--no-repack": ("use_extra_bufts", False), "-nr": ("use_extra_bufts", False)}
    model = ""
    args = list(argv[1:] if argv and not argv[0].startswith("-") else argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-m", "--model"):
            model = args[i + 1]
            i += 2
        elif a in takes:
            if i + 1 >= len(args):
                raise SettingsError(f"flag {a} needs a value")
            values[takes[a]] = args[i + 1]
            i += 2
        elif a in switches:
            name, value = switches[a]
            values[name] = value
            i += 1
        elif a == "--draft-min":
            i += 2
        else:
            raise SettingsError(f"unknown llama-server flag {a!r}")
    return model, Settings.from_dict(values)


def llama_kwargs(s: Settings, model: str) -> dict[str, Any]:
    """``llama_cpp.Llama(**kwargs)`` for these settings (the draft model is wired separately)."""
    return {"model_path": model, **s.llama_kwargs()}


# Llama(...) has no keyword for the model parameter use_extra_bufts: the pasted code sets it on the default
# model parameters Llama starts from (what autotune.engine.load_llama does for one load).
_NO_REPACK = """import llama_cpp.llama_cpp

# llama.cpp --no-repack: Llama() has no keyword for it, so set it on the model parameters it starts from.
_default_model_params = llama_cpp.llama_cpp.llama_model_default_params


def _no_repack_params():
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


llama_cpp.llama_cpp.llama_model_default_params = _no_repack_params
"""


def python_kwargs(s: Settings, model: str) -> str:
    kwargs = llama_kwargs(s, model)
    body = ",\n".join(f"    {k}={v!r}" for k, v in kwargs.items())
    head = "from llama_cpp import Llama\n" + ("" if s.use_extra_bufts else _NO_REPACK)
    if not s.draft_model:
        return f"{head}\nllm = Llama(\n{body},\n)\n"
    # A draft needs every token's logits kept (the library sizes its score array by n_batch otherwise).
    return (f"{head}\nfrom autotune.engine.greedy_draft import GreedyDraft\nfrom autotune.settings import Settings\n\n"
            f"draft = GreedyDraft({s.draft_model!r}, Settings.from_dict({s.to_dict()!r}))\n"
            f"llm = Llama(\n{body},\n    logits_all=True,\n    draft_model=draft,\n)\n")


def lmstudio(s: Settings) -> dict[str, Any]:
    """An LM Studio SDK load config (``client.llm.model(key, config=...)``), plus the draft model."""
    load = {
        "contextLength": s.n_ctx,
        "gpu": {"ratio": "max" if s.n_gpu_layers > 0 else 0},
        "evalBatchSize": s.n_batch,
        "flashAttention": s.flash_attn,
        "llamaKCacheQuantizationType": s.type_k,
        "llamaVCacheQuantizationType": s.type_v,
        "offloadKVCacheToGpu": s.offload_kqv,
        "tryMmap": s.use_mmap,
        "keepModelInMemory": s.use_mlock,
        "cpuThreadPoolSize": s.n_threads,
    }
    out: dict[str, Any] = {"load": load}
    if not s.use_extra_bufts:
        out["notes"] = [NO_REPACK_MISSING.format(tool="LM Studio")]
    if s.draft_model:
        out["prediction"] = {"draftModel": s.draft_model}
    return out


def ollama_modelfile(s: Settings, model: str) -> str:
    lines = [
        f"FROM {model}",
        f"PARAMETER num_ctx {s.n_ctx}",
        f"PARAMETER num_gpu {s.n_gpu_layers}",
        f"PARAMETER num_thread {s.n_threads}",
        f"PARAMETER num_batch {s.n_batch}",
        f"PARAMETER use_mmap {'true' if s.use_mmap else 'false'}",
        "# Ollama sets flash attention and the KV cache type for the whole server, not per model:",
        f"#   OLLAMA_FLASH_ATTENTION={1 if s.flash_attn else 0} OLLAMA_KV_CACHE_TYPE={s.type_k} ollama serve",
    ]
    if s.type_k != s.type_v:
        lines.append(f"#   (Ollama uses one type for K and V; autotune measured K={s.type_k}, V={s.type_v})")
    if s.draft_model:
        lines.append(f"# Ollama has no draft-model setting; the tuned draft was {s.draft_model}")
    if not s.use_extra_bufts:
        lines.append("# " + NO_REPACK_MISSING.format(tool="Ollama"))
    return "\n".join(lines) + "\n"


def koboldcpp_flags(s: Settings, model: str) -> list[str]:
    flags = [
        "--model", model,
        "--contextsize", str(s.n_ctx),
        "--gpulayers", str(s.n_gpu_layers),
        "--threads", str(s.n_threads),
        "--blasthreads", str(s.n_threads_batch),
        "--blasbatchsize", str(s.n_batch),
    ]
    if s.flash_attn:
        flags.append("--flashattention")
    if s.type_k == s.type_v and s.type_k in _KOBOLD_QUANTKV and s.type_k != "f16":
        flags += ["--quantkv", str(_KOBOLD_QUANTKV[s.type_k])]
    if not s.use_mmap:
        flags.append("--nommap")
    if s.use_mlock:
        flags.append("--usemlock")
    if s.draft_model:
        flags += ["--draftmodel", s.draft_model, "--draftamount", str(s.draft_max),
                  "--draftgpulayers", str(s.draft_gpu_layers)]
    return flags
