"""``autotune report``: a directory with every plot as a PNG and an index.html that shows them next to the
tuned config, built from a study in its storage or from a tuned-config JSON.

Each part is drawn from what the source holds: a config whose study is not reachable still gets its
recommendation, memory and speculation plots; a study without a recommendation gets its study plots. What is
left out is said in the page's notes, never silently dropped.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from matplotlib.figure import Figure
from optuna.trial import TrialState

from .. import engine
from ..engine import Workload
from ..facts.gguf_model import ModelFacts, read_facts
from ..facts.probe import Hardware
from ..search import loop, recommend
from ..search.config import TunedRecord
from ..search.storage import default_url, load_existing
from ..stages.speculation import SpecReport
from ..vocabulary.errors import AutotuneError, ConfigError
from ..vocabulary.metrics import OBJECTIVES, metric
from ..vocabulary.settings import Settings
from . import export, plots


@dataclass
class Source:
    """What a report is built from; any part may be missing (a config without its study, a moved model)."""

    config: TunedRecord | None
    study: optuna.Study | None
    notes: list[str] = field(default_factory=list)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.study.user_attrs) if self.study else {}

    @property
    def model(self) -> dict[str, Any]:
        return (self.config.model if self.config else None) or self.attrs.get("model") or {}

    @property
    def hardware(self) -> Hardware | None:
        """The machine the study ran on, as recorded; this machine's engine prices what the replay cannot."""
        data = (self.config.hardware if self.config else None) or self.attrs.get("hardware")
        return replace(Hardware.from_dict(data), build=engine.bundled) if data else None

    @property
    def evidence(self) -> dict[str, Any]:
        """The tuned config's evidence (study, workload, recommendation, speculation), empty without one."""
        return self.config.evidence if self.config else {}


def load(source: str, storage: str | None = None) -> Source:
    """A tuned-config JSON path (its study is loaded too where reachable) or a study name in ``storage``."""
    default = default_url()
    if source.endswith(".json") or Path(source).is_file():
        config = TunedRecord.load(source)
        ref = config.evidence.get("study") or {}
        if not ref.get("name"):
            return Source(config, None, ["the config names no study: knob and study plots left out"])
        try:
            return Source(config, load_existing(ref["name"], storage or ref.get("storage") or default))
        except AutotuneError as e:
            return Source(config, None, [f"study {ref['name']} not reachable ({e}): knob and study plots left out"])
    st = load_existing(source, storage or default)
    recommended = st.user_attrs.get("recommendation")
    notes = (
        []
        if recommended
        else [
            "the study has no recommendation yet (finish it with autotune search): "
            "the tuned config and the recommended-vs-defaults plot are left out"
        ]
    )
    return Source(TunedRecord.from_json(recommended, f"study {source}") if recommended else None, st, notes)


# ------------------------------------------------------------------------------------------ figures


@dataclass
class Plot:
    name: str  # file stem
    title: str
    caption: str
    figure: Figure


def _facts(src: Source) -> ModelFacts | None:
    path = src.model.get("path")
    if not path or not Path(path).is_file():
        src.notes.append(f"model file {path or '(none recorded)'} not found here: memory plot left out")
        return None
    try:
        return read_facts(path)
    except AutotuneError as e:
        src.notes.append(f"memory plot left out: {e}")
        return None


def _settings(src: Source) -> Settings:
    """The configuration to draw memory for: the tuned one, else the best trial's, else the study's context."""
    if src.config:
        return src.config.settings
    runs = loop.completed(src.study) if src.study else []
    if runs:
        return max(runs, key=lambda tm: tm[1].decode)[1].settings
    return Settings(n_ctx=int(src.attrs.get("n_ctx", 4096)))


def _roofline(src: Source, facts: ModelFacts | None, hw: Hardware | None, s: Settings) -> float | None:
    """Decode's memory-bandwidth limit: the recommendation's, else computed like the recommendation does."""
    known = (src.evidence.get("recommendation") or {}).get("roofline", {}).get("limit_tps")
    if known or facts is None or hw is None:
        return known
    work = src.evidence.get("workload") or src.attrs.get("workload") or {}
    roof = recommend.roofline(facts, hw, recommend.Candidate("best", s), Workload(**work))
    return roof.get("limit_tps")


