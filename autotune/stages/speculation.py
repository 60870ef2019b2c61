"""Speculative decoding as llama-server does it: every ``--spec-type`` kind that applies to a model, searched and
then measured side by side with no speculation, on three kinds of work.

Why in llama-server: that is where speculation is deployed, natively (llama-cpp-python's ``Llama`` drafts in
Python, so its timings would say nothing about what a user runs). Why three kinds of work: acceptance is a
property of the text. The n-gram kinds draft from what the conversation already holds, so they pay where a
reply repeats its prompt (an edit) and cost little elsewhere; a draft model pays where it predicts the main
model well (code more than prose). "No speculation" is a valid answer, and the usual one on a small CPU.

The stage: which kinds apply (n-gram kinds always; draft-simple with each compatible draft that fits in memory
beside the main model; draft-mtp where the main GGUF carries multi-token-prediction layers; eagle3, dflash and
dspark drafters where one is given), a study (``loop.run``) over their parameters on fresh servers, each kind's
llama.cpp defaults first, then each kind's best per kind of work re-measured in rotated rounds of fresh
servers with no speculation among them. A speed-up is claimed only when the interquartile ranges are apart
(``Spread.versus``) and the tokens it accepted can explain it (on a noisy machine a kind that drafted nothing
can measure x1.15: that is the machine); whether the greedy reply is unchanged is checked against no speculation's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import memory
from ..engine import external
from ..facts.gguf_model import ModelFacts, read_facts
from ..facts.probe import Hardware
from ..search import loop, study
from ..search.config import TunedRecord
from ..search.progress import Reporter
from ..search.recommend import Spread
from ..search.storage import digest, study_name
from ..vocabulary.errors import AutotuneError
from ..vocabulary.knobs import BY_NAME, DRAFT_KINDS, NGRAM_KINDS, NGRAM_MAP_KINDS, Where
from ..vocabulary.metrics import metric
from ..vocabulary.settings import Settings
from . import draft as drafts

WORKLOADS = ("code", "prose", "edit")
# The parameters each kind is searched over (their domains are the knob table's).
PARAMS: dict[str, tuple[str, ...]] = {
    **{k: ("ngram_n", "ngram_m", "ngram_min_hits") for k in NGRAM_MAP_KINDS},
    "ngram-mod": ("ngram_mod_match", "ngram_mod_min", "ngram_mod_max"),
    "ngram-cache": (),  # llama.cpp drafts 8 tokens from its n-gram cache; nothing to set
    **{k: ("draft_max", "draft_p_min") for k in DRAFT_KINDS},
}
# What a drafter's GGUF architecture says it is for (llama.cpp reads it the same way).
DRAFTER_ARCHS = {"eagle3": "draft-eagle3", "dflash": "draft-dflash"}


class SpecError(AutotuneError):
    """A speculation request that cannot be carried out."""


def messages() -> dict[str, list[str]]:
    """The fixed mix shipped with the package: two user messages per kind of work."""
    return json.loads((resources.files("autotune") / "prompts" / "speculation.json").read_text())


@dataclass(frozen=True)
class Plan:
    """What to measure. The defaults: 2 messages per kind of work, 128 tokens each, a study of each kind's
    llama.cpp defaults and as many searched trials again as kinds with parameters, then 4 rotated rounds (4
    samples a side: the fewest a claimed win needs)."""

    workloads: tuple[str, ...] = WORKLOADS
    prompts: int = 2
    gen_tokens: int = 128
    trials: int | None = None  # None: each kind's defaults, then one more per kind with parameters to search
    rounds: int = 4
    target: str = "all"  # which kind of work the tuned config speculates for ("all": none made slower)
    timeout: float = 300.0
    gpu_budget: tuple[int, ...] | None = None  # MiB each GPU may hold in all (one value: every GPU); None: what is free
    drafts: tuple[str, ...] = ()  # draft GGUF files, or directories of them, to try beside the n-gram kinds
    ngram: bool = True  # measure the n-gram kinds
    storage: str | None = None  # the study's Optuna storage (None: ./studies)

    def __post_init__(self) -> None:
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown or not self.workloads:
            raise SpecError(f"kinds of work are {', '.join(WORKLOADS)}; got {', '.join(self.workloads) or 'none'}")
        if self.target not in ("all", *self.workloads):
            raise SpecError(f"--spec-for {self.target}: choose all or one of {', '.join(self.workloads)}")
        if not 1 <= self.prompts <= 2 or self.gen_tokens < 1 or self.rounds < 1 or (self.trials or 1) < 1:
            raise SpecError("--prompts is 1 or 2; --gen-tokens, --rounds and --trials at least 1")

    def to_dict(self) -> dict[str, Any]:
        """What is measured, as a study and ``autotune spec --json`` record it (not where or what with)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("drafts", "ngram", "storage")} | {
            "workloads": list(self.workloads)
        }


