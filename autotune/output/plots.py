"""Plots that answer the tuning questions at a glance: memory against context, speed against each knob,
the study itself, and speculative decoding.

Every function takes plain data (ModelFacts + Hardware, measurements, a Study, a config or draft report
dict) and returns a matplotlib Figure drawn on an Agg canvas and not registered with pyplot: nothing pops
up, nothing leaks in a long notebook, and the same call works from Python, the CLI and a notebook. A plot
that has nothing to show raises ``NoData`` with the reason, so a report can note it and go on.
"""

from __future__ import annotations

import math
import statistics
import textwrap
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib
import numpy as np
import optuna
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from .. import memory
from ..engine import Measurement
from ..facts.gguf_model import ModelFacts
from ..facts.probe import Hardware
from ..search.config import TunedRecord
from ..search.loop import completed
from ..stages.serving import ServeResult
from ..stages.speculation import SpecReport
from ..vocabulary import knobs as knob_table
from ..vocabulary.errors import AutotuneError
from ..vocabulary.metrics import FELT, OBJECTIVES, metric
from ..vocabulary.settings import KV_SHORTLIST, KV_TYPES, Settings, ggml_type

MIB = 2**20
GIB = 2**30
STACK = (
    ("weights", "weights (+ CPU repack)", "#4c72b0"),
    ("kv", "KV cache", "#dd8452"),
    ("compute", "compute buffer", "#55a868"),
    ("other", "output + fixed overhead", "#8c8c8c"),
)
PAIR_COLORS = ("#1f3b73", "#c0392b", "#7b3fa0", "#16a085", "#b7950b")
BROKEN_RATIO = 3.0  # a budget this many times above the largest footprint gets its own axis strip


class NoData(AutotuneError):
    """Not enough data for a plot (a study too small, nothing measured): the reason, for the caller to note."""


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _unit(nbytes: float) -> tuple[float, str]:
    return (GIB, "GiB") if nbytes >= 2 * GIB else (MIB, "MiB")


def _ctx_label(n: float) -> str:
    return f"{n / 1024:g}k" if n >= 1024 else f"{n:g}"


def _log2_ticks(ax: Axes, lo: int, hi: int) -> None:
    ax.set_xscale("log", base=2)
    ticks = [2**k for k in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]
    ax.set_xticks(ticks, [_ctx_label(t) for t in ticks])
    ax.minorticks_off()


# ------------------------------------------------------------------------------ memory against context


def _kv_ok(facts: ModelFacts, type_name: str) -> bool:
    """A quantized cache row must hold whole blocks of the head dimension (else the engine refuses it)."""
    from gguf import GGML_QUANT_SIZES

    block = GGML_QUANT_SIZES[ggml_type(type_name)][0]
    return facts.head_dim_k % block == 0 and facts.head_dim_v % block == 0


def contexts(limit: int, lo: int = 256, per_octave: int = 4) -> list[int]:
    """Context lengths from ``lo`` to ``limit``, evenly spaced on a log axis, each a multiple of 256."""
    n = max(1, int(math.log2(limit / lo) * per_octave))
    return sorted({max(256, round(lo * (limit / lo) ** (i / n) / 256) * 256) for i in range(n + 1)} | {limit})