def figures(src: Source) -> list[Plot]:
    """Every plot the source supports, in reading order; what cannot be drawn goes to ``src.notes``."""
    out: list[Plot] = []
    hw, facts, s = src.hardware, _facts(src), _settings(src)
    name = src.model.get("name") or Path(src.model.get("path", "model")).name

    def add(stem: str, title: str, caption: str, draw: Callable[[], Figure]) -> None:
        try:
            out.append(Plot(stem, title, caption, draw()))
        except plots.NoData as e:
            src.notes.append(f"{title}: {e}")
        except AutotuneError as e:  # e.g. an architecture the memory model does not support
            src.notes.append(f"{title} left out: {e}")

    if src.config:
        tuned = src.config
        add(
            "recommendation",
            "Recommended vs engine defaults",
            "Re-measured in interleaved rounds of fresh processes: bars are medians, error bars interquartile "
            "ranges, dots every sample; the dashed line is decode's memory-bandwidth roofline.",
            lambda: plots.recommendation(tuned),
        )
    if facts is not None and hw is not None:
        model_facts, machine = facts, hw
        add(
            "memory",
            "Memory against context",
            f"Predicted per device for the tuned settings (n_ctx {s.n_ctx:,} tuned); the budget is the free memory "
            "recorded when the study ran. Diamonds mark the largest context that fits, per K/V cache type.",
            lambda: plots.memory_vs_context(model_facts, s, machine),
        )
    st = src.study
    if st is not None:
        runs = loop.completed(st)
        highlight = {}
        if src.config:
            highlight["recommended"] = s
        defaults = next(
            (t for t in st.trials if t.user_attrs.get("role") == "defaults" and "settings" in t.user_attrs), None
        )
        if defaults is not None:
            highlight["engine defaults"] = Settings.from_dict(defaults.user_attrs["settings"])
        add(
            "knobs",
            "Speed against each knob",
            "Every completed trial at its value of each knob that varied: dots are its repetitions, the bar their "
            "range, the marker their median.",
            lambda: plots.knobs([m for _, m in runs], _roofline(src, facts, hw, s), highlight, name),
        )
        add(
            "history",
            "Optimization history",
            "Optuna's history of the objective; pruned and failed trials "
            "are marked along the bottom with their reasons.",
            lambda: plots.history(st),
        )
        add(
            "importances",
            "Parameter importances",
            "Which search parameters moved the objective (Optuna, PED-ANOVA).",
            lambda: plots.importances(st),
        )
        add(
            "pareto_decode_prefill",
            "Pareto front: decode vs prefill",
            "Measured on every completed trial.",
            lambda: plots.pareto(st, "decode", "prefill"),
        )
        add(
            "pareto_decode_memory",
            "Pareto front: decode vs memory",
            "Peak memory of each trial's process.",
            lambda: plots.pareto(st, "decode", "memory"),
        )
        add("timeline", "Trial timeline", "Wall-clock span and final state of every trial.", lambda: plots.timeline(st))
    spec = src.evidence.get("speculation") or {}
    if len(spec.get("results") or []) > 1:
        measured = SpecReport.from_json(spec)
        add(
            "speculation",
            "Speculative decoding",
            "Measured in llama-server with the tuned settings, each kind "
            "against no speculation in rotated rounds of fresh servers; a speed-up counts only when the interquartile "
            "ranges are apart.",
            lambda: plots.speculation(measured),
        )
    elif spec:
        src.notes.append(f"speculation: {spec.get('recommendation', {}).get('verdict', 'nothing measured')}")
    return out