@dataclass(frozen=True)
class Arm:
    """One kind of speculation, with its draft model where it loads one."""

    kind: str
    draft: str | None = None
    draft_gpu_layers: int = 0

    @property
    def label(self) -> str:
        return self.kind + (f" ({Path(self.draft).name})" if self.draft else "")

    def settings(self, base: Settings, values: dict[str, Any] | None = None) -> Settings:
        """``base`` speculating this way: the knob table's defaults for the kind's parameters, then ``values``."""
        values = dict(values or {})
        if "ngram_mod_min" in values:  # llama.cpp wants n-min <= n-max
            values["ngram_mod_max"] = max(
                values.get("ngram_mod_max", BY_NAME["ngram_mod_max"].default), values["ngram_mod_min"]
            )
        drafting = {"draft_max": 3} if self.kind in DRAFT_KINDS else {}  # llama.cpp's --spec-draft-n-max default
        return base.replace(
            spec_type=self.kind,
            draft_model=self.draft,
            draft_gpu_layers=self.draft_gpu_layers,
            **{**drafting, **values},
        )


NONE = Arm("none")


def _choices(name: str, where: Where) -> tuple[Any, ...]:
    """A speculation parameter's values: the knob table gives each a fixed tuple of choices."""
    domain = BY_NAME[name].domain
    values = domain(where) if domain else None
    if not isinstance(values, tuple):
        raise TypeError(f"{name}: the knob table gives it no choices to search")
    return values


def has_mtp(facts: ModelFacts) -> bool:
    """Whether the GGUF carries multi-token-prediction layers (llama.cpp looks for ``nextn.eh_proj``)."""
    return any(".nextn.eh_proj" in t.name for t in facts.tensors)


def arms(
    main: ModelFacts, settings: Settings, hw: Hardware, candidates: Sequence[str], ngram: bool = True
) -> tuple[list[Arm], list[tuple[str, str]]]:
    """The kinds to measure for this model, and the ones left out with the reason. Drafts are checked with
    llama.cpp's own vocabulary rules and priced beside the main model first: one that does not fit is left out."""
    out = [NONE] + ([Arm(k) for k in NGRAM_KINDS] if ngram else [])
    skipped: list[tuple[str, str]] = []
    base = settings.unspeculated()
    if has_mtp(main):
        short = _mtp_shortfall(main, base, hw)
        if short > 0:
            skipped.append(("draft-mtp", f"its second context does not fit: {short / 2**20:,.0f} MiB short"))
        else:
            out.append(Arm("draft-mtp"))
    else:
        skipped.append(("draft-mtp", "the model has no multi-token-prediction layers"))
    found: set[str] = set()
    for path in candidates:
        c = drafts.check_candidate(main, path, base, hw)
        kind = DRAFTER_ARCHS.get(c.facts.architecture if c.facts else "", "draft-simple")
        if kind == "draft-dflash" and c.facts and any(t.name == "markov_w1.weight" for t in c.facts.tensors):
            kind = "draft-dspark"
        name = Path(path).name
        if kind == "draft-simple" and not c.compatible:
            skipped.append((f"draft-simple ({name})", c.reasons[0]))
            continue
        rows = [r for r in c.placements if r.fits]
        on_gpu = [r for r in rows if r.draft_gpu_layers > 0]
        if not rows:
            skipped.append((f"{kind} ({name})", "main and draft together do not fit in memory"))
            continue
        found.add(kind)
        out.append(Arm(kind, path, on_gpu[0].draft_gpu_layers if on_gpu else 0))
    for kind in ("draft-simple", "draft-eagle3", "draft-dflash", "draft-dspark"):
        if kind not in found and not any(s[0].startswith(kind) for s in skipped):
            skipped.append(
                (
                    kind,
                    "no "
                    + ("compatible draft model" if kind == "draft-simple" else f"{kind.removeprefix('draft-')} drafter")
                    + " among the candidates",
                )
            )
    return out, skipped


