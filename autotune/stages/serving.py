"""Serving: tune llama-server for N concurrent users, each trial measured under a real load (``serve-tune``).

A trial starts llama-server with the trial's settings (``-np`` slots of the user's context each, threads,
batch sizes, flash attention and cache types, a unified or per-slot KV cache) on a loopback port and drives
it with ``loadgen``: N users, the shipped request mix, a fixed number of requests and a hard time limit.
The objective is the aggregate generated tokens per second; the user's latency bounds (p95 time to first
token, each user's decode speed) and every request answering in full are Optuna constraints. Before any
trial, the memory model decides how many slots of the user's context fit; the same K/V quality guard as the
search keeps caches that change the outputs out. The best feasible trials are then measured again, side by
side with llama-server's own defaults under the same load, in rotated rounds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import memory
from ..engine import bundled, external, loadgen
from ..engine.base import GpuPeak, prompt_text
from ..facts.gguf_model import ModelFacts, read_facts
from ..facts.probe import Hardware, probe
from ..search import health, kvgate, loop, request, space, storage, study
from ..search.progress import Reporter
from ..search.recommend import Spread
from ..vocabulary.errors import AutotuneError, ModelError, SettingsError
from ..vocabulary.flags import knob_flags, server_flags
from ..vocabulary.knobs import NGRAM_KINDS
from ..vocabulary.metrics import metric
from ..vocabulary.settings import Settings


@dataclass(frozen=True)
class ServeOptions:
    users: int = 4
    ctx_per_user: int = 2048
    max_ttft: float | None = None  # seconds, the p95 time to first token a trial may not exceed
    min_user_tps: float | None = None  # the median user's decode tok/s a trial may not fall below
    trials: int = 12
    requests_per_user: int = 2  # the load: users x this many requests (at least 4)
    time_limit: float = 180.0  # seconds for one load, whatever is still in flight
    rounds: int = 4  # side-by-side rounds of the best trials and llama-server's defaults
    top_k: int = 2
    storage: str | None = None
    seed: int = 0
    kv_quality: str = "strict"
    spec: bool = False  # also search llama-server's n-gram speculation per slot (it can cost batching)
    gpu_budget: tuple[int, ...] | None = None  # MiB each GPU may hold in all (one value: every GPU); None: what is free

    @property
    def requests(self) -> int:
        return max(4, self.users * self.requests_per_user)

    def __post_init__(self) -> None:
        """SettingsError (one line, with the flag's name) for a bound that cannot hold."""
        for name, low in (("users", 1), ("ctx_per_user", 64), ("trials", 1), ("rounds", 2), ("requests_per_user", 1)):
            if getattr(self, name) < low:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(self, name)})")
        for name in ("max_ttft", "min_user_tps", "time_limit"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise SettingsError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")


@dataclass
class Served:
    """One configuration under one load: the client's view and the server's peak memory."""

    label: str
    flags: list[str]
    ok: bool
    error: str = ""
    load: dict[str, Any] = field(default_factory=dict)  # loadgen.LoadResult.summary()
    peak_rss: int = 0
    wall_s: float = 0.0
    gpu_peaks: list[GpuPeak] = field(default_factory=list)  # each GPU's peak while the server ran (NVML)

    @property
    def throughput(self) -> float:
        return float(self.load.get("throughput") or 0.0)


def slot_choices(facts: ModelFacts, hw: Hardware, base: Settings, users: int, ctx_per_user: int) -> tuple[int, ...]:
    """Slot counts worth trying (powers of two up to the users, and the users): those the memory model fits
    with ``ctx_per_user`` tokens each. Empty when not even one fits."""
    wanted = sorted({p for p in (1, 2, 4, 8, 16, 32, 64, 128) if p < users} | {users})
    fit = []
    for p in wanted:
        try:
            ok = memory.estimate(facts, base.replace(n_parallel=p, n_ctx=p * ctx_per_user), hw).fits
        except ModelError:  # no memory model for this architecture: the run will tell
            ok = True
        if ok:
            fit.append(p)
    return tuple(fit)


def serving_space(sp: space.SearchSpace, slots: tuple[int, ...], spec: bool = False) -> space.SearchSpace:
    """The search's space for serving: mmap and mlock do not change a running server's speed; slots and a
    unified KV cache do. With ``spec``, each n-gram speculation kind (its llama.cpp defaults) or none: each
    slot drafts for itself, which one user's decode gains and a full batch may pay for."""
    params = {k: v for k, v in sp.params.items() if k not in ("use_mmap", "use_mlock")}
    params["n_parallel"] = slots
    params["kv_unified"] = (True, False)
    if spec:
        params["spec_type"] = ("none", *NGRAM_KINDS)
    return space.SearchSpace(sp.base, params, dict(sp.int_ranges))


def sized(s: Settings, ctx_per_user: int) -> Settings:
    """``s`` with the context every slot's ``ctx_per_user`` tokens need."""
    return s.replace(n_ctx=s.n_parallel * ctx_per_user)


def measure(
    binary: Path,
    model: str,
    flags: list[str],
    users: int,
    n_requests: int,
    time_limit: float,
    label: str = "",
    timeout: float = 120.0,
) -> Served:
    """Start llama-server with ``flags`` on a free loopback port, warm it up with one short request, drive it
    with the load, stop it. Never raises for a server that dies or never comes up."""

    def drive(url: str) -> loadgen.LoadResult:
        text = prompt_text("code") + prompt_text("prose")
        tokens = external.post_json(url + "/tokenize", {"content": text})["tokens"]
        warm = loadgen.run(url, [loadgen.Request(tokens[:16], 4)], users=1, time_limit=timeout)
        if warm.failed:
            raise ValueError(f"its warm-up request failed: {warm.done[0].error if warm.done else 'not sent'}")
        return loadgen.run(url, loadgen.requests_for(tokens, n_requests), users, time_limit)

    srv, result, error, _ = external.serve(binary, flags, timeout, drive)
    peak, wall, gpus = srv.rss.stop(), time.perf_counter() - srv.start, srv.gpu_peaks
    if result is None or srv.died is not None:  # a server that died under the load failed it, whatever was answered
        return Served(label, flags, False, srv.failure(error or "stopped"), peak_rss=peak, wall_s=wall, gpu_peaks=gpus)
    return Served(label, flags, True, load=result.summary(), peak_rss=peak, wall_s=wall, gpu_peaks=gpus)


def constraints(load: dict[str, Any], opts: ServeOptions) -> dict[str, float]:
    """Optuna constraint values (<= 0: feasible): every request answered in full, and the user's bounds."""
    out = {"failed": float(load["failed"] + load["truncated"])}
    if opts.max_ttft is not None:
        p95 = load.get("ttft_p95")
        out["ttft_p95"] = (p95 - opts.max_ttft) if p95 is not None else 1e9
    if opts.min_user_tps is not None:
        tps = load.get("user_tps")
        out["user_tps"] = (opts.min_user_tps - tps) if tps is not None else 1e9
    return out


def feasible(t: optuna.trial.FrozenTrial) -> bool:
    return t.state == TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values())


