"""Speculative decoding: which draft models the engine accepts for a main model, what main + draft need
in memory, and whether drafting really speeds decoding up on this machine.

Compatibility is decided from GGUF metadata alone, with llama.cpp's own rules. Speed is measured, never
assumed: acceptance depends on the prompt and a draft costs time on every step, so main-alone and
main+draft runs alternate in fresh processes on two kinds of text, and a speedup is claimed only when
the interquartile ranges are apart (the rule of ``recommend``). "No speculative decoding" is a valid
answer.

Drafting runs after the main settings are tuned (``search --draft``), not inside the search: acceptance
is a property of the model pair and the text, not of threads or batch sizes, and every draft trial
costs a second model load, so putting draft settings into the search space would multiply its cost
without telling it anything the separate stage does not.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import engine
from .engine import Measurement, Workload
from .errors import AutotuneError, ModelError
from .gguf_model import ModelFacts, read_facts
from .probe import Hardware
from .recommend import MIN_SAMPLES, Spread
from .settings import Settings

DRAFT_NS = (2, 4, 8, 16)
PROMPT_KINDS = ("code", "prose")
VOCAB_MAX_DIFF = 128  # llama.cpp SPEC_VOCAB_MAX_SIZE_DIFFERENCE
VOCAB_CHECK_START = 5  # llama.cpp SPEC_VOCAB_CHECK_START_TOKEN_ID: ids below are special tokens
# Size rule (nominal parameters): main at least this big -> draft at most that big. A nominal "1B" model
# holds up to ~1.3B parameters with its embeddings, hence the tolerance.
SIZE_RULE = ((20e9, 7e9), (10e9, 3e9), (2.5e9, 1e9))
SMALL_MAIN_RATIO = 1 / 3  # below 2.5B: draft at most a third of the main
NOMINAL_TOLERANCE = 1.35
LOGIT_BYTES = 4


class DraftError(AutotuneError):
    """A draft request that cannot be carried out (no candidates, nothing readable)."""


# ------------------------------------------------------------------------------------ compatibility


def compatibility(main: ModelFacts, draft: ModelFacts) -> list[str]:
    """Why llama.cpp would refuse ``draft`` for ``main`` (one sentence per rule broken; empty: accepted)."""
    reasons = []
    if main.vocab_type != draft.vocab_type:
        reasons.append(f"vocab type differs: main {main.vocab_type}, draft {draft.vocab_type}")
    for what, flag_m, flag_d, id_m, id_d in (("BOS", main.add_bos, draft.add_bos, main.bos_id, draft.bos_id),
                                             ("EOS", main.add_eos, draft.add_eos, main.eos_id, draft.eos_id)):
        if flag_m != flag_d:
            reasons.append(f"add-{what} flag differs: main {flag_m}, draft {flag_d}")
        elif flag_m and id_m != id_d:
            reasons.append(f"{what} token id differs: main {id_m}, draft {id_d}")
    diff = abs(main.n_vocab - draft.n_vocab)
    if diff > VOCAB_MAX_DIFF:
        reasons.append(f"vocab sizes differ by {diff:,} (main {main.n_vocab:,}, draft {draft.n_vocab:,}); "
                       f"the engine allows at most {VOCAB_MAX_DIFF}")
    if not main.tokens or not draft.tokens:
        reasons.append("no token texts in the " + ("main" if not main.tokens else "draft") + " model's metadata")
    else:
        n = min(len(main.tokens), len(draft.tokens))
        differ = [i for i in range(VOCAB_CHECK_START, n) if main.tokens[i] != draft.tokens[i]]
        if differ:
            i = differ[0]
            reasons.append(f"token {i} differs: main {main.tokens[i]!r}, draft {draft.tokens[i]!r} "
                           f"({len(differ):,} of {n - VOCAB_CHECK_START:,} token texts from id "
                           f"{VOCAB_CHECK_START} differ)")
    return reasons


def size_warnings(main: ModelFacts, draft: ModelFacts) -> list[str]:
    """The size rule of thumb, as advice: a draft too close to the main costs more than it saves."""
    if draft.n_params >= main.n_params:
        return [f"the draft ({draft.n_params / 1e9:.2f}B) is not smaller than the main model "
                f"({main.n_params / 1e9:.2f}B): it cannot speed decoding up"]
    cap = next((c for floor, c in SIZE_RULE if main.n_params >= floor), main.n_params * SMALL_MAIN_RATIO)
    if draft.n_params > cap * NOMINAL_TOLERANCE:
        return [f"the draft ({draft.n_params / 1e9:.2f}B) is large for a {main.n_params / 1e9:.2f}B main model: "
                f"the rule of thumb is at most {cap / 1e9:.2g}B (smaller is better if acceptance holds)"]
    return []


@dataclass
class DraftCandidate:
    path: str
    facts: ModelFacts | None
    reasons: list[str]  # why the engine would refuse it; empty when compatible
    warnings: list[str] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def compatible(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
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
            "memory": self.memory,
        }


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


def check_candidate(main: ModelFacts, path: str, settings: Settings | None = None,
                    hw: Hardware | None = None) -> DraftCandidate:
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
            c.memory = {"placements": predict_memory(main, facts, settings, hw)}
        except ModelError as e:
            c.memory = {"error": str(e)}
    return c


# ------------------------------------------------------------------------------------------- memory


def speculative_host_bytes(main: ModelFacts, settings: Settings, n_ctx: int) -> int:
    """Host memory llama-cpp-python adds to the main model when a draft is attached.

    A draft forces logits for every evaluated token: the engine's output buffer grows to a whole batch
    of logits, and the Python side keeps an n_ctx x n_vocab score array (it fills as the context does;
    this is its size at a full context)."""
    batch_rows = min(settings.n_batch, n_ctx)
    return (batch_rows - 1) * main.n_vocab * LOGIT_BYTES + n_ctx * main.n_vocab * LOGIT_BYTES


def predict_memory(main: ModelFacts, draft: ModelFacts, settings: Settings, hw: Hardware) -> list[dict[str, Any]]:
    """Main + draft together, per place the draft can live: the CPU, split over all GPUs as the engine does
    by default, or whole on one GPU (llama-server's --device-draft / --gpu-layers-draft). The draft gets
    the main's context and cache types, as llama.cpp does by default. ``default`` marks the placement
    that ``draft_gpu_layers`` > 0 gets in llama-cpp-python (the one measured)."""
    from . import memory

    base = settings.replace(draft_model=None, draft_max=0, draft_gpu_layers=0)
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
        options.append((name, "same GPU" if name in main_gpus else "other GPU", layers,
                         dataclasses.replace(hw, gpus=(g,))))
    default = options[1][0] if gpus else None
    spec = speculative_host_bytes(main, settings, main_est.n_ctx)
    rows = []
    for label, kind, ngl, draft_hw in options:
        d_est = memory.estimate(draft, base.replace(n_gpu_layers=ngl), draft_hw)
        devices = []
        for name in dict.fromkeys([*main_devs, *(d.device for d in d_est.devices)]):
            m = main_devs.get(name)
            d = next((x for x in d_est.devices if x.device == name), None)
            draft_bytes = d.total - (d.overhead if m else 0) if d else 0  # one process: the overhead is shared
            extra = spec if name == memory.HOST else 0
            total = (m.total if m else 0) + draft_bytes + extra
            budget = m.budget if m else d.budget if d else 0
            devices.append({"device": name, "main": m.total if m else 0, "draft": draft_bytes,
                            "speculative": extra, "total": total, "budget": budget,
                            "fits": total <= budget - memory.margin(budget)})
        misses = [x["total"] - (x["budget"] - memory.margin(x["budget"])) for x in devices]
        if main_est.shared_memory or d_est.shared_memory:  # unified memory: everything comes out of RAM
            host = next(x for x in devices if x["device"] == memory.HOST)
            misses.append(sum(x["total"] for x in devices) - (host["budget"] - memory.margin(host["budget"])))
        rows.append({
            "placement": label,
            "kind": kind,
            "default": label == default,
            "draft_gpu_layers": ngl,
            "draft_n_ctx": d_est.n_ctx,
            "draft_kv": d_est.kv_k + d_est.kv_v,
            "draft_weights": sum(x.weights + x.repack for x in d_est.devices),
            "draft_compute": sum(x.compute for x in d_est.devices),
            "speculative_host": spec,
            "devices": devices,
            "total": sum(x["total"] for x in devices),
            "fits": all(m <= 0 for m in misses),
            "shortfall": max(0, max(misses)),
        })
    return rows


# -------------------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Plan:
    """What to measure. The defaults give 6 samples per configuration and kind from 20 engine loads for
    the Qwen 1.5B + 0.5B pair: about 5 minutes on 2 quiet CPU cores.

    llama-cpp-python shows the draft the prompt only at its first call, after the first token, so the
    draft's prompt processing counts as decode time: short replies understate a draft's steady gain."""

    ns: tuple[int, ...] = DRAFT_NS
    kinds: tuple[str, ...] = PROMPT_KINDS
    rounds: int = 2
    prompt_tokens: int = 64
    gen_tokens: int = 32
    reps: int = 3
    timeout: float = 300.0

    def workload(self, kind: str) -> Workload:
        return Workload(self.prompt_tokens, self.gen_tokens, self.reps, kind)


@dataclass
class Arm:
    """One configuration measured on every prompt kind: the main alone, or main + (draft, n, GPU layers)."""

    label: str
    settings: Settings
    runs: dict[str, list[Measurement]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def ok_runs(self, kind: str) -> list[Measurement]:
        return [m for m in self.runs.get(kind, []) if m.ok]

    def spread(self, kind: str) -> Spread:
        return Spread.of([v for m in self.ok_runs(kind) for v in m.decode_tps])

    def counters(self, kind: str) -> dict[str, Any]:
        """Draft counters over all runs; ``draft_share``: the part of decode time spent drafting, which is
        what a rejected proposal costs."""
        runs = self.ok_runs(kind)
        proposed = sum(m.draft.get("proposed", 0) for m in runs)
        accepted = sum(m.draft.get("accepted", 0) for m in runs)
        steps = sum(m.draft.get("steps", 0) for m in runs)
        decode_s = sum((len(m.output_tokens) - 1) / v for m in runs for v in m.decode_tps if v > 0)
        draft_s = sum(m.draft.get("draft_s", 0.0) for m in runs)
        return {"proposed": proposed, "accepted": accepted, "steps": steps,
                "acceptance": accepted / proposed if proposed else None,
                "accepted_per_step": accepted / steps if steps else None,
                "draft_share": min(draft_s / decode_s, 1.0) if decode_s else None}


def arms_for(main_settings: Settings, drafts: Sequence[DraftCandidate], ns: Sequence[int],
             hw: Hardware) -> list[Arm]:
    """The baseline first, then every (draft, n, draft GPU layers); GPU layers only where a GPU exists and
    main + draft are predicted to fit there."""
    base = main_settings.replace(draft_model=None, draft_max=0, draft_gpu_layers=0)
    arms = [Arm("main alone", base)]
    for c in drafts:
        assert c.facts is not None
        layer_options = [0]
        if hw.offload_gpus:
            gpu_rows = [r for r in c.memory.get("placements", []) if r["default"] and r["fits"]]
            layer_options = [c.facts.n_layer + 1] * bool(gpu_rows) + [0]
        for ngl in layer_options:
            for n in ns:
                label = f"{Path(c.path).name} n={n}" + (f" ngld={ngl}" if hw.offload_gpus else "")
                arms.append(Arm(label, base.replace(draft_model=c.path, draft_max=n, draft_gpu_layers=ngl)))
    return arms


def measure(main_path: str, arms: list[Arm], plan: Plan,
            on_run: Callable[[str, str, Measurement], None] | None = None) -> None:
    """Interleaved rounds of fresh processes: every arm once per kind per round, the order rotated."""
    for r in range(plan.rounds):
        for kind in plan.kinds:
            k = r % len(arms)
            for arm in arms[k:] + arms[:k]:
                m = engine.measure(main_path, arm.settings, plan.workload(kind), timeout=plan.timeout)
                arm.runs.setdefault(kind, []).append(m)
                if not m.ok:
                    arm.failures.append(f"{kind}: {m.error}")
                if on_run:
                    on_run(arm.label, kind, m)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _outputs(arm: Arm, reference: list[int] | None, kind: str) -> dict[str, Any]:
    """Greedy output with the draft against the main alone: the same tokens, or where they part."""
    if reference is None:
        return {"outputs_match": None, "mismatch": "no main-alone output to compare with"}
    diffs = [(i, _first_difference(m.output_tokens, reference)) for i, m in enumerate(arm.ok_runs(kind))]
    bad = [(i, d) for i, d in diffs if d is not None]
    if not diffs:
        return {"outputs_match": None, "mismatch": "no successful run"}
    if not bad:
        return {"outputs_match": True, "mismatch": ""}
    return {"outputs_match": False,
            "mismatch": f"{len(bad)} of {len(diffs)} runs differ from the main alone, first at token {bad[0][1]}"}


def summarize(arms: list[Arm], kinds: Sequence[str]) -> list[dict[str, Any]]:
    """Per arm and kind: decode spread, speedup over the main alone, acceptance, output check."""
    baseline = arms[0]
    rows = []
    for arm in arms:
        row: dict[str, Any] = {"label": arm.label, "draft_model": arm.settings.draft_model,
                               "draft_max": arm.settings.draft_max,
                               "draft_gpu_layers": arm.settings.draft_gpu_layers,
                               "failures": arm.failures, "kinds": {},
                               "peak_rss": statistics.median(rss) if (rss := [m.peak_rss for k in kinds
                                                                             for m in arm.ok_runs(k)]) else 0}
        for kind in kinds:
            s, b = arm.spread(kind), baseline.spread(kind)
            base_runs = baseline.ok_runs(kind)
            reference = base_runs[0].output_tokens if base_runs else None
            entry: dict[str, Any] = {"decode": s.to_dict(),
                                     "samples": [v for m in arm.ok_runs(kind) for v in m.decode_tps]}
            if arm is baseline:
                entry.update(_outputs(arm, reference, kind))  # is the main alone itself deterministic?
            else:
                entry["speedup"] = s.median / b.median if s.n and b.n and b.median else None
                said = s.versus(b)
                entry["clear_win"], entry["clear_loss"] = said == "better", said == "worse"
                entry.update(arm.counters(kind))
                entry.update(_outputs(arm, reference, kind))
            row["kinds"][kind] = entry
        rows.append(row)
    return rows


def decide(rows: list[dict[str, Any]], kinds: Sequence[str]) -> tuple[dict[str, Any] | None, str]:
    """The best draft configuration, or None: a draft is recommended only when its decode speed clearly
    beats the main alone (interquartile ranges apart, at least ``MIN_SAMPLES`` samples a side) on every
    kind of text measured."""
    drafts = [r for r in rows[1:] if all(r["kinds"][k].get("speedup") for k in kinds)]
    if not drafts:
        return None, "No draft configuration ran successfully: no speculative decoding."

    def gain(r: dict[str, Any]) -> float:
        return math.exp(sum(math.log(r["kinds"][k]["speedup"]) for k in kinds) / len(kinds))

    winners = sorted((r for r in drafts if all(r["kinds"][k]["clear_win"] for k in kinds)), key=gain, reverse=True)
    if winners:
        w = winners[0]
        per = ", ".join(f"{k} x{w['kinds'][k]['speedup']:.2f} (acceptance {w['kinds'][k]['acceptance'] or 0:.0%})"
                        for k in kinds)
        verdict = f"Use {w['label']}: decode {per}, interquartile ranges apart from the main alone."
        if not all(w["kinds"][k]["outputs_match"] for k in kinds):
            verdict += (" Note: its greedy output differs from the main alone's (batched evaluation rounds "
                        "differently); check it on your own prompts.")
        return w, verdict
    best = max(drafts, key=gain)
    parts = []
    for k in kinds:
        e = best["kinds"][k]
        how = "clearly faster" if e["clear_win"] else "clearly slower" if e["clear_loss"] else "within the noise"
        parts.append(f"{k} x{e['speedup']:.2f} ({how})")
    partial = [r["label"] + f" on {k}" for r in drafts for k in kinds if r["kinds"][k]["clear_win"]]
    verdict = (f"No speculative decoding: nothing beats the main model alone beyond the noise on every kind of "
               f"text. Best draft configuration {best['label']}: {', '.join(parts)}.")
    if partial:
        verdict += f" Clear wins on one kind only: {'; '.join(partial[:4])}."
    fewest = min(r["kinds"][k]["decode"]["n"] for r in (rows[0], best) for k in kinds)
    if fewest < MIN_SAMPLES:
        verdict += f" Only {fewest} samples a side: at least {MIN_SAMPLES} are needed to claim a win (more rounds)."
    return None, verdict


# ------------------------------------------------------------------------------------------ pipeline


@dataclass
class DraftReport:
    main: ModelFacts
    settings: Settings  # the main's settings the drafts were measured with
    candidates: list[DraftCandidate]
    plan: Plan | None
    rows: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    verdict: str
    wall_s: float

    @property
    def recommended(self) -> Settings:
        """The main's settings with the recommended draft, or without one."""
        if self.chosen is None:
            return self.settings.replace(draft_model=None, draft_max=0, draft_gpu_layers=0)
        return self.settings.replace(draft_model=self.chosen["draft_model"], draft_max=self.chosen["draft_max"],
                                     draft_gpu_layers=self.chosen["draft_gpu_layers"])

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``autotune draft --json`` (stable: keys are only ever added)."""
        return {
            "main": {"path": self.main.path, "name": self.main.name, "n_params": self.main.n_params},
            "settings": self.settings.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "plan": dataclasses.asdict(self.plan) if self.plan else None,
            "results": self.rows,
            "recommendation": {
                "use_draft": self.chosen is not None,
                "draft_model": self.chosen["draft_model"] if self.chosen else None,
                "draft_max": self.chosen["draft_max"] if self.chosen else 0,
                "draft_gpu_layers": self.chosen["draft_gpu_layers"] if self.chosen else 0,
                "verdict": self.verdict,
            },
            "wall_s": self.wall_s,
        }


def evaluate(main_path: str, items: Sequence[str], settings: Settings, hw: Hardware, plan: Plan | None = Plan(),
             on_run: Callable[[str, str, Measurement], None] | None = None,
             max_drafts: int | None = None) -> DraftReport:
    """Check every candidate; measure the compatible ones (``plan`` None: check only); recommend.

    ``max_drafts`` keeps the smallest compatible candidates that pass the size rule (for ``auto``)."""
    start = time.perf_counter()
    main = read_facts(main_path)
    candidates = [check_candidate(main, p, settings, hw) for p in candidate_paths(items, main_path)]
    ok = [c for c in candidates if c.compatible]
    if max_drafts is not None:
        ok = sorted((c for c in ok if not c.warnings), key=lambda c: c.facts.n_params if c.facts else 0)[:max_drafts]
    if plan is None or not ok:
        verdict = ("Checked only (no measurement)." if plan is None and ok else
                   "No compatible draft among the candidates: no speculative decoding.")
        return DraftReport(main, settings, candidates, plan, [], None, verdict, time.perf_counter() - start)
    arms = arms_for(settings, ok, plan.ns, hw)
    measure(main_path, arms, plan, on_run)
    rows = summarize(arms, plan.kinds)
    chosen, verdict = decide(rows, plan.kinds)
    return DraftReport(main, settings, candidates, plan, rows, chosen, verdict, time.perf_counter() - start)


def auto_candidates(main_path: str) -> list[str]:
    """Where ``--draft auto`` looks: the main model's directory and autotune's model cache."""
    from .catalog import cache_dir

    places = [Path(main_path).parent, cache_dir() / "models"]
    return [str(p) for p in dict.fromkeys(places) if p.is_dir() and any(p.glob("*.gguf"))]


def search_stage(config: dict[str, Any], choice: str, hw: Hardware, plan: Plan = Plan(),
                 on_run: Callable[[str, str, Measurement], None] | None = None) -> tuple[dict[str, Any], DraftReport | None]:
    """``search --draft auto|PATH``: after the main settings are tuned, measure drafts with exactly those
    settings and return the config with the recommended draft settings (unchanged when none pays) and
    the draft report under ``"draft"``."""
    from .export import settings_of

    main_path = config["model"]["path"]
    items = auto_candidates(main_path) if choice == "auto" else [choice]
    if not items:
        return {**config, "draft": {"recommendation": {"use_draft": False,
                                                       "verdict": "No draft: no GGUF files next to the model or in the cache."}}}, None
    try:
        report = evaluate(main_path, items, settings_of(config), hw, plan, on_run,
                          max_drafts=2 if choice == "auto" else None)
    except DraftError as e:
        return {**config, "draft": {"recommendation": {"use_draft": False, "verdict": f"No draft: {e}."}}}, None
    return {**config, "settings": report.recommended.to_dict(), "draft": report.to_dict()}, report


def command(main_path: str, items: Sequence[str], settings: Settings, pins: dict[str, Any], hw: Hardware,
            plan: Plan | None, on_verdict: Callable[[Any], None] = lambda v: None,
            on_run: Callable[[str, str, Measurement], None] | None = None) -> DraftReport:
    """``autotune draft``: the user's pins over ``settings``, the engine self-check with them (its switch pinned,
    where one is needed), then ``evaluate``. With no ``plan`` nothing runs: compatibility and memory only."""
    from . import health

    settings = settings.replace(**pins)
    if plan is not None:
        verdict = health.check(main_path, settings, hw, pinned=frozenset(pins), timeout=plan.timeout)
        on_verdict(verdict)
        settings = settings.replace(**verdict.pins)
    return evaluate(main_path, items, settings, hw, plan, on_run=on_run)