def memory_vs_context(
    facts: ModelFacts,
    settings: Settings,
    hw: Hardware,
    kv_types: Sequence[str] = KV_SHORTLIST,
    ctx_limit: int | None = None,
) -> Figure:
    """Predicted memory per device against context length: the components stacked for ``settings``' K/V
    type, the total for each K/V type as a line, the device budget as a horizontal line and, per K/V type,
    the largest context that fits marked (up to the trained context, or ``ctx_limit``)."""
    limit = ctx_limit or max(facts.n_ctx_train or 131072, settings.n_ctx)
    s = settings.unspeculated()
    types = [t for t in dict.fromkeys([s.type_k, *kv_types]) if _kv_ok(facts, t)]
    pairs = [(s.type_k, s.type_v)] + [p for p in memory.cache_pairs(types, s.flash_attn) if p != (s.type_k, s.type_v)]
    best = {p: memory.max_ctx(facts, s.replace(type_k=p[0], type_v=p[1]), hw, limit=limit) for p in pairs}
    xs = sorted(set(contexts(limit)) | {n for n in best.values() if n} | {memory.pad(s.n_ctx, 256)})
    memory.prefetch(facts, [s.replace(n_ctx=n, type_k=p[0], type_v=p[1]) for p in pairs for n in xs], hw)  # one child
    series: dict[tuple[str, str], list[memory.MemoryEstimate]] = {
        p: [memory.estimate(facts, s.replace(n_ctx=n, type_k=p[0], type_v=p[1]), hw) for n in xs] for p in pairs
    }
    devices = [d.device for d in series[pairs[0]][0].devices]
    fig = _figure(max(11.0, 6.5 * len(devices)), 6.8)
    grid = fig.add_gridspec(2, len(devices), height_ratios=(1, 5))
    for col, dev in enumerate(devices):
        rows = {p: [e.device(dev) for e in es] for p, es in series.items()}
        top = max(1, max(d.total for ds in rows.values() for d in ds))
        budget, keep = rows[pairs[0]][0].budget, memory.margin(rows[pairs[0]][0].budget)
        scale, unit = _unit(max(top, budget if budget < BROKEN_RATIO * top else 0))
        broken = budget >= BROKEN_RATIO * top
        ax = fig.add_subplot(grid[1, col] if broken else grid[:, col])
        own = rows[pairs[0]]
        parts = {
            "weights": [d.weights + d.repack for d in own],
            "kv": [d.kv for d in own],
            "compute": [d.compute for d in own],
            "other": [d.output + d.overhead for d in own],
        }
        ax.stackplot(
            xs,
            *(np.array(parts[key]) / scale for key, _, _ in STACK),
            labels=[label for _, label, _ in STACK],
            colors=[c for _, _, c in STACK],
            alpha=0.45,
        )
        for i, p in enumerate(pairs):
            color = PAIR_COLORS[i % len(PAIR_COLORS)]
            ax.plot(
                xs,
                [d.total / scale for d in rows[p]],
                color=color,
                lw=2,
                ls="-" if i == 0 else "--",
                label=f"total, K {p[0]} / V {p[1]}",
            )
            n = best[p]
            if n:
                at = rows[p][xs.index(n)].total / scale
                why = " = trained context" if n == facts.n_ctx_train else " = plot limit" if n == limit else ""
                ax.plot(
                    [n],
                    [at],
                    marker="D",
                    ms=9,
                    color=color,
                    mec="white",
                    ls="none",
                    label=f"max context {p[0]}/{p[1]}: {n:,}{why}",
                )
                ax.axvline(n, color=color, ls=":", lw=1.2)
            else:
                ax.plot([], [], marker="D", color=color, ls="none", label=f"max context {p[0]}/{p[1]}: none fits")
        ax.axvline(
            memory.pad(s.n_ctx, 256),
            color="#555555",
            ls="-.",
            lw=1.2,
            label=f"configured context: {memory.pad(s.n_ctx, 256):,}",
        )
        budget_ax = ax
        if broken:  # the budget is far above the footprint: show it in a strip above a cut in the y axis
            budget_ax = fig.add_subplot(grid[0, col], sharex=ax)
            budget_ax.set_ylim((budget - keep) / scale * 0.97, budget / scale * 1.02)
            budget_ax.tick_params(labelbottom=False, bottom=False)
            budget_ax.spines["bottom"].set_visible(False)
            ax.spines["top"].set_visible(False)
            for a, y in ((budget_ax, 0), (ax, 1)):
                a.plot(
                    [0, 1],
                    [y, y],
                    transform=a.transAxes,
                    marker=[(-1, -0.5), (1, 0.5)],
                    ms=10,
                    ls="none",
                    color="k",
                    mew=1,
                    clip_on=False,
                )
            budget_ax.set_title(
                f"{dev}: memory against context (stacked: K {pairs[0][0]} / V {pairs[0][1]}; y axis "
                f"cut: the budget is {budget / top:,.0f}x the largest footprint)",
                fontsize=10,
            )
        else:
            ax.set_title(f"{dev}: memory against context (stacked: K {pairs[0][0]} / V {pairs[0][1]})", fontsize=10)
        budget_ax.axhline(
            budget / scale, color="black", lw=1.8, label=f"{dev} budget (free memory): {budget / scale:,.1f} {unit}"
        )
        budget_ax.axhline(
            (budget - keep) / scale,
            color="black",
            lw=1,
            ls="--",
            label=f"budget minus safety margin ({keep / scale:,.1f} {unit} kept free)",
        )
        ax.set_ylim(0, (top * 1.12 if broken else max(top, budget) * 1.05) / scale)
        _log2_ticks(ax, xs[0], xs[-1])
        ax.set_xlim(xs[0] / 1.1, xs[-1] * 1.1)
        if facts.n_ctx_train and facts.n_ctx_train < xs[-1]:
            ax.axvspan(facts.n_ctx_train, xs[-1] * 1.1, color="#e8e8e8", zorder=0, label="beyond the trained context")
        ax.set_xlabel("context length n_ctx (tokens, log scale)")
        ax.set_ylabel(f"predicted memory ({unit})")
        budget_ax.set_ylabel(unit if broken else f"predicted memory ({unit})")
        ax.grid(alpha=0.3)
        if col == len(devices) - 1:
            handles, labels = budget_ax.get_legend_handles_labels()
            if broken:
                more = ax.get_legend_handles_labels()
                handles, labels = more[0] + handles, more[1] + labels
            fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(
        f"{facts.name}: predicted memory against context (FA {'on' if s.flash_attn else 'off'}, "
        f"n_ubatch {s.n_ubatch}, GPU layers {s.n_gpu_layers})",
        fontsize=11,
    )
    return fig