def study_name(model: str, facts: ModelFacts, hw: Hardware, opts: ServeOptions, binary: Path) -> str:
    """The serving study's name (``storage.study_name``): the load, the bounds and the server build set it apart."""
    bounds = f"ttft{opts.max_ttft}-utps{opts.min_user_tps}"
    return storage.study_name(
        model,
        hw,
        "serve",
        f"u{opts.users}",
        f"c{opts.ctx_per_user}",
        f"r{opts.requests}",
        bounds,
        *(["spec"] if opts.spec else []),
        external.Tool("llama-server", binary).build_key(),
    )


def defaults_flags(model: str, forced: dict[str, Any]) -> tuple[str, list[str]]:
    """llama-server as a user starts it, with only the model (and the switch the self-check pinned)."""
    switch = knob_flags("use_extra_bufts", forced.get("use_extra_bufts", True), "server")
    return "llama-server defaults" + (f" with {' '.join(switch)}" if switch else ""), ["-m", model, *switch]


@dataclass
class ServeResult:
    study_name: str
    chosen: str  # the label of the recommended configuration
    settings: Settings | None  # None: llama-server's defaults are kept
    command: list[str]  # the recommended llama-server flags (no host or port)
    side_by_side: dict[str, list[dict[str, Any]]]  # label -> one load summary per round
    verdict: str
    supported: bool
    slots: tuple[int, ...]
    forced: dict[str, Any]
    trials: list[dict[str, Any]]

    def spread(self, label: str, key: str = "throughput") -> Spread:
        return Spread.of([r[key] for r in self.side_by_side[label] if r.get(key) is not None])

    def to_json(self) -> dict[str, Any]:
        """What ``serve-tune --out`` saves and the serving bench keeps per model and user count."""
        return {
            "study": self.study_name,
            "chosen": self.chosen,
            "command": self.command,
            "verdict": self.verdict,
            "supported": self.supported,
            "slots": list(self.slots),
            "forced": self.forced,
            "settings": self.settings.to_dict() if self.settings else None,
            "side_by_side": self.side_by_side,
            "trials": self.trials,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServeResult:
        """A saved result back (other keys beside it, such as the bench's model and users, are left out)."""
        settings = Settings.from_dict(data["settings"]) if data.get("settings") else None
        return cls(
            data["study"],
            data["chosen"],
            settings,
            list(data["command"]),
            data["side_by_side"],
            data["verdict"],
            data["supported"],
            tuple(data["slots"]),
            data["forced"],
            data["trials"],
        )


def tune(model: str, opts: ServeOptions, reporter: Reporter, server: external.Tool) -> ServeResult:
    """The serving study on ``server`` (a llama-server), then the side-by-side with llama-server's defaults."""
    facts, binary, say = read_facts(model), server.path, reporter.note
    hw = probe(bundled, measure_bandwidth=False).with_gpu_budget(opts.gpu_budget)
    base = space.build_space(hw, facts, opts.ctx_per_user)
    verdict = health.check(model, base.base, hw, server, timeout=300)
    forced = dict(verdict.pins)
    if forced:
        say(verdict.line())
    sp = space.build_space(hw, facts, opts.ctx_per_user, forced)
    slots = slot_choices(facts, hw, sp.base, opts.users, opts.ctx_per_user)
    if not slots:
        raise AutotuneError(
            f"not one slot of {opts.ctx_per_user:,} tokens fits this machine (try a smaller --ctx-per-user)"
        )
    say(f"slots that fit {opts.ctx_per_user:,} tokens each: {', '.join(map(str, slots))}")
    quality_req = request.StudyRequest(model_path=model, facts=facts, hw=hw, space=sp)
    st = study.open_named(
        study_name(model, facts, hw, opts, binary),
        opts.storage,
        opts.seed,
        [metric("throughput").direction],
        hw,
        {"name": server.name, "build": server.build_key()},
        lambda new: new.set_user_attr("serving", {"users": opts.users, "ctx_per_user": opts.ctx_per_user}),
    )
    sp, quality = kvgate.kv_quality(st, quality_req, opts.kv_quality)
    excluded = quality.excluded()
    if excluded:
        say(f"K/V quality guard ({opts.kv_quality}): {', '.join(excluded)} change the outputs too much: not searched")
    sspace = serving_space(sp, slots, opts.spec)
    if not st.trials:  # the first trial: every user a slot, flash attention on, one shared cache
        first = sized(sp.base.replace(n_parallel=max(slots), flash_attn=True, kv_unified=True), opts.ctx_per_user)
        st.enqueue_trial(sspace.params_of(first))

    def step(trial: optuna.Trial) -> tuple[TrialState, list[float] | None]:
        s = sized(sspace.suggest(trial), opts.ctx_per_user)
        trial.set_user_attr("settings", s.to_dict())
        problems = s.problems(hw.can_offload)
        if problems:
            trial.set_user_attr("reason", problems[0])
            return TrialState.PRUNED, None
        flags = server_flags(s, model, external.moe_layers(model, s))
        served = measure(binary, model, flags, opts.users, opts.requests, opts.time_limit, f"trial {trial.number}")
        trial.set_user_attr("served", dataclasses.asdict(served))
        if not served.ok:
            trial.set_user_attr("reason", served.error)
            return TrialState.PRUNED, None
        broke = loop.over_budget(served.gpu_peaks, sum(g.peak for g in served.gpu_peaks) or None, hw)
        if broke:  # the server ran, but beyond what the user lets it have of the GPU
            trial.set_user_attr("reason", broke)
            return TrialState.FAIL, None
        for key, value in constraints(served.load, opts).items():
            trial.set_constraint(key, value)
        say(
            f"trial {trial.number}: {served.throughput:.1f} tok/s all users, p95 TTFT "
            f"{served.load['ttft_p95'] or 0:.2f} s, user {served.load['user_tps'] or 0:.1f} tok/s "
            f"({describe(s)})"
        )
        return TrialState.COMPLETE, [served.throughput]

    remaining = opts.trials - len([t for t in st.trials if t.state.is_finished()])
    if remaining > 0:  # the search's loop: heartbeats, a tuner's orphans, the patience stop
        loop.run(st, remaining, step)
    return _side_by_side(st, model, binary, opts, forced, slots, say)


def describe(s: Settings) -> str:
    cache = f"{s.type_k}/{s.type_v}"
    return (
        f"-np {s.n_parallel}{' unified' if s.kv_unified else ''}, -t {s.n_threads} -tb {s.n_threads_batch}, "
        f"-b {s.n_batch} -ub {s.n_ubatch}, FA {'on' if s.flash_attn else 'off'}, {cache}"
        + ("" if s.spec_type == "none" else f", --spec-type {s.spec_type}")
    )


def contenders(trials: list[optuna.trial.FrozenTrial], top_k: int) -> dict[str, Settings]:
    """The best ``top_k`` feasible trials' settings by label; a speculating one also without its speculation,
    so the side-by-side measures what speculation itself is worth at this many users."""
    good = sorted((t for t in trials if feasible(t)), key=lambda t: t.value or 0.0, reverse=True)
    out: dict[str, Settings] = {}
    for t in good[:top_k]:
        s = Settings.from_dict(t.user_attrs["settings"])
        out[f"trial {t.number}"] = s
        if s.spec_type != "none":
            out[f"trial {t.number} without speculation"] = s.unspeculated()
    return out


def _side_by_side(
    st: optuna.Study,
    model: str,
    binary: Path,
    opts: ServeOptions,
    forced: dict[str, Any],
    slots: tuple[int, ...],
    say: Callable[[str], None],
) -> ServeResult:
    settings_of = contenders(st.trials, opts.top_k)
    configs = {label: server_flags(s, model, external.moe_layers(model, s)) for label, s in settings_of.items()}
    base_label, base_flags = defaults_flags(model, forced)
    configs[base_label] = base_flags
    labels = list(configs)
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for r in range(opts.rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            served = measure(binary, model, configs[label], opts.users, opts.requests, opts.time_limit, label)
            rounds[label].append(
                {**served.load, "ok": served.ok, "error": served.error, "peak_rss": served.peak_rss}
                if served.ok
                else {"ok": False, "error": served.error, "throughput": None, "failed": opts.requests}
            )  # none of its requests answered
            say(
                f"side by side, round {r + 1}: {label}: "
                + (f"{served.throughput:.1f} tok/s" if served.ok else served.error)
            )
    result = ServeResult(
        st.study_name,
        base_label,
        None,
        base_flags,
        rounds,
        "",
        False,
        slots,
        forced,
        [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "feasible": feasible(t),
                "settings": t.user_attrs.get("settings"),
                "reason": t.user_attrs.get("reason"),
            }
            for t in st.trials
        ],
    )
    _decide(result, configs, settings_of, opts)
    return result


def _decide(
    result: ServeResult, configs: dict[str, list[str]], settings_of: dict[str, Settings], opts: ServeOptions
) -> None:
    """The best median throughput among the configs that ran every round within the user's bounds; a win over
    the defaults is claimed only when the interquartile ranges are apart."""
    base = result.chosen
    b = result.spread(base)

    def within_bounds(label: str) -> bool:
        rows = result.side_by_side[label]
        return all(r.get("ok") for r in rows) and all(max(constraints(r, opts).values()) <= 0 for r in rows)

    ran = [label for label in settings_of if within_bounds(label)]
    if not ran:
        result.verdict = (
            "No tuned configuration ran every side-by-side round within the bounds: keep llama-server's defaults."
        )
        return
    best = max(ran, key=lambda label: result.spread(label).median)
    x = result.spread(best)
    ratio = x.median / b.median if b.median else None
    if b.n == 0:
        result.verdict = f"llama-server's defaults did not run here; {best} serves {x.median:.1f} tok/s."
        supported = True
    elif x.versus(b) == "better":
        result.verdict = (
            f"{best} serves x{ratio:.2f} the aggregate throughput of {base} ({x.median:.1f} vs "
            f"{b.median:.1f} tok/s, interquartile ranges apart)."
        )
        supported = True
    else:
        result.verdict = (
            f"{best} measured x{ratio:.2f} of {base}'s throughput ({x.median:.1f} vs {b.median:.1f} "
            f"tok/s) but the spreads overlap: not a supported win; keep the defaults."
        )
        supported = False
    if b.n:  # what a user of each would feel, whatever decided it
        ttft, tps = result.spread(best, "ttft_p95").median, result.spread(best, "user_tps").median
        result.verdict += (
            f" p95 time to first token {ttft:.2f} vs {result.spread(base, 'ttft_p95').median:.2f} s; "
            f"the median user decodes {tps:.1f} vs {result.spread(base, 'user_tps').median:.1f} tok/s."
        )
    result.supported = supported
    if supported:
        result.chosen, result.settings, result.command = best, settings_of[best], configs[best]


def save(result: ServeResult, path: Path) -> None:
    path.write_text(json.dumps(result.to_json(), indent=1, default=str))