# --------------------------------------------------------------------------------------------- page

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
tr.changed td { background: #fff3cd; } .meta { color: #555; font-size: 0.9em; }
pre { background: #f5f5f5; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #eee; } figcaption { color: #555; font-size: 0.9em; }
.verdict { font-weight: bold; } .notes li { color: #8a5a00; }
"""


def _table(header: list[str], rows: list[list[Any]], changed: list[bool] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    marks = changed or [False] * len(rows)
    cells = ["".join(f"<td>{html.escape(str(c))}</td>" for c in row) for row in rows]
    body = "".join(f"<tr{' class=changed' if mark else ''}>{c}</tr>" for c, mark in zip(cells, marks, strict=True))
    return f"<table><tr>{head}</tr>{body}</table>"


def _config_html(config: TunedRecord) -> str:
    rec = config.evidence.get("recommendation") or {}
    s = config.settings
    defaults = engine.defaults(s.n_ctx)
    parts = []
    if rec.get("verdict"):
        parts.append(f"<p class='verdict'>{html.escape(rec['verdict'])}</p>")
    names = [k for k, v in s.to_dict().items() if v is not None or getattr(defaults, k) is not None]
    parts.append(
        _table(
            ["setting", "tuned", "engine default"],
            [[k, getattr(s, k), getattr(defaults, k)] for k in names],
            [getattr(s, k) != getattr(defaults, k) for k in names],
        )
    )
    metrics, base = config.metrics, rec.get("baseline_metrics") or {}
    rows = []
    for key, unit in ((o.name, o.unit) for o in map(metric, OBJECTIVES)):
        m, b = metrics.get(key) or {}, base.get(key) or {}
        if m.get("n"):
            rows.append(
                [
                    key,
                    f"{m['median']:.2f} {unit}",
                    f"{m['q25']:.2f}-{m['q75']:.2f}",
                    m["n"],
                    f"{b['median']:.2f} {unit}" if b.get("n") else "-",
                ]
            )
    if rows:
        header = [
            "metric",
            "tuned median",
            "interquartile range",
            "samples",
            f"engine {rec.get('baseline', 'defaults')} median",
        ]
        parts.append(_table(header, rows))
    side = [r for r in rec.get("side_by_side") or [] if r["ran"]]
    if side:
        parts.append(
            "<p>Every config re-measured side by side (medians); each metric is judged against its own "
            "best baseline:</p>"
        )
        parts.append(
            _table(
                ["config", "decode tok/s", "prefill tok/s", "time to first token", "loses on"],
                [
                    [
                        r["label"] + (" (baseline)" if r["baseline"] else ""),
                        f"{r['decode']['median']:.1f}",
                        f"{r['prefill']['median']:.1f}",
                        f"{r['ttft']['median'] * 1000:.0f} ms",
                        ", ".join(r["loses"]) or "-",
                    ]
                    for r in side
                ],
                [r["chosen"] for r in side],
            )
        )
    roof = rec.get("roofline") or {}
    if roof.get("fraction"):
        parts.append(
            f"<p>Decode runs at {roof['fraction']:.0%} of the {roof['limit_tps']:,.0f} tok/s roofline "
            f"({roof['bandwidth_gbs']:.1f} GB/s, {roof['bytes_per_token'] / 2**20:,.0f} MiB read "
            "per token).</p>"
        )
    parts.append("<p>As llama-server flags:</p><pre>" + html.escape(export.render(config, "llama-server")) + "</pre>")
    quality = config.evidence.get("kv_quality") or {}
    if quality:
        parts.append(
            "<p>Quantized K/V caches against f16 on a fixed text (pairs beyond the threshold were not searched):</p>"
        )
        rows = [
            [
                k,
                f"{q.get('top1_agreement', float('nan')):.3f}",
                f"{q.get('mean_kl', float('nan')):.4f}",
                "no" if q.get("excluded") or "error" in q else "yes",
            ]
            for k, q in sorted(quality.items())
        ]
        parts.append(_table(["K/V", "top-1 agreement", "mean KL", "searched"], rows))
    return "\n".join(parts)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


@dataclass
class Report:
    index: Path
    images: list[Path]
    notes: list[str]


def build(source: str, out_dir: str | Path, storage: str | None = None) -> Report:
    """Write ``out_dir``/index.html (images embedded, so the file stands alone) and one PNG per plot."""
    src = load(source, storage)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the report directory {out}: {e.strerror}") from None
    made = figures(src)
    hw = src.hardware
    model = src.model
    work = src.evidence.get("workload") or src.attrs.get("workload") or {}
    name = model.get("name") or Path(model.get("path", "model")).name
    meta = [
        f"model {model.get('path', '?')} ({model.get('architecture', '?')}, "
        f"sha256 {str(model.get('sha256', '?'))[:12]})"
    ]
    if hw:
        meta.append(
            f"machine: {hw.cpu_model}, {hw.physical_cores} physical / {hw.logical_cores} logical cores, "
            f"{hw.ram_total / 2**30:.1f} GiB RAM, backend {hw.backend}"
            + (f", {hw.bandwidth_gbs:.1f} GB/s measured bandwidth" if hw.bandwidth_gbs else "")
            + "".join(f", {g.name} ({g.vram_total / 2**30:.1f} GiB)" for g in hw.gpus)
        )
    if src.study is not None:
        states = [t.state for t in src.study.trials]
        meta.append(
            f"study {src.study.study_name}: objective {src.attrs.get('objective', '?')}, "
            + ", ".join(
                f"{states.count(state)} {word}"
                for state, word in (
                    (TrialState.COMPLETE, "complete"),
                    (TrialState.PRUNED, "pruned"),
                    (TrialState.FAIL, "failed"),
                )
            )
        )
    if work:
        meta.append(
            f"workload: {work.get('prompt_tokens')} prompt + {work.get('gen_tokens')} generated tokens, "
            f"{work.get('reps')} repetitions per run"
        )
    meta.append("generated " + dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    body = [
        f"<h1>autotune report: {html.escape(name)}</h1>",
        "<p class='meta'>" + "<br>".join(html.escape(m) for m in meta) + "</p>",
    ]
    if src.config:
        body += ["<h2>Tuned configuration</h2>", _config_html(src.config)]
    images = []
    for p in made:
        data = _png(p.figure)
        path = out / f"{p.name}.png"
        path.write_bytes(data)
        images.append(path)
        embedded = base64.b64encode(data).decode()
        body += [
            f"<h2 id='{p.name}'>{html.escape(p.title)}</h2>",
            f"<figure><img alt='{html.escape(p.title)}' src='data:image/png;base64,{embedded}'>"
            f"<figcaption>{html.escape(p.caption)} (<a href='{p.name}.png'>{p.name}.png</a>)"
            "</figcaption></figure>",
        ]
    if src.notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in src.notes)
        body += ["<h2>Notes</h2>", f"<ul class='notes'>{items}</ul>"]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>autotune report: {html.escape(name)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    index = out / "index.html"
    index.write_text(page)
    return Report(index, images, list(src.notes))