def _mtp_shortfall(main: ModelFacts, base: Settings, hw: Hardware) -> int:
    """Bytes missing for draft-mtp's second context on the main model: priced as another compute buffer and the
    multi-token-prediction layers' share of the KV cache, per device."""
    est = memory.estimate(main, base, hw)
    extra_kv = (est.kv_k + est.kv_v) // max(main.n_layer, 1)
    short = 0
    for d in est.devices:
        need = d.total + d.compute + (extra_kv if d.kv else 0)
        short = max(short, need - d.room())  # free less the margin, within a GPU budget
    return short


# ------------------------------------------------------------------------------------------ one run


def run_once(binary: Path, model: str, s: Settings, plan: Plan, texts: dict[str, list[str]]) -> dict[str, Any]:
    """One fresh server answering the plan's messages: per kind of work its replies, or the server's failure."""
    order = [(w, m) for w in plan.workloads for m in texts[w][: plan.prompts]]
    replies, error, load_s = external.speculative_replies(
        binary, model, s, [m for _, m in order], plan.gen_tokens, plan.timeout
    )
    if error:
        return {"ok": False, "error": error}
    per: dict[str, list[dict[str, Any]]] = {w: [] for w in plan.workloads}
    for (w, _), r in zip(order, replies, strict=False):
        per[w].append(r.to_dict())
    return {"ok": True, "load_s": load_s, "replies": per}


def decode_speed(replies: list[dict[str, Any]]) -> float:
    """Tokens per second over a kind of work's replies together (their total tokens over their total time)."""
    ms = sum(r["predicted_ms"] for r in replies)
    return 1000 * sum(r["predicted_n"] for r in replies) / ms if ms else 0.0


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values and min(values) > 0 else 0.0


# ---------------------------------------------------------------------------------------------- search


def _name(model: str, hw: Hardware, base: Settings, candidates: list[Arm], plan: Plan, build: str) -> str:
    """The speculation study's name (``storage.study_name``): the main settings, the kinds, the plan and the server
    build set it apart."""
    what = [base.to_dict(), [a.label for a in candidates], plan.workloads, plan.prompts, plan.gen_tokens, build]
    return study_name(model, hw, f"ctx{base.n_ctx}", "spec", digest(what))