def memory_vs_engine(rows: Sequence[dict[str, Any]]) -> Figure:
    """Prediction against the engine's no-allocation dry run (``search.oracle.verify`` rows) by context length:
    lines are predicted, hollow markers what the engine reported."""
    good = [r for r in rows if r.get("predicted") and r.get("engine")]
    if not good:
        raise NoData("no verify row with both a prediction and the engine's figures")
    good.sort(key=lambda r: r["settings"].n_ctx)
    xs = [r["settings"].n_ctx for r in good]
    scale, unit = _unit(max(r["engine"]["total"] for r in good))
    fig = _figure(11, 5)
    ax = fig.add_subplot()
    for i, key in enumerate(memory.COMPONENTS):
        color = PAIR_COLORS[i % len(PAIR_COLORS)]
        worst = max(abs(r["error_pct"][key]) for r in good)
        ax.plot(
            xs,
            [r["predicted"][key] / scale for r in good],
            color=color,
            lw=2,
            label=f"{key}: predicted (max error {worst:.2f} %)",
        )
        ax.plot(
            xs,
            [r["engine"][key] / scale for r in good],
            color=color,
            marker="o",
            mfc="none",
            ms=9,
            ls="none",
            label=f"{key}: engine dry run",
        )
    if len(set(xs)) > 1:
        _log2_ticks(ax, min(xs), max(xs))
    ax.set_xlabel("context length n_ctx (tokens, log scale)")
    ax.set_ylabel(f"memory ({unit})")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    s = good[0]["settings"]
    ax.set_title(
        f"predicted memory vs the engine's dry run (K {s.type_k} / V {s.type_v}, "
        f"FA {'on' if s.flash_attn else 'off'}, n_ubatch {s.n_ubatch})\n"
        "the CPU repack buffer and the fixed overhead are left out on both sides",
        fontsize=10,
    )
    return fig


# ------------------------------------------------------------------------------------ speed per knob

# (Settings field, axis label), from the knob table; "kv" is the K/V cache pair, one axis for two knobs.
KNOBS = (*tuple((k.name, k.label) for k in knob_table.KNOBS if k.plotted), ("kv", "K/V cache type"))
SAMPLES = {"decode": "decode_tps", "prefill": "prefill_tps"}  # a speed -> its Measurement samples
HIGHLIGHT_COLORS = {"recommended": "#d62728", "engine defaults": "#1f77b4"}
OTHER_COLORS = ("#2ca02c", "#9467bd", "#8c564b")


def knob_value(s: Settings, knob: str) -> Any:
    if knob == "kv":
        return f"{s.type_k}/{s.type_v}"
    value = getattr(s, knob)
    return ("on" if value else "off") if isinstance(value, bool) else value


