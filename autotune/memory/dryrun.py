"""The engine's own dry run as the memory oracle for any architecture it loads.

A no-allocation load reports the KV (or recurrent state), compute and output buffers the engine would
allocate for a context; weights are placed from the tensor table (``layout``), which needs no
architecture knowledge. Answers are cached on disk under the model's header digest, the engine build and
the settings that shape them (``Knob.memory``), so a sweep or a study pays for each answer once. A batch of
settings costs one child process; the child runs apart because on some CPUs the dry run itself aborts.

The engine build that answers is handed in (``Hardware.build``, a ``probe.Build``): this layer sits below the
engine and asks only the build it is given.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..facts.catalog import cache_dir
from ..facts.gguf_model import ModelFacts
from ..facts.probe import Build
from ..vocabulary.errors import EngineDied
from ..vocabulary.knobs import KNOBS
from ..vocabulary.settings import Settings

MEMORY_KNOBS = tuple(k.name for k in KNOBS if k.memory)


@dataclass(frozen=True)
class Figures:
    """What one dry run reported for one settings, in bytes per buffer name ("CPU", "CUDA0", ...)."""

    kv_caches: tuple[tuple[int, int, int], ...]  # (cells, K or R bytes, V or S bytes) per cache
    compute: dict[str, int]
    output: dict[str, int]
    weights_total: int  # llama_model_size
    kv: dict[str, int]  # KV bytes per buffer ("CPU", "CUDA0", ...)


@dataclass(frozen=True)
class Died:
    """The child died answering these settings: no answer, and never stored (the next ask runs again)."""

    reason: str


@dataclass
class Cost:
    """Dry runs this process paid for (cache misses): child processes, settings answered, seconds."""

    runs: int = 0
    settings: int = 0
    seconds: float = 0.0


COST = Cost()
_memo: dict[Path, dict[str, Any]] = {}


def key(s: Settings) -> str:
    return json.dumps({k: getattr(s, k) for k in MEMORY_KNOBS}, sort_keys=True)


def figures(facts: ModelFacts, settings: Sequence[Settings], build: Build) -> list[Figures | str | Died]:
    """``build``'s figures for each settings, its reason where it refuses them, or ``Died`` where the child died
    on them (ModelError when the engine cannot load the model at all)."""
    path = cache_dir() / "dry-run" / f"{facts.header_sha256[:24]}-{build.build_key()}.json"
    store = _load(path)
    missing = list({key(s): s for s in settings if key(s) not in store}.values())
    died: dict[str, Died] = {}
    if missing:
        answers = _run(build, facts.path, missing)
        died = {k: v for k, v in answers.items() if isinstance(v, Died)}
        store.update({k: v for k, v in answers.items() if not isinstance(v, Died)})
        _save(path, store)
    return [died[key(s)] if key(s) in died else _figures(store[key(s)]) for s in settings]


def _run(build: Build, model: str, settings: list[Settings]) -> dict[str, Any]:
    """One child for the batch; where the child dies, each model load again on its own so one aborting
    load (e.g. extra buffers on some CPUs) does not take the others' answers with it."""
    start = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        reports = build.dry_run(model, settings)
        COST.runs += 1
    except EngineDied as e:
        groups: dict[Any, list[Settings]] = {}
        for s in settings:
            groups.setdefault(s.load_key(), []).append(s)
        if len(groups) > 1:
            for group in groups.values():
                out.update(_run(build, model, group))
            return out
        COST.runs += 1
        return {key(s): Died(str(e).removeprefix(f"{model}: ")) for s in settings}
    for s, r in zip(settings, reports, strict=False):
        out[key(s)] = (
            r
            if isinstance(r, str)
            else {
                "kv_caches": r.kv_caches,
                "compute": r.compute,
                "output": r.output,
                "weights_total": r.weights_total,
                "kv": r.kv,
            }
        )
    COST.settings += len(settings)
    COST.seconds += time.perf_counter() - start
    return out


def _figures(item: Any) -> Figures | str:
    if isinstance(item, str):
        return item
    return Figures(
        tuple(tuple(c) for c in item["kv_caches"]),
        dict(item["compute"]),
        dict(item["output"]),
        int(item["weights_total"]),
        dict(item.get("kv", {})),
    )


def _load(path: Path) -> dict[str, Any]:
    if path not in _memo:
        try:
            _memo[path] = json.loads(path.read_text())
        except (OSError, ValueError):
            _memo[path] = {}
    return _memo[path]


def _save(path: Path, store: dict[str, Any]) -> None:
    """Merge with what another process may have written meanwhile, then replace atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            merged = {**json.loads(path.read_text()), **store}
        except (OSError, ValueError):
            merged = dict(store)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged))
        os.replace(tmp, path)
        _memo[path] = merged
    except OSError:
        pass  # a read-only cache only costs time