def search(
    binary: Path,
    model: str,
    facts: ModelFacts,
    hw: Hardware,
    base: Settings,
    candidates: list[Arm],
    plan: Plan,
    storage: str | None = None,
    seed: int = 0,
    on_trial: Callable[[str], None] | None = None,
) -> optuna.Study:
    """The study over the kinds' parameters: each trial one fresh server on every kind of work, its value the
    geometric mean of their decode speeds. Each kind's llama.cpp defaults are its first trials; stored like a
    search (resumable; ``storage`` None: ./studies)."""
    texts = messages()
    where = Where(facts.n_layer, facts.moe_layers, facts.uses_swa, hw.logical_cores, bool(hw.offload_gpus))
    by_label = {a.label: a for a in candidates}
    searchable = [a.label for a in candidates if PARAMS.get(a.kind)]  # a kind with nothing to set is measured once
    build = external.Tool("llama-server", binary).build_key()

    def describe(st: optuna.Study) -> None:
        st.set_user_attr("stage", "speculation")
        st.set_user_attr("plan", plan.to_dict())
        for a in candidates:
            st.enqueue_trial({"arm": a.label}, user_attrs={"role": f"{a.label}, llama.cpp defaults"})

    st = study.open_named(
        _name(model, hw, base, candidates, plan, build),
        storage,
        seed,
        [metric("decode").direction],
        hw,
        {"name": f"llama-server ({binary})", "build": build},
        describe,
    )

    def step(trial: optuna.Trial) -> tuple[TrialState, list[float] | None]:
        enqueued = "role" in trial.user_attrs
        arm = by_label[
            trial.suggest_categorical("arm", list(by_label))
            if enqueued
            else trial.suggest_categorical("searched", searchable)
        ]
        values = (
            {} if enqueued else {n: trial.suggest_categorical(n, _choices(n, where)) for n in PARAMS.get(arm.kind, ())}
        )
        s = arm.settings(base, values)
        trial.set_user_attr("arm", arm.label)
        trial.set_user_attr("settings", s.to_dict())
        run = run_once(binary, model, s, plan, texts)
        trial.set_user_attr("run", run)
        if on_trial:
            on_trial(
                f"{arm.label} "
                + (_params(s) or "defaults")
                + ": "
                + (
                    ", ".join(f"{w} {decode_speed(run['replies'][w]):.1f} tok/s" for w in plan.workloads)
                    if run["ok"]
                    else run["error"][:80]
                )
            )
        if not run["ok"]:
            trial.set_user_attr("reason", run["error"])
            return TrialState.FAIL, None
        return TrialState.COMPLETE, [_geomean([decode_speed(run["replies"][w]) for w in plan.workloads])]

    total = plan.trials if plan.trials is not None else len(candidates) + len(searchable)
    total = total if searchable else min(total, len(candidates))
    done = len([t for t in st.get_trials(deepcopy=False) if t.state.is_finished()])
    if total > done:
        loop.run(st, total - done, step, patience=0)
    return st


def _params(s: Settings) -> str:
    """The kind's parameters, short ("n=4 m=16 hits=1")."""
    short = {
        "ngram_n": "n",
        "ngram_m": "m",
        "ngram_min_hits": "hits",
        "ngram_mod_match": "match",
        "ngram_mod_min": "min",
        "ngram_mod_max": "max",
        "draft_max": "n_max",
        "draft_p_min": "p_min",
    }
    return " ".join(f"{short[n]}={getattr(s, n):g}" for n in PARAMS.get(s.spec_type, ()))


def finalists(st: optuna.Study, candidates: list[Arm], plan: Plan) -> list[tuple[str, Settings]]:
    """Per kind, its best settings for each kind of work (often one for all): what the rounds re-measure,
    no speculation first."""
    out: list[tuple[str, Settings]] = []
    trials = [t for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.user_attrs.get("run")]
    for arm in candidates:
        mine = [t for t in trials if t.user_attrs.get("arm") == arm.label]
        if not mine and arm is NONE:
            out.append(
                (
                    arm.label,
                    arm.settings(Settings.from_dict(trials[0].user_attrs["settings"]))
                    if trials
                    else arm.settings(Settings()),
                )
            )
        for w in plan.workloads:
            if not mine:
                break
            best = max(mine, key=lambda t: decode_speed(t.user_attrs["run"]["replies"][w]))
            s = Settings.from_dict(best.user_attrs["settings"])
            if all(s != other for _, other in out):
                out.append((f"{arm.label} {_params(s)}".strip(), s))
    return out


# ------------------------------------------------------------------------------------- side by side


@dataclass
class Finalist:
    label: str
    settings: Settings
    runs: list[dict[str, Any]] = field(default_factory=list)  # one per round, in round order

    def speeds(self, w: str) -> list[float | None]:
        return [decode_speed(r["replies"][w]) if r["ok"] else None for r in self.runs]