def _order(values: set[Any]) -> list[Any]:
    def key(v: Any) -> Any:
        if isinstance(v, str) and "/" in v:
            return tuple(KV_TYPES.index(t) if t in KV_TYPES else 99 for t in v.split("/"))
        return (0 if v == "off" else 1) if v in ("on", "off") else v

    return sorted(values, key=key)


def _same(a: Settings, b: Settings) -> bool:
    return a.unspeculated() == b.unspeculated()


def _highlight_color(name: str, names: list[str]) -> str:
    return HIGHLIGHT_COLORS.get(name) or OTHER_COLORS[names.index(name) % len(OTHER_COLORS)]


def knobs(
    measurements: Sequence[Measurement],
    roofline_tps: float | None = None,
    highlight: dict[str, Settings] | None = None,
    title: str = "",
) -> Figure:
    """Measured decode and prefill speed against each knob that varied: every run at its knob value (runs
    sharing a value side by side), its repetitions as dots, min-max as a bar, the median as the marker.
    ``highlight`` colors the runs of named settings (the recommendation, the engine defaults); the roofline
    (memory-bandwidth limit of decode) is drawn where known."""
    ok = [m for m in measurements if m.ok and m.decode_tps]
    if not ok:
        raise NoData("no successful measurement to plot against the knobs")
    varied = [(k, label) for k, label in KNOBS if len({knob_value(m.settings, k) for m in ok}) > 1]
    fixed = [f"{k}={knob_value(ok[0].settings, k)}" for k, label in KNOBS if (k, label) not in varied]
    if not varied:
        raise NoData(f"all {len(ok)} measured runs used the same settings: no knob varied")
    highlight = highlight or {}
    fig = _figure(11, 2.3 * len(varied) + 1.2)
    axes = fig.subplots(len(varied), 2, squeeze=False, sharey="col")
    top = max(v for m in ok for v in m.decode_tps)
    for row, (knob, label) in enumerate(varied):
        values = _order({knob_value(m.settings, knob) for m in ok})
        for col, (speed, attr) in enumerate(SAMPLES.items()):
            ax = axes[row, col]
            seen: dict[Any, int] = {}
            group = {v: sum(knob_value(m.settings, knob) == v for m in ok) for v in values}
            for m in ok:
                v = knob_value(m.settings, knob)
                slot = seen.get(v, 0)
                seen[v] = slot + 1
                x = values.index(v) + (slot - (group[v] - 1) / 2) * min(0.6 / max(group[v] - 1, 1), 0.12)
                samples = getattr(m, attr)
                name = next((n for n, s in highlight.items() if _same(s, m.settings)), None)
                color = _highlight_color(name, list(highlight)) if name else "#555555"
                ax.plot([x, x], [min(samples), max(samples)], color=color, lw=1.2, alpha=0.8)
                ax.plot([x] * len(samples), samples, ls="none", marker=".", ms=4, color=color, alpha=0.6)
                ax.plot(
                    [x],
                    [statistics.median(samples)],
                    ls="none",
                    marker="*" if name else "o",
                    ms=11 if name else 5,
                    color=color,
                    label=name or "a trial (median, min-max, repetitions)",
                )
            ax.set_xticks(range(len(values)), [str(v) for v in values])
            ax.set_xlim(-0.6, len(values) - 0.4)
            ax.set_xlabel(label, fontsize=9)
            ax.set_ylabel(metric(speed).label, fontsize=9)
            ax.grid(alpha=0.3, axis="y")
            if speed == "decode" and roofline_tps and roofline_tps <= 1.5 * top:
                ax.axhline(
                    roofline_tps,
                    color="#d62728",
                    ls="--",
                    lw=1.2,
                    label=f"roofline (memory-bandwidth limit of decode): {roofline_tps:,.0f} tok/s",
                )
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=8)
    lines = [title] if title else []
    lines.append(
        f"measured speed against each knob ({len(ok)} runs; other knobs vary too: each panel is a marginal view)"
    )
    if fixed:
        lines.append(f"constant: {', '.join(fixed)}")
    if roofline_tps and roofline_tps > 1.5 * top:
        lines.append(
            f"decode roofline (memory-bandwidth limit) {roofline_tps:,.0f} tok/s is off this scale: "
            f"the best decode run reaches {top / roofline_tps:.0%} of it"
        )
    fig.suptitle("\n".join(lines), fontsize=10)
    return fig


