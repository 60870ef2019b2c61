"""Engine self-check: does the engine survive a short real run of this model on this machine, and if not,
which runtime switch lets it.

Some native builds crash on some CPUs: llama-cpp-python 0.3.36's AMX kernel kills every batch of two or
more tokens on Sapphire Rapids Xeons (llama.cpp issue #20824). A study whose every trial crashes teaches
nothing, so before anything is measured one child process loads the model with the starting settings,
runs a multi-token batch and a few decode steps. If it dies, the switches below are tried in order and the
first that survives is pinned for the whole run. The verdict is remembered per engine build, hardware
fingerprint, model and starting settings, so it is paid for once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..engine import FAKE_AMX_CRASH, Engine, Workload
from ..facts import catalog
from ..facts.probe import Hardware
from ..vocabulary.errors import AutotuneError
from ..vocabulary.settings import Settings

# Runtime switches that avoid a native crash, in the order they are tried: (settings, what it is, what it costs).
SWITCHES: tuple[tuple[dict[str, Any], str, str], ...] = (
    (
        {"use_extra_bufts": False},
        "extra buffer types off (llama.cpp --no-repack)",
        "weights stay in their file layout: the AMX / CPU_REPACK layouts and their speed-up on this CPU are lost",
    ),
    (
        {"use_extra_bufts": False, "flash_attn": False, "type_k": "f16", "type_v": "f16"},
        "extra buffer types and flash attention off",
        "no repacked weight layouts, no flash attention and no quantized K/V cache",
    ),
)
# Long enough for a multi-token batch (prompt) and several one-token decode steps; the warm-up adds more.
CHECK = Workload(prompt_tokens=32, gen_tokens=4, reps=1, prompt_kind="prose")
CHECK_CTX = 512  # the context length does not choose kernels; a small one keeps the check cheap
LOADING = "during loading the model"  # a crash report's stage when the process died in the model load


class EngineCrash(AutotuneError):
    """The engine dies on this machine with every runtime switch we know of."""


@dataclass(frozen=True)
class Verdict:
    """What the self-check found. ``pins`` is empty when the starting settings run as they are."""

    ok: bool  # the starting settings ran
    pins: dict[str, Any] = field(default_factory=dict)  # settings that avoid the crash, pinned for the study
    crash: str = ""  # how the starting settings failed (stage, buffers), when they did
    switch: str = ""  # the pinned switch, in words
    cost: str = ""  # what the switch gives up
    seconds: float = 0.0  # the check's own time
    cached: bool = False  # read back from an earlier check

    def line(self) -> str:
        """The one line a person reads."""
        when = "remembered from an earlier check" if self.cached else f"{self.seconds:.1f} s"
        if self.ok:
            return f"engine self-check: a multi-token batch and decode steps run ({when})"
        return (
            f"engine self-check: the engine {self.crash}; with {self.switch} it runs, so that is pinned "
            f"({', '.join(f'{k}={v}' for k, v in self.pins.items())}). Cost: {self.cost}. ({when})"
        )


def cache_path() -> Path:
    """Where verdicts are remembered: beside the model cache."""
    return catalog.cache_dir() / "engine-health.json"


def _key(model_path: str, start: Settings, hw: Hardware, pinned: frozenset[str], engine: Engine) -> str:
    """Engine build, machine, model file (path, size, time: hashing a 40 GB file would cost more than the
    check), starting settings, which of them the user pinned (a switch may not override those), and whether
    the AMX crash is injected."""
    fake = "fake-amx-crash" if os.environ.get(FAKE_AMX_CRASH) == "1" else ""
    p = Path(model_path).resolve()
    st = p.stat()
    model = f"{p}|{st.st_size}|{st.st_mtime_ns}|{sorted(pinned)}"
    digest = hashlib.sha256(f"{model}|{json.dumps(start.to_dict(), sort_keys=True)}".encode()).hexdigest()[:16]
    return "-".join(x for x in (engine.build_key(), hw.fingerprint(), digest, fake) if x)


def _read_cache() -> dict[str, Any]:
    return catalog.read_json(cache_path())


def _remember(key: str, verdict: Verdict) -> None:
    data = _read_cache()
    data[key] = {k: v for k, v in asdict(verdict).items() if k != "cached"}
    _write_cache(data)


def _write_cache(data: dict[str, Any]) -> None:
    catalog.write_json(cache_path(), data)


def forget(
    model_path: str, settings: Settings, hw: Hardware, engine: Engine, pinned: frozenset[str] = frozenset()
) -> None:
    """Drop the remembered verdict for these settings (``doctor --recheck``)."""
    data = _read_cache()
    if data.pop(_key(model_path, starting_settings(settings), hw, pinned, engine), None) is not None:
        _write_cache(data)


def starting_settings(settings: Settings) -> Settings:
    """What the check runs: the settings at a small fixed context (it does not choose kernels), no speculation."""
    return settings.unspeculated().replace(
        n_ctx=CHECK_CTX, n_batch=min(settings.n_batch, CHECK_CTX), n_ubatch=min(settings.n_ubatch, CHECK_CTX)
    )


def check(
    model_path: str,
    settings: Settings,
    hw: Hardware,
    engine: Engine,
    pinned: frozenset[str] = frozenset(),
    timeout: float = 300.0,
) -> Verdict:
    """Run the self-check for ``settings`` on ``engine`` (or read its verdict back). Switches that would override
    a setting the user pinned (``pinned``) are not tried. EngineCrash when nothing runs."""
    start = starting_settings(settings)
    key = _key(model_path, start, hw, pinned, engine)
    known = _read_cache().get(key)
    if known is not None:
        return Verdict(**{**known, "cached": True})
    t0 = time.perf_counter()
    first = engine.measure(model_path, start, CHECK, timeout=timeout)
    if first.ok:
        verdict = Verdict(ok=True, seconds=time.perf_counter() - t0)
    else:
        crash = first.error
        crash = crash if crash.startswith(("crashed", "aborted", "killed")) else f"failed: {crash}"
        verdict = _switched(model_path, start, engine, pinned, timeout, crash, t0)
    _remember(key, verdict)
    return verdict


def _switched(
    model_path: str, start: Settings, engine: Engine, pinned: frozenset[str], timeout: float, crash: str, t0: float
) -> Verdict:
    """The first runtime switch under which the check runs, after ``crash``; EngineCrash when none does."""
    crashes = [crash]
    for pins, switch, cost in SWITCHES:
        overrides_a_pin = any(k in pinned and getattr(start, k) != v for k, v in pins.items())
        if overrides_a_pin or all(getattr(start, k) == v for k, v in pins.items()):
            continue
        tried = engine.measure(model_path, start.replace(**pins), CHECK, timeout=timeout)
        if tried.ok:
            return Verdict(False, dict(pins), crash, switch, cost, time.perf_counter() - t0)
        crashes.append(tried.error)
    if all(LOADING in c for c in crashes):
        raise EngineCrash(
            f"every load of the model dies ({crash}), whatever the switch: the engine or this "
            "environment is broken here, not a setting; `autotune doctor` looks for the cause"
        )
    raise EngineCrash(
        f"the engine {crash}, and no runtime switch avoids it (known: "
        f"{'; '.join(s for _, s, _ in SWITCHES)}; a switch that would override a --set pin is "
        "not tried); see the README's troubleshooting section for rebuilds that do"
    )


@dataclass
class Doctor:
    """``autotune doctor``'s findings: the environment, and the self-check's verdict or why every run dies."""

    environment: Any  # engine.diagnose.Diagnosis
    verdict: Verdict | None
    crash: str = ""  # EngineCrash's line, when no switch helps


def doctor(
    model_path: str, start: Settings, hw: Hardware, engine: Engine, pins: dict[str, Any], recheck: bool = False
) -> Doctor:
    """The environment (the vocabulary loaded with either C++ runtime first), then the self-check of ``start``
    on ``engine`` with the user's ``pins`` (run again with ``recheck``, else remembered)."""
    from ..engine import diagnose

    start = start.replace(**pins)
    if recheck:
        forget(model_path, start, hw, engine, frozenset(pins))
    env = diagnose.diagnose(model_path)
    try:
        return Doctor(env, check(model_path, start, hw, engine, pinned=frozenset(pins)))
    except EngineCrash as e:
        return Doctor(env, None, str(e))
