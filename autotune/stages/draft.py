"""Draft models for speculative decoding: which ones llama.cpp accepts for a main model, and what main + draft
need in memory, per place the draft can live. Decided from GGUF metadata and the memory model alone, before any
run: whether a draft pays is measured by the speculation stage (``speculation``), in llama-server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..facts.gguf_model import ModelFacts, read_facts
from ..facts.probe import Hardware
from ..vocabulary.errors import AutotuneError, ModelError
from ..vocabulary.settings import Settings

VOCAB_MAX_DIFF = 128  # llama.cpp SPEC_VOCAB_MAX_SIZE_DIFFERENCE
VOCAB_CHECK_START = 5  # llama.cpp SPEC_VOCAB_CHECK_START_TOKEN_ID: ids below are special tokens
# Size rule (nominal parameters): main at least this big -> draft at most that big. A nominal "1B" model
# holds up to ~1.3B parameters with its embeddings, hence the tolerance.
SIZE_RULE = ((20e9, 7e9), (10e9, 3e9), (2.5e9, 1e9))
SMALL_MAIN_RATIO = 1 / 3  # below 2.5B: draft at most a third of the main
NOMINAL_TOLERANCE = 1.35


class DraftError(AutotuneError):
    """A draft request that cannot be carried out (no candidates, nothing readable)."""


# ------------------------------------------------------------------------------------ compatibility


def compatibility(main: ModelFacts, draft: ModelFacts) -> list[str]:
    """Why llama.cpp would refuse ``draft`` for ``main`` (one sentence per rule broken; empty: accepted)."""
    reasons = []
    if main.vocab_type != draft.vocab_type:
        reasons.append(f"vocab type differs: main {main.vocab_type}, draft {draft.vocab_type}")
    for what, flag_m, flag_d, id_m, id_d in (
        ("BOS", main.add_bos, draft.add_bos, main.bos_id, draft.bos_id),
        ("EOS", main.add_eos, draft.add_eos, main.eos_id, draft.eos_id),
    ):
        if flag_m != flag_d:
            reasons.append(f"add-{what} flag differs: main {flag_m}, draft {flag_d}")
        elif flag_m and id_m != id_d:
            reasons.append(f"{what} token id differs: main {id_m}, draft {id_d}")
    diff = abs(main.n_vocab - draft.n_vocab)
    if diff > VOCAB_MAX_DIFF:
        reasons.append(
            f"vocab sizes differ by {diff:,} (main {main.n_vocab:,}, draft {draft.n_vocab:,}); "
            f"the engine allows at most {VOCAB_MAX_DIFF}"
        )
    if not main.tokens or not draft.tokens:
        reasons.append("no token texts in the " + ("main" if not main.tokens else "draft") + " model's metadata")
    else:
        n = min(len(main.tokens), len(draft.tokens))
        differ = [i for i in range(VOCAB_CHECK_START, n) if main.tokens[i] != draft.tokens[i]]
        if differ:
            i = differ[0]
            reasons.append(
                f"token {i} differs: main {main.tokens[i]!r}, draft {draft.tokens[i]!r} "
                f"({len(differ):,} of {n - VOCAB_CHECK_START:,} token texts from id "
                f"{VOCAB_CHECK_START} differ)"
            )
    return reasons


def size_warnings(main: ModelFacts, draft: ModelFacts) -> list[str]:
    """The size rule of thumb, as advice: a draft too close to the main costs more than it saves."""
    if draft.n_params >= main.n_params:
        return [
            f"the draft ({draft.n_params / 1e9:.2f}B) is not smaller than the main model "
            f"({main.n_params / 1e9:.2f}B): it cannot speed decoding up"
        ]
    cap = next((c for floor, c in SIZE_RULE if main.n_params >= floor), main.n_params * SMALL_MAIN_RATIO)
    if draft.n_params > cap * NOMINAL_TOLERANCE:
        return [
            f"the draft ({draft.n_params / 1e9:.2f}B) is large for a {main.n_params / 1e9:.2f}B main model: "
            f"the rule of thumb is at most {cap / 1e9:.2g}B (smaller is better if acceptance holds)"
        ]
    return []


@dataclass(frozen=True)
class DeviceShare:
    """One device's bytes with main and draft in one process, against the room it has."""

    device: str
    main: int
    draft: int
    total: int
    budget: int
    room: int  # free less the margin, within a GPU budget
    fits: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "main": self.main,
            "draft": self.draft,
            "total": self.total,
            "budget": self.budget,
            "room": self.room,
            "fits": self.fits,
        }


