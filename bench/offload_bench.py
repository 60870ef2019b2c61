"""The offload bench: models larger than the GPU, llama.cpp's own answer against autotune's, in llama-bench.

THE ONE COMMAND (a session lent an NVIDIA GPU; from the project root, after ``bash bench/gpu_prepare.sh .gpu``
here, with ``.gpu/`` listed in ``.git/info/exclude``):

    run(command="bash bench/offload_device.sh", carry=[".gpu"], timeout_s=580)

It writes $OUT/offload_results.json and .md as it goes (a run cut short returns what it finished) and resumes from
the committed bench/offload_results.json; copy the two files from the reply's files_at into bench/ and commit them.

Cases, in order: qwen3-30b-a3b (Q4_K) at a 12 GiB budget, the llama 8b shape at 4 GiB, gpt-oss-20b at 8 GiB, as
header-only synthetic files (``autotune.facts.synth``). A smaller card is emulated by a ballast process holding the rest
of the GPU's memory with plain ``cuMemAlloc`` for the whole case, so llama.cpp (``llama-fit-params``, llama-bench)
and autotune all see only the budget (autotune is also told ``--gpu-budget`` where its CLI has it). Per case, side
by side in llama-bench (pp2048 and tg128 at depth 4096, rotated rounds, medians and interquartile ranges, the peak
GPU memory of every run from NVML, which must stay within the budget):

  --fit defaults         llama-fit-params' answer with llama.cpp's margin (1024 MiB), -ub 512, -b 2048, FA auto,
                         f16 cache, llama.cpp's default threads; its -ot exactly as it printed it (its boundary
                         layer split has no knob of its own)
  max layers on the GPU  the same defaults with the most -ngl that fits and no overrides (LM Studio, KoboldCpp)
  autotune               ``autotune search`` under a time limit (its wall time, choice and verdict recorded)

Every command line but --fit's -ot is written from the knob table's spelling (``flags``).

    python bench/offload_bench.py --out DIR --donor TOKENIZER.gguf --llama-bin BIN [--work DIR] [--until EPOCH]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 2**20
# (synthetic shape, GPU budget in MiB), the most telling first.
CASES = (("qwen3-30b-a3b", 12288), ("8b", 4096), ("gpt-oss-20b", 8192))
BENCH = {"prompt": 2048, "gen": 128, "depth": 4096, "reps": 1, "rounds": 3}
CTX = 6400  # the test's context (4096 + 2048 + 128), in whole 256-cell blocks as the engine pads it
FIT_MARGIN_MIB = 1024  # llama.cpp's --fit default (-fitt)
CONFIGS = ("--fit defaults", "max layers on the GPU", "autotune")
# autotune search's budget: trials started for ``timeout`` s, then the best one re-measured against the baselines
# in ``rounds`` rounds of ``reps`` (4 samples each, the least its noise rule accepts); killed after ``limit_s``.
SEARCH = {"trials": 30, "timeout": 50, "trial_timeout": 60, "reps": 2, "top_k": 1, "rounds": 2, "limit_s": 240}
# Seconds a step takes (a llama-bench run: typically; it is killed after RUN_TIMEOUT): one that cannot finish before
# --until is left for a rerun.
COST = {"plan": 60, "search": SEARCH["limit_s"] + 20, "run": 40}
RUN_TIMEOUT = 180


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ----------------------------------------------------------------------------------- reading llama-fit-params


@dataclass(frozen=True)
class FitAnswer:
    """What ``llama-fit-params`` printed: ``-c N -ngl N [-ot "pattern=BUFT,..."]``."""

    n_ctx: int
    n_gpu_layers: int  # -1: every layer
    overrides: tuple[str, ...]  # "pattern=BUFT" entries, as printed

    def whole_expert_layers(self) -> list[int]:
        """Layers whose experts all go to the host (fit.cpp's LAYER_FRACTION_MOE pattern)."""
        return sorted(int(m.group(1)) for o in self.overrides
                      if (m := re.fullmatch(r"blk\\\.(\d+)\\\.ffn_\(up\|down\|gate_up\|gate\)_\(ch\|\)exps=CPU", o)))

    def boundary(self) -> dict[str, Any] | None:
        """The one layer --fit splits (fit.cpp's UP, GATE or ATTN fractions): its number and what goes to the host."""
        for o in self.overrides:
            m = re.fullmatch(r"blk\\\.(\d+)\\\.ffn_(\([a-z_|]+\)|[a-z_]+)\.\*=CPU", o)
            if m:
                return {"layer": int(m.group(1)), "on_host": m.group(2).strip("()").split("|")}
        return None

    def unread(self) -> list[str]:
        """Entries of neither shape (kept as printed)."""
        known = {f"blk\\.{i}\\.ffn_(up|down|gate_up|gate)_(ch|)exps=CPU" for i in self.whole_expert_layers()}
        b = self.boundary()
        return [o for o in self.overrides if o not in known and not (b and o.startswith(f"blk\\.{b['layer']}\\.ffn_("))]

    def placement(self, n_layer: int, moe_layers: tuple[int, ...]) -> dict[str, Any]:
        """The answer in the knob table's terms: the layers on the GPU, and the layers whose experts stay on the
        host, the split boundary layer among them (a little more on the host than --fit keeps there)."""
        from autotune.search import space

        ngl = n_layer + 1 if self.n_gpu_layers < 0 else self.n_gpu_layers
        b = self.boundary()
        layers = self.whole_expert_layers() + ([b["layer"]] if b else [])
        return {"n_gpu_layers": ngl, **space.experts_on_host(_Experts(moe_layers), layers)}

    def bench_ot(self) -> list[str]:
        """The overrides as llama-bench takes them: one -ot, entries joined by ';' (a ',' starts another test)."""
        return ["-ot", ";".join(self.overrides)] if self.overrides else []


@dataclass(frozen=True)
class _Experts:
    """The one fact ``space.experts_on_host`` reads from a model."""

    moe_layers: tuple[int, ...]


def parse_fit(text: str) -> FitAnswer:
    """The answer line in llama-fit-params' output (its log around it is ignored); ValueError without one."""
    m = re.search(r'^-c (\d+) -ngl (-?\d+)(?: -ts [\d,]+)?(?: -ot "([^"]*)")?\s*$', text, re.M)
    if not m:
        raise ValueError(f"no answer line in llama-fit-params' output: {text.strip()[-300:]!r}")
    return FitAnswer(int(m.group(1)), int(m.group(2)), tuple(m.group(3).split(",")) if m.group(3) else ())


# ------------------------------------------------------------------------------------------ rounds and spread


def rotation(configs: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, config) in the order they run: each round starts one config later, so none always runs first."""
    n = len(configs) or 1
    return [(r, c) for r in range(rounds) for c in configs[r % n:] + configs[:r % n]]


def spread(values: list[float]) -> dict[str, Any]:
    """Median and interquartile range (numpy's linear percentiles, as ``recommend.Spread``)."""
    if not values:
        return {"median": None, "q25": None, "q75": None, "n": 0}
    v = sorted(values)

    def pct(p: float) -> float:
        k = (len(v) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"median": statistics.median(v), "q25": pct(0.25), "q75": pct(0.75), "n": len(v)}


def pending(case: dict[str, Any], rounds: int | None = None) -> list[tuple[int, str]]:
    """The runs of a case still to do, in rotation order (``rounds``: the bench's): a resumed bench picks up where
    the last one stopped, a run that failed included; a config that has only failed is not run again (its crash
    is the answer, as in ``recommend.measure_rounds``)."""
    runs = case.get("runs", [])
    done = {(r["round"], r["config"]) for r in runs if r.get("ok")}
    crashed = {r["config"] for r in runs if not r.get("ok")} - {r["config"] for r in runs if r.get("ok")}
    names = [c for c in CONFIGS if c in case.get("configs", {}) and c not in crashed]
    return [rc for rc in rotation(names, rounds or BENCH["rounds"]) if rc not in done]


def needs_search(case: dict[str, Any]) -> bool:
    """Whether the case still needs ``autotune search``: never run, or left out for lack of time (a search that
    ran and failed is a result, kept)."""
    s = case.get("search")
    return "autotune" not in case.get("configs", {}) and (s is None or str(s.get("error", "")).startswith("skipped"))


def unfinished(case: dict[str, Any]) -> bool:
    """Whether a case has anything left to do: its plan, its search, or runs."""
    return "plan" not in case or needs_search(case) or bool(pending(case))


def summarize(case: dict[str, Any]) -> dict[str, Any]:
    """Per config: prefill and decode spreads, the highest peak, whether every run kept to the budget; and each
    config's medians over --fit's."""
    out: dict[str, Any] = {}
    for name in case.get("configs", {}):
        runs = [r for r in case.get("runs", []) if r["config"] == name and r.get("ok")]
        peaks = [r["peak_mib"] for r in runs if r.get("peak_mib") is not None]
        out[name] = {"prefill": spread([x for r in runs for x in r["prefill"]]),
                     "decode": spread([x for r in runs for x in r["decode"]]),
                     "peak_mib": max(peaks) if peaks else None,
                     "within_budget": all(p <= case["budget_mib"] for p in peaks) if peaks else None}
    base = out.get(CONFIGS[0])
    for name, s in out.items():
        s["ratio"] = {m: (s[m]["median"] / base[m]["median"]) if base and s[m]["median"] and base[m]["median"]
                      else None for m in ("prefill", "decode")}
        s["versus_fit"] = {m: _versus(s[m], base[m]) if base else "same" for m in ("prefill", "decode")}
    return out


def changes(case: dict[str, Any]) -> dict[str, list[Any]]:
    """What autotune chose differently from --fit's settings: knob -> [--fit's value, autotune's]."""
    fit, ours = (case.get("configs", {}).get(c, {}).get("settings") for c in (CONFIGS[0], CONFIGS[2]))
    if not fit or not ours:
        return {}
    skip = {"n_ctx", "n_threads_batch"}  # llama-bench sizes the context itself and runs one thread count
    return {k: [fit[k], v] for k, v in ours.items() if k in fit and fit[k] != v and k not in skip}


def _versus(a: dict[str, Any], b: dict[str, Any]) -> str:
    """"better"/"worse" only when the interquartile ranges are apart (``recommend.Spread.versus``'s rule)."""
    if not a["n"] or not b["n"]:
        return "same"
    return "better" if a["q25"] > b["q75"] else "worse" if a["q75"] < b["q25"] else "same"


# ------------------------------------------------------------------------------------------------- the GPU


def gpu_or_exit() -> Any:
    """NVML's first GPU; on a machine without one, one line and exit 2 (nothing to bench here)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            raise RuntimeError("NVML sees no GPU")
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception as e:  # no pynvml, no driver, no device: all mean "not here"
        print(f"offload_bench: no NVIDIA GPU here ({type(e).__name__}: {str(e) or 'no NVML'}); it runs on a GPU "
              "machine: bash bench/offload_device.sh (see the top of bench/offload_bench.py)", file=sys.stderr)
        sys.exit(2)


def gpu_name(handle: Any) -> str:
    import pynvml

    name = pynvml.nvmlDeviceGetName(handle)
    return name.decode() if isinstance(name, bytes) else name


def used(handle: Any) -> int:
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def free(handle: Any) -> int:
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)


def peak_run(handle: Any, argv: list[str], timeout: float, **kw: Any) -> tuple[subprocess.CompletedProcess, int | None]:
    """Run ``argv`` and return it with its peak GPU memory above what was in use before it started (NVML, every
    20 ms; None without a GPU); a run that outlives ``timeout`` is killed (rc -9)."""
    base = used(handle) if handle is not None else 0
    peak, done = base, threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, used(handle))
            done.wait(0.02)

    t = threading.Thread(target=poll if handle is not None else done.wait, daemon=True)
    t.start()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        p = subprocess.CompletedProcess(argv, -9, _text(e.stdout), _text(e.stderr) + f"\nkilled after {timeout:.0f} s")
    done.set()
    t.join()
    return p, peak - base if handle is not None else None


def _text(b: Any) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def cuda_driver() -> ctypes.CDLL:
    """The CUDA driver library (always beside an NVIDIA driver), else one from a CUDA install or torch."""
    names = [ctypes.util.find_library("cuda"), "libcuda.so.1", *glob.glob("/usr/local/cuda*/compat/libcuda.so*")]
    for name in names:
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("no libcuda found")


def ballast(budget: int) -> None:
    """The ballast process: hold all but ``budget`` bytes of GPU 0's free memory with plain allocations, say how
    much on one JSON line, and keep it until stdin closes. Its own CUDA context counts as held."""
    try:
        cu = cuda_driver()
    except OSError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        sys.exit(1)
    ctx, dev = ctypes.c_void_p(), ctypes.c_int()
    for call, args in (("cuInit", (0,)), ("cuDeviceGet", (ctypes.byref(dev), 0)),
                       ("cuDevicePrimaryCtxRetain", (ctypes.byref(ctx), dev)), ("cuCtxSetCurrent", (ctx,))):
        rc = getattr(cu, call)(*args)
        if rc:
            print(json.dumps({"error": f"{call} failed: CUDA error {rc}"}), flush=True)
            sys.exit(1)
    held, chunk = 0, 2**31
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    while True:
        cu.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t))
        need = f.value - budget
        if need < 64 * MIB or chunk < 2 * MIB:
            break
        size = min(chunk, need) // (2 * MIB) * (2 * MIB)
        ptr = ctypes.c_uint64()
        if cu.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size)):
            chunk //= 2  # fragmented or racing another process: smaller pieces
            continue
        held += size
    print(json.dumps({"held": held, "free": f.value, "total": t.value}), flush=True)
    sys.stdin.read()  # hold until the bench closes the pipe (or dies)


class Ballast:
    """A ballast child for a ``with`` block: the GPU looks ``budget`` bytes large to everything else."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.proc: subprocess.Popen | None = None
        self.report: dict[str, Any] = {}

    def __enter__(self) -> Ballast:
        self.proc = subprocess.Popen([sys.executable, __file__, "--ballast", str(self.budget)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        self.report = json.loads(line) if line.strip() else {"error": "the ballast process said nothing"}
        if "error" in self.report:
            self.__exit__()
            raise RuntimeError(f"ballast: {self.report['error']}")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------------------- the bench


def bench_argv(tool: str, s: Any, model: str, moe_layers: tuple[int, ...], fa_auto: bool = False) -> list[str]:
    """llama-bench's line for settings ``s`` from the knob table (``flags.bench_flags``); ``fa_auto``: FA auto, as
    llama.cpp's defaults run it (on, on a GPU that has it)."""
    from autotune.vocabulary import flags

    b = BENCH
    argv = [tool, *flags.bench_flags(s, model, b["prompt"], b["gen"], b["depth"], b["reps"], moe_layers=moe_layers)]
    if fa_auto and "-fa" in argv:
        argv[argv.index("-fa") + 1] = "auto"
    return argv


def fit_argv(tool: str, s: Any, model: str) -> list[str]:
    """llama-fit-params' line for llama.cpp's defaults ``s`` with its own margin, spelled from the knob table."""
    from autotune.vocabulary.knobs import BY_NAME

    words = [w for k in ("n_ctx", "n_batch", "n_ubatch", "type_k", "type_v")
             for w in BY_NAME[k].server.render(getattr(s, k))]
    return [tool, "-m", model, *words, "-fa", "auto", "-fitt", str(FIT_MARGIN_MIB)]


def read_bench(stdout: str) -> tuple[list[float], list[float]]:
    """llama-bench's JSON: (prefill samples, decode samples) in tok/s."""
    rows = json.loads(stdout)
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return [float(x) for x in pp["samples_ts"]], [float(x) for x in tg["samples_ts"]]


class Bench:
    def __init__(self, out: Path, work: Path, donor: Path, bin_dir: Path, until: float, handle: Any) -> None:
        self.out, self.work, self.donor, self.bin, self.until, self.gpu = out, work, donor, bin_dir, until, handle
        self.path = out / "offload_results.json"
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.results.setdefault("plan", {"bench": dict(BENCH), "ctx": CTX, "fit_margin_mib": FIT_MARGIN_MIB,
                                         "search": SEARCH, "cases": [list(c) for c in CASES]})
        self.results.setdefault("cases", {})
        (work / "models").mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        for case in self.results["cases"].values():
            case["summary"] = summarize(case)
        self.path.write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "offload_results.md").write_text(markdown(self.results))

    def left(self) -> float:
        return self.until - time.time()

    def model(self, shape: str) -> str:
        from autotune.facts import synth

        path = self.work / "models" / f"{shape}.gguf"
        if not path.exists():
            synth.write_model(path, self.donor, synth.SHAPES[shape], "Q4_K", header_only=True)
        return str(path)

    def run(self, cases: list[tuple[str, int]]) -> None:
        device = gpu_name(self.gpu) if self.gpu is not None else "no GPU (--cpu: budgets unchecked)"
        for shape, budget in cases:
            key = f"{shape}@{budget}"
            case = self.results["cases"].setdefault(key, {"shape": shape, "budget_mib": budget})
            if case.get("device") not in (None, device):  # timings of another card do not mix with these
                log(f"{key}: measured on {case['device']} before; its runs are measured again on {device}")
                case["runs"] = []  # the search keeps the card it ran on (its "device")
            case["device"] = device
            if not unfinished(case):
                log(f"{key}: done before")
                continue
            if self.left() < COST["plan"] + COST["run"]:
                log(f"{key}: skipped, {self.left():.0f} s left")
                continue
            try:
                if self.gpu is None:
                    self.case(case, self.model(shape), budget)
                    continue
                with Ballast(budget * MIB) as b:
                    case["ballast"] = {**b.report, "free_seen": free(self.gpu)}
                    log(f"{key}: ballast holds {b.report['held'] / MIB:,.0f} MiB, {free(self.gpu) / MIB:,.0f} MiB free")
                    self.case(case, self.model(shape), budget)
            except Exception as e:  # a case that breaks is recorded with its reason; the next one still runs
                case["error"] = f"{type(e).__name__}: {e}"
                log(f"{key}: ERROR {case['error']}")
            self.save()

    def case(self, case: dict[str, Any], model: str, budget: int) -> None:
        """The plan, the baselines' first round, the search, then every run left, in rotation order."""
        from autotune import engine
        from autotune.facts.gguf_model import read_facts

        facts = read_facts(model)
        defaults = engine.llama_cpp_defaults(CTX)
        case.setdefault("configs", {})
        if "plan" not in case:
            case["plan"] = self.plan(case, facts, model, defaults, budget)
            self.save()
        self.runs(case, budget, first_round=True)  # the baselines measured even if the search runs out of time
        if needs_search(case):
            if self.left() < COST["search"] + len(CONFIGS) * COST["run"]:  # and one round after it
                case["search"] = {"error": f"skipped: {self.left():.0f} s left"}
            else:
                case["search"] = self.search(model, budget)
            self.save()
        s = case["search"]
        if "settings" in s and "autotune" not in case["configs"]:
            from autotune.vocabulary.settings import Settings

            rec = Settings.from_dict(s["settings"])
            case["configs"]["autotune"] = {"argv": bench_argv(str(self.bin / "llama-bench"), rec, model,
                                                              facts.moe_layers), "settings": rec.to_dict()}
        self.runs(case, budget)

    def runs(self, case: dict[str, Any], budget: int, first_round: bool = False) -> None:
        for r, name in [rc for rc in pending(case) if rc[0] == 0 or not first_round]:
            if self.left() < COST["run"]:
                log(f"  {len(pending(case))} runs left for a rerun")
                break
            case.setdefault("runs", []).append(self.measure(r, name, case["configs"][name]["argv"], budget))
            self.save()

    def plan(self, case: dict[str, Any], facts: Any, model: str, defaults: Any, budget: int) -> dict[str, Any]:
        """--fit's answer from llama-fit-params and the max-layers placement (the memory model, as the search's
        baselines place it), with the GPU as the ballast leaves it."""
        from autotune import memory
        from autotune.engine import bundled
        from autotune.facts.probe import probe
        from autotune.search import space

        hw = probe(bundled, measure_bandwidth=False)
        if self.gpu is not None:
            hw = hw.with_gpu_budget((budget,))
        argv = fit_argv(str(self.bin / "llama-fit-params"), defaults, model)
        p, _ = peak_run(self.gpu, argv, timeout=300)
        tool = str(self.bin / "llama-bench")
        top = facts.n_layer + 1
        memory.prefetch(facts, [defaults.replace(n_gpu_layers=n, **space.NO_OVERRIDES) for n in range(top + 1)], hw)
        most = defaults.replace(**space.max_layers(facts, hw, defaults))
        case["configs"] = {CONFIGS[1]: {"argv": bench_argv(tool, most, model, facts.moe_layers, fa_auto=True),
                                        "settings": most.to_dict()}}
        out = {"fit_argv": argv, "fit_rc": p.returncode, "max_layers": most.n_gpu_layers,
               "hardware_seen": {"vram_free_mib": [g.vram_free // MIB for g in hw.offload_gpus]}}
        try:
            answer = parse_fit(p.stdout + "\n" + p.stderr)
        except ValueError as e:  # llama.cpp's defaults do not start at this budget: that is the answer
            log(f"  --fit: {e}; max layers: -ngl {most.n_gpu_layers}")
            return {**out, "fit_error": str(e)}
        fit_s = defaults.replace(n_ctx=answer.n_ctx, **answer.placement(facts.n_layer, facts.moe_layers))
        bare = defaults.replace(n_gpu_layers=fit_s.n_gpu_layers, **space.NO_OVERRIDES)
        case["configs"] = {CONFIGS[0]: {"argv": bench_argv(tool, bare, model, facts.moe_layers, fa_auto=True)
                                        + answer.bench_ot(), "settings": fit_s.to_dict()}, **case["configs"]}
        log(f"  --fit: -ngl {answer.n_gpu_layers}, {len(answer.overrides)} overrides; max layers: -ngl "
            f"{most.n_gpu_layers}")
        return {**out, "fit_line": (p.stdout.strip().splitlines() or [""])[-1][:4000],
                "fit_boundary": answer.boundary(), "fit_whole_expert_layers": answer.whole_expert_layers(),
                "fit_unread": answer.unread(), "fit_settings": fit_s.to_dict()}

    def search(self, model: str, budget: int) -> dict[str, Any]:
        """``autotune search`` in its own process, with a time limit, under the ballast."""
        out = self.work / f"tuned-{Path(model).stem}-{budget}.json"
        argv = [sys.executable, "-m", "autotune.cli", "search", model, "--ctx", str(CTX),
                "--prompt-tokens", str(BENCH["prompt"]), "--gen-tokens", str(BENCH["gen"]),
                "--depth", str(BENCH["depth"]), "--timeout", str(SEARCH["timeout"]),
                "--trial-timeout", str(SEARCH["trial_timeout"]), "--trials", str(SEARCH["trials"]),
                "--reps", str(SEARCH["reps"]), "--top-k", str(SEARCH["top_k"]), "--rounds", str(SEARCH["rounds"]),
                "--kv-quality", "off",
                "--storage", f"sqlite:///{self.work / 'search.db'}", "--out", str(out)]
        helptext = subprocess.run([sys.executable, "-m", "autotune.cli", "search", "--help"], capture_output=True,
                                  text=True).stdout
        if "--gpu-budget" in helptext and self.gpu is not None:
            argv += ["--gpu-budget", str(budget)]
        log(f"  autotune search ({SEARCH['limit_s']} s at most) ...")
        start = time.time()
        p, peak = peak_run(self.gpu, argv, timeout=min(SEARCH["limit_s"], max(self.left() - COST["run"], 30)),
                           env={**os.environ, "COLUMNS": "160"})
        found: dict[str, Any] = {"argv": argv[1:], "device": gpu_name(self.gpu) if self.gpu is not None else "cpu",
                                 "wall_s": round(time.time() - start, 1), "rc": p.returncode,
                                 "peak_mib": None if peak is None else round(peak / MIB),
                                 "log_tail": (p.stdout + p.stderr)[-3000:]}
        if p.returncode == 0 and out.exists():
            record = json.loads(out.read_text())
            rec = record.get("recommendation", {})
            found.update(settings=record["settings"], verdict=rec.get("verdict"), chosen=rec.get("chosen"),
                         baselines=rec.get("baselines"), side_by_side=rec.get("side_by_side"),
                         knobs=record.get("knob_worth") or rec.get("knob_worth") or record.get("knobs"))
        log(f"  search: {found['wall_s']} s, exit {p.returncode}"
            + (f", chose {found.get('chosen')}" if "settings" in found else ""))
        return found

    def measure(self, r: int, name: str, argv: list[str], budget: int) -> dict[str, Any]:
        before = free(self.gpu) // MIB if self.gpu is not None else None
        p, peak = peak_run(self.gpu, argv, timeout=RUN_TIMEOUT)
        row: dict[str, Any] = {"round": r, "config": name, "rc": p.returncode, "free_mib_before": before,
                               "peak_mib": None if peak is None else round(peak / MIB)}
        try:
            row["prefill"], row["decode"] = read_bench(p.stdout)
            row["ok"] = True
        except (ValueError, StopIteration, KeyError) as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}", stderr_tail=p.stderr[-1500:])
        row["within_budget"] = None if peak is None else row["peak_mib"] <= budget
        log(f"  round {r + 1} {name}: " + (f"pp {statistics.median(row['prefill']):,.0f} tg "
                                          f"{statistics.median(row['decode']):.1f}" if row["ok"] else row["error"])
            + (f", peak {row['peak_mib']:,} MiB" if peak is not None else ""))
        return row


# ------------------------------------------------------------------------------------------------- markdown


def _cell(s: dict[str, Any], fmt: str) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{s['median']:{fmt}} ({s['q25']:{fmt}}-{s['q75']:{fmt}})"


def markdown(r: dict[str, Any]) -> str:
    b = r.get("plan", {}).get("bench", BENCH)
    lines = ["# Offload bench: models larger than the GPU", "",
             f"llama-bench pp{b['prompt']} and tg{b['gen']} at depth {b['depth']}, {b['rounds']} rotated rounds of "
             f"-r {b['reps']}; medians (interquartile range) in tok/s; peak GPU memory per run from NVML. A ballast "
             "process holds the rest of the GPU, so llama.cpp and autotune see only the budget. Header-only synthetic "
             "models (Q4_K): memory and speed are the shape's; autotune's K/V quality guard is off (it passes "
             "trivially on them).", "",
             "Run it: `bash bench/gpu_prepare.sh .gpu` here, then on the GPU machine "
             "`bash bench/offload_device.sh` (see bench/offload_bench.py).", ""]
    cases = r.get("cases", {})
    if not cases:
        lines += ["Nothing has run yet: the cases wait for a GPU.", "",
                  "| case | budget |", "|---|---|", *(f"| {s} | {m:,} MiB |" for s, m in CASES), ""]
    for key, c in cases.items():
        on = f" ({c['device']})" if c.get("device") else ""
        lines += [f"## {c['shape']} at a {c['budget_mib']:,} MiB budget{on}", ""]
        if c.get("ballast"):
            held, seen = c["ballast"].get("held", 0) / MIB, c["ballast"].get("free_seen", 0) / MIB
            lines += [f"Ballast held {held:,.0f} MiB; {seen:,.0f} MiB free to the runs.", ""]
        summary = c.get("summary", {})
        if summary:
            lines += ["| config | prefill | decode | x --fit (pp / tg) | peak MiB | within budget |",
                      "|---|---|---|---|---|---|"]
            for name, s in summary.items():
                ratio = " / ".join(f"x{s['ratio'][m]:.2f} {s['versus_fit'][m]}" if s["ratio"][m] else "-"
                                   for m in ("prefill", "decode"))
                lines.append(f"| {name} | {_cell(s['prefill'], ',.0f')} | {_cell(s['decode'], '.1f')} | {ratio} | "
                             f"{s['peak_mib'] if s['peak_mib'] is not None else '-'} | {s['within_budget']} |")
            lines.append("")
        left = pending(c, b["rounds"]) if c.get("configs") else []
        if left:
            lines += [f"{len(left)} runs still to do (a rerun resumes them).", ""]
        s = c.get("search", {})
        if s:
            lines += [f"`autotune search`: {s.get('wall_s', '-')} s, exit {s.get('rc', '-')}"
                      + (f"; chose {s['chosen']}: {s.get('verdict')}" if s.get("chosen") else "")
                      + (f"; {s['error']}" if s.get("error") else ""), ""]
            if changes(c):
                lines += ["autotune changed (--fit's -> its own): "
                          + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes(c).items()), ""]
            if s.get("knobs"):
                lines += [f"What each knob was worth: `{json.dumps(s['knobs'])[:1500]}`", ""]
        p = c.get("plan", {})
        if p:
            lines += [(f"--fit: -ngl {p['fit_settings']['n_gpu_layers']}, the experts of layers "
                       f"{p['fit_whole_expert_layers'] or 'none'} on the host" if "fit_settings" in p else
                       f"--fit found no placement: {p.get('fit_error')}")
                      + (f", and split layer {p['fit_boundary']['layer']} ({'/'.join(p['fit_boundary']['on_host'])} on "
                         "the host)" if p.get("fit_boundary") else "") + f"; max layers: -ngl {p['max_layers']}.", ""]
        lines += [f"- {name}: `{' '.join(cfg['argv'][1:])}`" for name, cfg in c.get("configs", {}).items()]
        if p.get("fit_argv"):
            lines.append(f"- llama-fit-params: `{' '.join(p['fit_argv'][1:])}`")
        if c.get("error"):
            lines.append(f"- case failed: {c['error']}")
        lines.append("")
    return "\n".join(lines) + "\n"


def resize(text: str) -> None:
    """``--sizes P,N,D,REPS,ROUNDS``: the test's sizes, and the context they need."""
    global CTX
    values = [int(v) for v in text.split(",")]
    BENCH.update(zip(("prompt", "gen", "depth", "reps", "rounds"), values))
    CTX = -(-(BENCH["prompt"] + BENCH["gen"] + BENCH["depth"]) // 256) * 256


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="where offload_results.json and .md go (a JSON there is resumed)")
    ap.add_argument("--work", type=Path, help="the models and the search's study (default: OUT/../offload-work)")
    ap.add_argument("--donor", type=Path, help="a GGUF whose tokenizer the synthetic models copy")
    ap.add_argument("--llama-bin", type=Path, help="the CUDA build's bin folder (llama-bench, llama-fit-params)")
    ap.add_argument("--until", type=float, default=time.time() + 540,
                    help="epoch seconds: start nothing that could end later")
    ap.add_argument("--cases", default=",".join(f"{s}@{m}" for s, m in CASES), help="SHAPE@MIB,... in this order")
    ap.add_argument("--render", action="store_true", help="no runs: write the markdown from OUT's JSON")
    ap.add_argument("--cpu", action="store_true", help="no GPU: no ballast, peaks and budgets unchecked (a test of the "
                    "bench's plumbing with a CPU llama.cpp)")
    ap.add_argument("--sizes", help="PROMPT,GEN,DEPTH,REPS,ROUNDS in place of the bench's (small ones, for --cpu)")
    ap.add_argument("--search-trials", type=int, default=SEARCH["trials"], help="autotune search's most trials")
    ap.add_argument("--ballast", type=int, help=argparse.SUPPRESS)  # the ballast child (``Ballast``)
    a = ap.parse_args(argv)
    if a.ballast is not None:
        ballast(a.ballast)
        return 0
    if a.out is None:
        ap.error("--out is required")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.render:
        path = a.out / "offload_results.json"
        (a.out / "offload_results.md").write_text(markdown(json.loads(path.read_text()) if path.exists() else {}))
        return 0
    handle = None if a.cpu else gpu_or_exit()
    if a.donor is None or a.llama_bin is None:
        ap.error("--donor and --llama-bin are required to run the bench")
    if a.sizes:
        resize(a.sizes)
    SEARCH["trials"] = a.search_trials
    cases = [(c.split("@")[0], int(c.split("@")[1])) for c in a.cases.split(",")]
    bench = Bench(a.out, a.work or a.out.parent / "offload-work", a.donor, a.llama_bin, a.until, handle)
    if bench.results["plan"]["bench"] != BENCH:
        print(f"offload_bench: {a.out / 'offload_results.json'} was measured with {bench.results['plan']['bench']}, "
              f"not {BENCH}: give another --out", file=sys.stderr)
        return 2
    bench.run(cases)
    bench.save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