def rounds(
    binary: Path,
    model: str,
    finals: list[tuple[str, Settings]],
    plan: Plan,
    on_run: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[Finalist]:
    """``plan.rounds`` rounds of fresh servers, every finalist once per round, the order rotated."""
    texts = messages()
    out = [Finalist(label, s) for label, s in finals]
    for r in range(plan.rounds):
        k = r % len(out)
        for f in out[k:] + out[:k]:
            run = run_once(binary, model, f.settings, plan, texts)
            f.runs.append(run)
            if on_run:
                on_run(f.label, run)
    return out


def summarize(finals: list[Finalist], plan: Plan) -> list[dict[str, Any]]:
    """Per finalist and kind of work: decode speed (per round: every reply's tokens over their time), speed-up
    over no speculation (per round, against the same round's), acceptance, accepted tokens per verification
    step, whether every greedy reply equals no speculation's, and how its spread compares: "better" only where
    the speed-up's lower quartile is within what its accepted tokens could save (``ceiling``)."""
    none = finals[0]
    rows = []
    for f in finals:
        row: dict[str, Any] = {
            "label": f.label,
            "spec_type": f.settings.spec_type,
            "settings": f.settings.to_dict(),
            "failures": [r["error"] for r in f.runs if not r["ok"]][:2],
            "workloads": {},
        }
        for w in plan.workloads:
            mine, theirs = f.speeds(w), none.speeds(w)
            speeds = [v for v in mine if v is not None]
            ratios = [a / b for a, b in zip(mine, theirs, strict=False) if a and b]
            replies = [rep for r in f.runs if r["ok"] for rep in r["replies"][w]]
            drafted = sum(rep["draft_n"] for rep in replies)
            accepted = sum(rep["accepted"] for rep in replies)
            steps = sum(
                rep["accepted"] / (rep["mean_len"] - 1)
                for rep in replies
                if rep.get("mean_len") and rep["mean_len"] > 1
            )
            sp, base = Spread.of(speeds), Spread.of([v for v in theirs if v is not None])
            speedup = Spread.of(ratios) if ratios else None
            versus, ceiling = ("same", 1.0) if f is none else (sp.versus(base), _ceiling(replies))
            doubt = ""
            if versus == "better" and (not accepted or (speedup and ceiling and speedup.q25 > ceiling)):
                # each accepted token saves at most one decode step: beyond that it is the machine, not speculation
                versus, doubt = (
                    "same",
                    (
                        f"faster than its {accepted} accepted tokens allow "
                        f"(x{ceiling or 1:.2f} at most): the machine's noise"
                    ),
                )
            reference = [rep["tokens"] for rep in next((r["replies"][w] for r in none.runs if r["ok"]), [])]
            unchanged = all([rep["tokens"] for rep in r["replies"][w]] == reference for r in f.runs if r["ok"])
            row["workloads"][w] = {
                "decode": sp.to_dict(),
                "samples": speeds,
                "speedup": speedup.to_dict() if speedup else None,
                "versus": versus,
                "ceiling": ceiling,
                "doubt": doubt,
                "drafted": drafted,
                "accepted": accepted,
                "acceptance": accepted / drafted if drafted else None,
                "accepted_per_step": accepted / steps if steps else (0.0 if drafted else None),
                "unchanged": bool(reference) and unchanged,
            }
        rows.append(row)
    return rows


def _ceiling(replies: list[dict[str, Any]]) -> float | None:
    """The most speculation can have gained: every accepted token one decode step saved, verifying free (None:
    nothing generated to tell)."""
    generated = sum(rep["predicted_n"] for rep in replies)
    accepted = sum(rep["accepted"] for rep in replies)
    return generated / (generated - accepted) if generated > accepted else None


def verdicts(rows: list[dict[str, Any]], plan: Plan) -> dict[str, str]:
    """One line per kind of work: the fastest speculation beyond the noise, or "no speculation"."""
    out = {}
    for w in plan.workloads:
        wins = [r for r in rows[1:] if r["workloads"][w]["versus"] == "better"]
        if wins:
            best = max(wins, key=lambda r: r["workloads"][w]["speedup"]["median"])
            e = best["workloads"][w]
            out[w] = (
                f"{w}: speculate with {best['label']}: decode x{e['speedup']['median']:.2f} "
                f"(x{e['speedup']['q25']:.2f}-{e['speedup']['q75']:.2f}), acceptance {e['acceptance'] or 0:.0%}"
                + ("" if e["unchanged"] else "; its greedy reply differs from no speculation's")
            )
            continue
        tried = [r for r in rows[1:] if r["workloads"][w]["speedup"]]
        if not tried:
            out[w] = f"{w}: no speculation (no kind of speculation ran)"
            continue
        best = max(tried, key=lambda r: r["workloads"][w]["speedup"]["median"])
        e = best["workloads"][w]
        how = "slower beyond the noise" if e["versus"] == "worse" else e["doubt"] or "within the noise"
        n = min(e["decode"]["n"], rows[0]["workloads"][w]["decode"]["n"])
        out[w] = (
            f"{w}: no speculation; the best, {best['label']}, is x{e['speedup']['median']:.2f} ({how}"
            + (f"; {n} rounds a side, a win needs 4" if n < 4 else "")
            + ")"
        )
    return out


def choose(rows: list[dict[str, Any]], plan: Plan) -> dict[str, Any] | None:
    """The one speculation a tuned config carries (a server has one): for ``plan.target`` its winner; for "all" the
    finalist faster beyond the noise on some kind of work and slower on none, by the geometric mean of its
    speed-ups. None: no speculation."""
    works = plan.workloads if plan.target == "all" else (plan.target,)

    def gain(r: dict[str, Any]) -> float:
        return _geomean([r["workloads"][w]["speedup"]["median"] for w in works if r["workloads"][w]["speedup"]])

    ok = [
        r
        for r in rows[1:]
        if any(r["workloads"][w]["versus"] == "better" for w in works)
        and not any(r["workloads"][w]["versus"] == "worse" for w in works)
    ]
    return max(ok, key=gain) if ok else None


# ------------------------------------------------------------------------------------------- the stage


@dataclass
class SpecReport:
    model: str
    settings: Settings  # the main model's, every finalist's base
    arms: list[Arm]
    skipped: list[tuple[str, str]]
    plan: Plan
    trials: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    verdicts: dict[str, str]
    chosen: dict[str, Any] | None
    wall_s: float

    @property
    def recommended(self) -> Settings:
        if self.chosen is None:
            return self.settings.unspeculated()
        return Settings.from_dict(self.chosen["settings"])

    @property
    def verdict(self) -> str:
        if self.chosen is None:
            return "No speculation: " + "; ".join(self.verdicts.values())
        return f"Speculate with {self.chosen['label']} (for {self.plan.target} work): " + "; ".join(
            self.verdicts.values()
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON shape of ``autotune spec --json`` and a tuned config's ``"speculation"`` (keys only added)."""
        return {
            "model": self.model,
            "settings": self.settings.to_dict(),
            "kinds": [a.label for a in self.arms],
            "skipped": [{"kind": k, "why": w} for k, w in self.skipped],
            "plan": self.plan.to_dict(),
            "trials": self.trials,
            "results": self.rows,
            "verdicts": self.verdicts,
            "recommendation": {
                "speculate": self.chosen is not None,
                "label": self.chosen["label"] if self.chosen else "none",
                "settings": self.recommended.to_dict(),
                "verdict": self.verdict,
            },
            "wall_s": self.wall_s,
            "arms": [dataclasses.asdict(a) for a in self.arms],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpecReport:
        """A saved report back (a tuned config's ``"speculation"``). Reports saved before ``arms`` was written
        name their kinds only: each comes back as its kind with the draft file's name."""
        arms = [Arm(**a) for a in data["arms"]] if "arms" in data else [_arm(label) for label in data["kinds"]]
        plan = dict(data["plan"], workloads=tuple(data["plan"]["workloads"]))
        if plan.get("gpu_budget") is not None:
            plan["gpu_budget"] = tuple(plan["gpu_budget"])
        picked = data["recommendation"]
        chosen = (
            next((r for r in data["results"] if r["label"] == picked["label"]), None) if picked["speculate"] else None
        )
        return cls(
            data["model"],
            Settings.from_dict(data["settings"]),
            arms,
            [(s["kind"], s["why"]) for s in data["skipped"]],
            Plan(**plan),
            data["trials"],
            data["results"],
            data["verdicts"],
            chosen,
            data["wall_s"],
        )


def _arm(label: str) -> Arm:
    """An ``Arm`` from its label ("kind" or "kind (draft.gguf)")."""
    kind, _, draft = label.partition(" (")
    return Arm(kind, draft.rstrip(")") or None)


def evaluate(
    model: str, settings: Settings, hw: Hardware, plan: Plan, reporter: Reporter, server: external.Tool
) -> SpecReport:
    """The whole stage for ``model`` with the main ``settings``, in ``server`` (a llama-server): which kinds
    apply, the study, the rounds, the verdicts and the one speculation a config carries."""
    start = time.perf_counter()
    facts = read_facts(model)
    base = settings.unspeculated()
    binary, say = server.path, reporter.note
    candidates_arms, skipped = arms(
        facts, base, hw, drafts.candidate_paths(list(plan.drafts), model) if plan.drafts else [], plan.ngram
    )
    st = search(
        binary,
        model,
        facts,
        hw,
        base,
        candidates_arms,
        plan,
        plan.storage,
        on_trial=lambda line: say(f"speculation study, {line}"),
    )
    trials = [
        {
            "number": t.number,
            "arm": t.user_attrs.get("arm"),
            "state": t.state.name,
            "settings": t.user_attrs.get("settings"),
            "value": t.value if t.state == TrialState.COMPLETE else None,
            "reason": t.user_attrs.get("reason", ""),
        }
        for t in st.get_trials(deepcopy=False)
    ]
    finals = finalists(st, candidates_arms, plan)
    measured = rounds(
        binary,
        model,
        finals,
        plan,
        on_run=lambda label, run: say(
            f"speculation rounds, {label}: "
            + (
                ", ".join(f"{w} {decode_speed(run['replies'][w]):.1f}" for w in plan.workloads)
                if run["ok"]
                else run["error"][:80]
            )
        ),
    )
    rows = summarize(measured, plan)
    return SpecReport(
        model,
        base,
        candidates_arms,
        skipped,
        plan,
        trials,
        rows,
        verdicts(rows, plan),
        choose(rows, plan),
        time.perf_counter() - start,
    )


def candidates_for(choice: str, model: str) -> list[str]:
    """``--spec auto|ngram|PATH``: the draft files to try beside the n-gram kinds."""
    if choice == "ngram":
        return []
    if choice == "auto":
        return drafts.auto_candidates(model)
    return [choice]


def search_stage(
    config: TunedRecord, choice: str, hw: Hardware, plan: Plan, reporter: Reporter, server: external.Tool
) -> tuple[TunedRecord, SpecReport]:
    """``search --spec``: after the main settings are tuned, the stage with exactly those settings; the config
    carries the chosen speculation (none where nothing pays) and the report under ``"speculation"``."""
    model = config.model["path"]
    plan = dataclasses.replace(plan, drafts=tuple(candidates_for(choice, model)), ngram=True)
    try:
        report = evaluate(model, config.settings, hw, plan, reporter, server)
    except drafts.DraftError as e:
        raise SpecError(str(e)) from None
    return dataclasses.replace(
        config, settings=report.recommended, evidence={**config.evidence, "speculation": report.to_json()}
    ), report