@dataclass(frozen=True)
class DraftPlacement:
    """Main + draft with the draft in one place (the CPU, all GPUs, one GPU): per device and in all."""

    placement: str  # "cpu", "all GPUs", "gpu0", ...
    kind: str  # "CPU", "split like the main", "same GPU", "other GPU"
    default: bool  # the placement ``draft_gpu_layers`` > 0 gets
    draft_gpu_layers: int
    draft_n_ctx: int
    draft_kv: int
    draft_weights: int
    draft_compute: int
    devices: tuple[DeviceShare, ...]
    total: int
    fits: bool
    shortfall: int  # bytes missing on the tightest device; 0 when it fits

    def to_json(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "kind": self.kind,
            "default": self.default,
            "draft_gpu_layers": self.draft_gpu_layers,
            "draft_n_ctx": self.draft_n_ctx,
            "draft_kv": self.draft_kv,
            "draft_weights": self.draft_weights,
            "draft_compute": self.draft_compute,
            "devices": [d.to_json() for d in self.devices],
            "total": self.total,
            "fits": self.fits,
            "shortfall": self.shortfall,
        }


@dataclass(frozen=True)
class DraftCandidate:
    path: str
    facts: ModelFacts | None
    reasons: list[str]  # why the engine would refuse it; empty when compatible
    warnings: list[str] = field(default_factory=list)
    placements: tuple[DraftPlacement, ...] = ()  # main + draft in memory, for a compatible candidate
    memory_error: str | None = None  # why the memory model could not price it

    @property
    def compatible(self) -> bool:
        return not self.reasons

    def to_json(self) -> dict[str, Any]:
        f = self.facts
        return {
            "path": self.path,
            "name": f.name if f else None,
            "architecture": f.architecture if f else None,
            "n_params": f.n_params if f else None,
            "file_size": f.file_size if f else None,
            "compatible": self.compatible,
            "reasons": self.reasons,
            "warnings": self.warnings,
            "memory": self._memory_json(),
        }

    def _memory_json(self) -> dict[str, Any]:
        """Placements when priced, the memory model's error when it could not, nothing for a rejected file."""
        if self.placements:
            return {"placements": [p.to_json() for p in self.placements]}
        return {"error": self.memory_error} if self.memory_error is not None else {}


def candidate_paths(items: Sequence[str], main_path: str) -> list[str]:
    """Files named, plus the ``*.gguf`` files of directories named (the main model itself skipped there)."""
    main = Path(main_path).resolve()
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += [str(f) for f in sorted(p.glob("*.gguf")) if f.resolve() != main]
        elif p.exists():
            out.append(str(p))
        else:
            raise DraftError(f"{item}: no such file or directory")
    if not out:
        raise DraftError(f"no .gguf files in {', '.join(items)}")
    return list(dict.fromkeys(out))


def check_candidate(
    main: ModelFacts, path: str, settings: Settings | None = None, hw: Hardware | None = None
) -> DraftCandidate:
    """Verdict on one candidate file; an unreadable file is a rejected candidate, not an error."""
    if Path(path).resolve() == Path(main.path).resolve():
        return DraftCandidate(path, None, ["it is the main model itself"])
    try:
        facts = read_facts(path)
    except ModelError as e:
        return DraftCandidate(path, None, [str(e)])
    c = DraftCandidate(path, facts, compatibility(main, facts), size_warnings(main, facts))
    if c.compatible and settings is not None and hw is not None:
        try:
            return dataclasses.replace(c, placements=tuple(predict_memory(main, facts, settings, hw)))
        except ModelError as e:
            return dataclasses.replace(c, memory_error=str(e))
    return c


# ------------------------------------------------------------------------------------------- memory