def recommendation(config: TunedRecord) -> Figure:
    """The tuned config against the best baseline on its objective, from the config's re-measured samples:
    median bars, interquartile ranges, every sample, and the decode roofline; every other baseline re-measured
    beside them as a median and interquartile range (each metric is judged against its own best). When a
    baseline is the recommendation, the baselines stand alone."""
    rec = config.evidence.get("recommendation") or {}
    chosen, base = config.metrics, rec.get("baseline_metrics") or {}
    if not chosen.get("decode", {}).get("n"):
        raise NoData("the config holds no re-measured samples (no recommendation stage)")
    label = rec.get("chosen", "tuned")
    baseline = rec.get("baseline", "defaults")  # the best baseline that ran (the defaults with a switch, where
    # the defaults themselves crash on this machine)
    arms = [
        (
            f"engine {baseline}",
            "engine\n" + baseline.replace(" with ", "\nwith "),
            base,
            HIGHLIGHT_COLORS["engine defaults"],
        )
    ]
    # the other baselines re-measured beside it (medians and interquartile ranges; each metric has its own best)
    others = [
        r for r in rec.get("side_by_side") or [] if r["baseline"] and r["ran"] and r["label"] not in (baseline, label)
    ]
    for i, r in enumerate(others):
        arms.append(
            (
                r["label"],
                r["label"].replace(" with ", "\nwith "),
                {m: {**r[m], "samples": []} for m in FELT if r.get(m)},
                OTHER_COLORS[i % len(OTHER_COLORS)],
            )
        )
    if label != baseline:
        arms.append((f"recommended ({label})", "recommended", chosen, HIGHLIGHT_COLORS["recommended"]))
    fig = _figure(11, 5)
    axes = fig.subplots(1, 3)
    roof = (rec.get("roofline") or {}).get("limit_tps")
    for ax, panel in zip(axes, map(metric, FELT), strict=True):
        for i, (name, _, metrics, color) in enumerate(arms):
            m = metrics.get(panel.name) or {}
            if not m.get("n"):
                ax.text(i, 0, "failed", ha="center", va="bottom", color=color)
                continue
            ax.bar(i, m["median"], width=0.55, color=color, alpha=0.35, label=f"{name}: median")
            ax.errorbar(
                i,
                m["median"],
                yerr=[[m["median"] - m["q25"]], [m["q75"] - m["median"]]],
                color=color,
                capsize=8,
                lw=2.5,
                label=f"{name}: interquartile range",
            )
            ax.plot(
                np.full(len(m["samples"]), i) + np.linspace(-0.12, 0.12, len(m["samples"])),
                m["samples"],
                ls="none",
                marker="o",
                ms=4,
                color=color,
                label=f"{name}: samples",
            )
        if panel.name == "decode" and roof:
            ax.axhline(roof, color="#d62728", ls="--", lw=1.2, label=f"roofline {roof:,.0f} tok/s")
        ax.set_xticks(range(len(arms)), [tick for _, tick, _, _ in arms], fontsize=8 if len(arms) < 4 else 6)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_ylabel(panel.label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(panel.name + ("" if panel.higher_is_better else " (lower is better)"), fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4 if max(map(len, labels)) < 45 else 2, fontsize=8)
    objective = (config.evidence.get("study") or {}).get("objective", "")
    if label == baseline:
        head = f"the engine {baseline} are the recommendation ({objective}), re-measured"
    else:
        speed = rec.get("speedup")
        gain = f" x{speed:.2f}" if speed else ""
        verdict = "supported" if rec.get("supported") else "not a supported win"
        head = f"recommended vs engine {baseline}, re-measured side by side: {objective}{gain} ({verdict})"
    fig.suptitle(head + "\n" + textwrap.fill(rec.get("verdict", ""), 150), fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------- the study


def objective_name(study: optuna.Study) -> tuple[Callable[[FrozenTrial], float] | None, str]:
    """What the history and importances show: the study's own objective (target None, so Optuna keeps
    its direction and best-value line), or decode speed for a Pareto study."""
    objective = study.user_attrs.get("objective", "decode")
    if len(study.directions) > 1:
        return (lambda t: t.values[0]), "decode (tok/s, median of repetitions)"
    shown = metric(objective if objective in OBJECTIVES else "decode")
    return None, shown.label.replace(")", ", median of repetitions)")


@contextmanager
def _optuna_figure() -> Iterator[None]:
    """Optuna's matplotlib plots switch the global style and open pyplot figures: contain both (the
    figures stay usable once closed; closing only takes them off pyplot's list)."""
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    with matplotlib.rc_context():
        yield
    for num in set(plt.get_fignums()) - before:
        plt.close(num)


def _resized(ax: Axes, width: float, height: float) -> Figure:
    """The whole figure an Optuna plot drew ``ax`` on, at our size, laid out when drawn."""
    fig = ax.figure
    assert isinstance(fig, Figure)
    fig.set_size_inches(width, height)
    fig.set_layout_engine("tight")
    return fig


def _states(study: optuna.Study) -> dict[TrialState, list[FrozenTrial]]:
    return {
        s: study.get_trials(deepcopy=False, states=(s,))
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }


def history(study: optuna.Study) -> Figure:
    """Optuna's optimization history, with the pruned and failed trials marked along the bottom and their
    first reasons underneath."""
    target, name = objective_name(study)
    by = _states(study)
    if not by[TrialState.COMPLETE]:
        raise NoData(
            f"no completed trial in study {study.study_name} "
            f"({len(by[TrialState.PRUNED])} pruned, {len(by[TrialState.FAIL])} failed)"
        )
    with _optuna_figure():
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target=target, target_name=name)
    fig = _resized(ax, 9, 5.2)
    bottom, top = ax.get_ylim()
    for state, word, marker, color in (
        (TrialState.PRUNED, "pruned", "v", "#7f7f7f"),
        (TrialState.FAIL, "failed", "X", "#d62728"),
    ):
        trials = by[state]
        if trials:
            ax.plot(
                [t.number for t in trials],
                [bottom + 0.03 * (top - bottom)] * len(trials),
                ls="none",
                marker=marker,
                ms=10,
                color=color,
                label=f"{word} ({len(trials)} trials, no value)",
            )
    ax.set_ylim(bottom, top)
    ax.set_xlabel("trial number")
    ax.set_ylabel(name)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(
        f"optimization history: {len(by[TrialState.COMPLETE])} complete, {len(by[TrialState.PRUNED])} pruned, "
        f"{len(by[TrialState.FAIL])} failed",
        fontsize=10,
    )
    reasons = [
        f"#{t.number} {'pruned' if t.state == TrialState.PRUNED else 'failed'}: {t.user_attrs.get('reason', '?')}"
        for t in sorted(by[TrialState.PRUNED] + by[TrialState.FAIL], key=lambda t: t.number)
    ]
    if reasons:
        shown = [textwrap.shorten(r, 120) for r in reasons[:4]]
        if len(reasons) > 4:
            shown.append(f"... and {len(reasons) - 4} more")
        fig.text(0.01, 0.01, "\n".join(shown), fontsize=7, va="bottom", family="monospace")
        fig.set_layout_engine("tight", rect=(0, 0.035 * len(shown) + 0.01, 1, 1))
    return fig


def timeline(study: optuna.Study) -> Figure:
    """Optuna's timeline: every trial's wall-clock span colored by its state (complete, pruned, failed)."""
    if not any(t.state.is_finished() for t in study.get_trials(deepcopy=False)):
        raise NoData(f"no finished trial in study {study.study_name}")
    with _optuna_figure():
        ax = optuna.visualization.matplotlib.plot_timeline(study)
    ax.set_xlabel("wall-clock time")
    ax.set_ylabel("trial number")
    ax.set_title(f"trial timeline of {study.study_name}", fontsize=9)
    return _resized(ax, 9, 0.25 * len(study.trials) + 2.5)


def _negated_decode(t: FrozenTrial) -> float:
    """PED-ANOVA explains low target values: a Pareto study's decode (maximized) goes in negated."""
    return -t.values[0]


def importances(study: optuna.Study) -> Figure:
    """Optuna's parameter importances for the objective (decode for a Pareto study)."""
    target, name = objective_name(study)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = {p for p in {k for t in done for k in t.params} if len({repr(t.params.get(p)) for t in done}) > 1}
    if len(done) < 2 or not varied:
        raise NoData(
            f"parameter importances need at least 2 completed trials whose parameters differ "
            f"(study {study.study_name} has {len(done)} completed)"
        )
    try:
        with _optuna_figure(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "importances of low target values": negated below
            ax = optuna.visualization.matplotlib.plot_param_importances(
                study, target=None if target is None else _negated_decode, target_name=name
            )
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        raise NoData(f"parameter importances could not be computed: {e}") from None
    ax.set_xlabel("relative importance (PED-ANOVA; sums to 1)")
    ax.set_ylabel("search parameter")
    ax.set_title("", loc="left")
    ax.set_title(f"what moved {name}: {len(done)} completed trials", fontsize=10)
    return _resized(ax, 8, 0.45 * len(varied) + 2.2)


# name -> value of a measurement (its label and direction: the metrics table)
PARETO_AXES: dict[str, Callable[[Measurement], float]] = {
    "decode": lambda m: m.decode,
    "prefill": lambda m: m.prefill,
    "ttft": lambda m: m.ttft,
    "memory": lambda m: (m.peak_rss + (m.peak_vram or 0)) / MIB,
}


def pareto(study: optuna.Study, x: str = "decode", y: str = "prefill") -> Figure:
    """The measured trade-off between two of decode, prefill, ttft and memory over the completed trials,
    drawn by Optuna's Pareto-front plot (front trials labeled with their numbers). Works for single- and
    multi-objective studies alike, since every trial measures all of them."""
    runs = completed(study)
    if not runs:
        raise NoData(f"no completed trial in study {study.study_name}")
    (xm, xf), (ym, yf) = (metric(x), PARETO_AXES[x]), (metric(y), PARETO_AXES[y])
    view = optuna.create_study(directions=[xm.direction, ym.direction])
    for t, m in runs:
        view.add_trial(
            optuna.trial.create_trial(
                values=[xf(m), yf(m)], params=t.params, distributions=t.distributions, user_attrs={"number": t.number}
            )
        )
    with _optuna_figure():
        ax = optuna.visualization.matplotlib.plot_pareto_front(view, target_names=[xm.label, ym.label])
    front = view.best_trials
    for t in front:
        ax.annotate(
            f"#{t.user_attrs['number']}",
            (t.values[0], t.values[1]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    better = {True: "higher", False: "lower"}
    ax.set_title(
        f"Pareto front over {len(runs)} completed trials: {len(front)} not beaten on both "
        f"({better[xm.higher_is_better]} {x}, {better[ym.higher_is_better]} {y} is better)",
        fontsize=10,
    )
    return _resized(ax, 8, 5.5)


# ---------------------------------------------------------------------------------------- speculation


def speculation(report: SpecReport) -> Figure:
    """Decode speed-up over no speculation (bars: interquartile range of the per-round ratios) and acceptance, per
    finalist and kind of work, from a speculation report (``autotune spec``'s, or a tuned config's
    ``"speculation"``); what was not measured and the verdicts underneath."""
    results = report.rows
    if len(results) < 2:
        raise NoData("no kind of speculation was measured")
    works = list(report.plan.workloads)
    rows = results[1:]
    fig = _figure(12, 6)
    grid = fig.add_gridspec(2, 2, height_ratios=(6, 1.4), width_ratios=(3, 2))
    speed_ax, acc_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    width = 0.8 / len(works)
    ys = np.arange(len(rows))
    for j, w in enumerate(works):
        color = PAIR_COLORS[j % len(PAIR_COLORS)]
        med = np.array(
            [r["workloads"][w]["speedup"]["median"] if r["workloads"][w]["speedup"] else np.nan for r in rows]
        )
        lo = np.array([r["workloads"][w]["speedup"]["q25"] if r["workloads"][w]["speedup"] else np.nan for r in rows])
        hi = np.array([r["workloads"][w]["speedup"]["q75"] if r["workloads"][w]["speedup"] else np.nan for r in rows])
        at = ys + (j - (len(works) - 1) / 2) * width
        speed_ax.barh(
            at,
            np.nan_to_num(med),
            height=width,
            color=color,
            label=w,
            xerr=[np.nan_to_num(med - lo), np.nan_to_num(hi - med)],
            capsize=3,
        )
        for y, r in zip(at, rows, strict=False):
            if r["workloads"][w]["versus"] == "better":
                speed_ax.annotate(
                    "faster", (hi[list(at).index(y)], y), xytext=(4, -3), textcoords="offset points", fontsize=7
                )
        acc = [r["workloads"][w]["acceptance"] for r in rows]
        acc_ax.barh(at, [0 if a is None else 100 * a for a in acc], height=width, color=color, label=w)
    speed_ax.axvline(1.0, color="black", lw=1.2, label="no speculation (x1)")
    for ax in (speed_ax, acc_ax):
        ax.set_yticks(ys, [textwrap.shorten(r["label"], 40) for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    acc_ax.set_yticklabels([])
    speed_ax.set_xlabel("decode speed-up over no speculation (x; bars: q25-q75 over rounds)")
    acc_ax.set_xlabel("draft tokens accepted (%)")
    acc_ax.set_xlim(0, 100)
    speed_ax.legend(fontsize=8, loc="lower right")
    base = results[0]["workloads"]
    fig.suptitle(
        "speculative decoding in llama-server (no speculation: "
        + ", ".join(f"{w} {base[w]['decode']['median']:.1f} tok/s" for w in works if base[w]["decode"]["n"])
        + ")",
        fontsize=11,
    )
    notes = [textwrap.shorten(v, 170) for v in report.verdicts.values()]
    notes += [textwrap.shorten(f"not measured: {kind}: {why}", 170) for kind, why in report.skipped][:4]
    note_ax = fig.add_subplot(grid[1, :])
    note_ax.axis("off")
    note_ax.text(0, 1, "\n".join(notes), fontsize=8, va="top", transform=note_ax.transAxes)
    return fig


def serving(results: dict[int, ServeResult], title: str = "") -> Figure:
    """Aggregate throughput and p95 time to first token against concurrent users, for the tuned server and
    llama-server's defaults: medians of the side-by-side rounds, bars from q25 to q75. ``results``: the serving
    study's result per user count."""
    rows = sorted(results.items())
    if not rows:
        raise NoData("no serving results to plot")
    fig = _figure(9, 3.6)
    ax_tp, ax_lat = fig.subplots(1, 2)

    def series(pick: Callable[[ServeResult], str | None], key: str) -> tuple[list[int], list[float], list[list[float]]]:
        xs, med, err = [], [], []
        for users, r in rows:
            label = pick(r)
            vals = [x[key] for x in r.side_by_side.get(label or "", []) if x.get("ok") and x.get(key) is not None]
            if vals:
                q25, q50, q75 = np.percentile(vals, [25, 50, 75])
                xs.append(users)
                med.append(float(q50))
                err.append([float(q50 - q25), float(q75 - q50)])
        return xs, med, err

    def tuned(r: ServeResult) -> str | None:  # the recommendation, or the best tuned trial where it was not one
        trials = [label for label in r.side_by_side if label.startswith("trial")]
        return r.chosen if r.chosen in trials else next(iter(trials), None)

    def defaults(r: ServeResult) -> str | None:
        return next((label for label in r.side_by_side if label.startswith("llama-server defaults")), None)

    for ax, shown in ((ax_tp, metric("throughput")), (ax_lat, metric("ttft_p95"))):
        for pick, name, color in (
            (tuned, "tuned (best trial)", PAIR_COLORS[0]),
            (defaults, "llama-server defaults", PAIR_COLORS[1]),
        ):
            xs, med, err = series(pick, shown.name)
            if xs:
                ax.errorbar(xs, med, yerr=np.array(err).T, marker="o", capsize=3, color=color, label=name)
        ax.set_xlabel("concurrent users")
        ax.set_ylabel(shown.label)
        ax.set_xticks([users for users, _ in rows])
        ax.grid(alpha=0.3)
    ax_tp.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