def predict_memory(main: ModelFacts, draft: ModelFacts, settings: Settings, hw: Hardware) -> list[DraftPlacement]:
    """Main + draft together, per place the draft can live: the CPU, split over all GPUs as the engine does
    by default, or whole on one GPU (llama-server's --device-draft / --gpu-layers-draft). The draft gets the
    main's context (llama-server's draft context holds as many tokens as the main's) and f16 caches (its
    -ctkd/-ctvd default). ``default`` marks the placement that ``draft_gpu_layers`` > 0 gets."""
    from .. import memory

    base = settings.unspeculated()
    main_est = memory.estimate(main, base, hw)
    main_devs = {d.device: d for d in main_est.devices}
    main_gpus = {d.device for d in main_est.devices if d.device != memory.HOST and d.weights + d.kv > 0}
    gpus = hw.offload_gpus
    layers = draft.n_layer + 1
    options: list[tuple[str, str, int, Hardware]] = [("cpu", "CPU", 0, hw)]
    if len(gpus) > 1:
        options.append(("all GPUs", "split like the main", layers, hw))
    for g in gpus:
        name = f"gpu{g.index}"
        options.append(
            (name, "same GPU" if name in main_gpus else "other GPU", layers, dataclasses.replace(hw, gpus=(g,)))
        )
    default = options[1][0] if gpus else None
    rows = []
    for label, kind, ngl, draft_hw in options:
        d_est = memory.estimate(draft, base.replace(n_gpu_layers=ngl, type_k="f16", type_v="f16"), draft_hw)
        devices: list[DeviceShare] = []
        for name in dict.fromkeys([*main_devs, *(d.device for d in d_est.devices)]):
            m = main_devs.get(name)
            d = next((x for x in d_est.devices if x.device == name), None)
            draft_bytes = d.total - (d.overhead if m else 0) if d else 0  # one process: the overhead is shared
            total = (m.total if m else 0) + draft_bytes
            budget = m.budget if m else d.budget if d else 0
            room = m.room() if m else d.room() if d else 0  # free less the margin, within a GPU budget
            devices.append(DeviceShare(name, m.total if m else 0, draft_bytes, total, budget, room, total <= room))
        misses = [x.total - x.room for x in devices]
        if main_est.shared_memory or d_est.shared_memory:  # unified memory: everything comes out of RAM
            host = next(x for x in devices if x.device == memory.HOST)
            misses.append(sum(x.total for x in devices) - (host.budget - memory.margin(host.budget)))
        rows.append(
            DraftPlacement(
                placement=label,
                kind=kind,
                default=label == default,
                draft_gpu_layers=ngl,
                draft_n_ctx=d_est.n_ctx,
                draft_kv=d_est.kv_k + d_est.kv_v,
                draft_weights=sum(x.weights + x.repack for x in d_est.devices),
                draft_compute=sum(x.compute for x in d_est.devices),
                devices=tuple(devices),
                total=sum(x.total for x in devices),
                fits=all(m <= 0 for m in misses),
                shortfall=max(0, max(misses)),
            )
        )
    return rows


def auto_candidates(main_path: str) -> list[str]:
    """Where ``--draft auto`` looks: the main model's directory and autotune's model cache."""
    from ..facts.catalog import cache_dir

    places = [Path(main_path).parent, cache_dir() / "models"]
    return [str(p) for p in dict.fromkeys(places) if p.is_dir() and any(p.glob("*.gguf"))]


@dataclass(frozen=True)
class DraftReport:
    """``autotune draft``: every candidate's verdict and, for the compatible ones, memory beside the main."""

    main: ModelFacts
    settings: Settings
    candidates: list[DraftCandidate]

    def to_json(self) -> dict[str, Any]:
        """The JSON shape of ``autotune draft --json``."""
        return {
            "main": {"path": self.main.path, "name": self.main.name, "n_params": self.main.n_params},
            "settings": self.settings.to_dict(),
            "candidates": [c.to_json() for c in self.candidates],
        }


def check(main_path: str, items: Sequence[str], settings: Settings, hw: Hardware) -> DraftReport:
    """Check every candidate named (files, or directories of them) against ``main_path``."""
    main = read_facts(main_path)
    return DraftReport(
        main, settings, [check_candidate(main, p, settings, hw) for p in candidate_paths(items, main_path)]
    )
