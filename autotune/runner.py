"""One measured engine run, in its own process, measured like llama-bench.

A crash, abort, out-of-memory kill or hang inside llama.cpp takes down only the child; the parent turns
it into a ``Measurement`` with a specific reason. The child loads the model with the trial's settings,
warms up, then repeats: reset, prefill a fixed prompt of P tokens, generate G tokens greedily. Every
raw sample is kept.

Fault injection for tests: ``AUTOTUNE_FAULT=abort|segfault|oom|hang|garbage|exit`` (a comma list
cycles through kinds) makes the child fail that way after loading; with ``AUTOTUNE_FAULT_EVERY=N`` only
every N-th run fails (indexes N-1, 2N-1, ...).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from .settings import Settings

RESULT_MARK = "AUTOTUNE-RESULT "
FAULT_KINDS = ("abort", "segfault", "oom", "hang", "garbage", "exit")


def prompt_text(kind: str = "prose") -> str:
    """The fixed benchmark text shipped with the package (runs stay comparable across machines)."""
    return resources.files("autotune").joinpath("prompts", f"{kind}.txt").read_text()


@dataclass(frozen=True)
class Workload:
    """What one run measures: prompt tokens, generated tokens, repetitions."""

    prompt_tokens: int = 128
    gen_tokens: int = 32
    reps: int = 2
    prompt_kind: str = "prose"


@dataclass
class Measurement:
    settings: Settings
    ok: bool
    error: str = ""
    prefill_tps: list[float] = field(default_factory=list)  # one sample per repetition
    decode_tps: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    load_s: float = 0.0
    wall_s: float = 0.0
    peak_rss: int = 0  # bytes, the child's maximum resident set
    base_rss: int = 0  # bytes resident before the model loaded (Python + engine library): not the model's
    peak_vram: int | None = None  # bytes over the baseline, where NVML sees a GPU
    buffers: dict[str, Any] = field(default_factory=dict)  # the engine's logged buffer sizes
    draft: dict[str, Any] = field(default_factory=dict)  # speculative decoding counters, when a draft ran
    output_tokens: list[int] = field(default_factory=list)  # greedy output of the last repetition

    @property
    def decode(self) -> float:
        return statistics.median(self.decode_tps) if self.decode_tps else 0.0

    @property
    def prefill(self) -> float:
        return statistics.median(self.prefill_tps) if self.prefill_tps else 0.0

    @property
    def ttft(self) -> float:
        return statistics.median(self.ttft_s) if self.ttft_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "settings"}
        data["settings"] = self.settings.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        data = dict(data)
        data["settings"] = Settings.from_dict(data["settings"])
        return cls(**data)


def run(
    model_path: str,
    settings: Settings,
    workload: Workload = Workload(),
    timeout: float = 300.0,
    index: int = 0,
) -> Measurement:
    """Measure ``settings`` on ``model_path`` in a fresh child process. Never raises for engine faults."""
    request = {
        "model": model_path,
        "settings": settings.to_dict(),
        "workload": workload.__dict__,
        "index": index,
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "autotune.runner"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a timeout can kill the whole group, and Ctrl-C reaches only us
    )
    vram = _VramWatch()
    try:
        out, err = proc.communicate(json.dumps(request), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        return Measurement(settings, False, f"timeout: no result after {timeout:.0f} s (killed)",
                           wall_s=time.perf_counter() - start)
    except BaseException:  # KeyboardInterrupt included: never leave an engine running behind us
        _kill_group(proc)
        proc.communicate()
        raise
    finally:
        peak_vram = vram.stop()
    wall = time.perf_counter() - start
    result = _parse_result(out)
    if proc.returncode != 0 or result is None:
        return Measurement(settings, False, _failure_reason(proc.returncode, out, err, result), wall_s=wall)
    if not result.get("ok"):
        return Measurement(settings, False, result.get("error") or "the engine failed", wall_s=wall)
    m = Measurement.from_dict({**result["measurement"], "settings": settings.to_dict()})
    m.wall_s = wall
    m.peak_vram = peak_vram
    return m


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _parse_result(out: str) -> dict[str, Any] | None:
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            try:
                return json.loads(line[len(RESULT_MARK):])
            except json.JSONDecodeError:
                return None
    return None


def _failure_reason(code: int, out: str, err: str, result: dict[str, Any] | None) -> str:
    from .engine import child_failure

    if code != 0:
        return child_failure(code, err)
    junk = out.strip().splitlines()[-1][:80] if out.strip() else "nothing"
    return f"no result from the engine process (it printed {junk!r})"


class _VramWatch:
    """Peak GPU memory in use during a run, over what was in use before it (NVML; none without GPUs)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:
            self._handles = []
            return
        if not self._handles:
            return
        self._base = self._used()
        self.peak = 0
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        self._thread.start()

    def _used(self) -> int:
        import pynvml

        return sum(int(pynvml.nvmlDeviceGetMemoryInfo(h).used) for h in self._handles)

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak or 0, self._used() - self._base)

    def stop(self) -> int | None:
        self._stop.set()
        if self._handles:
            self._thread.join()
            import pynvml

            pynvml.nvmlShutdown()
        return self.peak


# --------------------------------------------------------------------------------------- child side


def _inject_fault(index: int) -> None:
    kinds = [k for k in os.environ.get("AUTOTUNE_FAULT", "").split(",") if k]
    if not kinds:
        return
    every = int(os.environ.get("AUTOTUNE_FAULT_EVERY", "1"))
    if index % every != every - 1:
        return
    kind = kinds[(index // every) % len(kinds)]
    sys.stderr.write(f"autotune fault injection: {kind}\n")
    sys.stderr.flush()
    if kind == "abort":
        os.abort()
    elif kind == "segfault":
        import ctypes

        ctypes.string_at(0)
    elif kind == "oom":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        time.sleep(10**6)
    elif kind == "garbage":
        print("\x00\x1b[31m#@!garbage", flush=True)
        os._exit(0)
    elif kind == "exit":
        sys.stderr.write("llama_model_load: error loading model: injected failure\n")
        os._exit(3)


def _peak_rss() -> int:
    """This process's peak resident set, in bytes.

    Linux's ru_maxrss survives exec and so reports the *parent's* peak when that was larger (a tuner
    holding a study easily is); VmHWM belongs to this address space alone. macOS reports bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _measure(request: dict[str, Any]) -> dict[str, Any]:
    from .engine import captured_log, last_error, load_llama, parse_buffers

    settings = Settings.from_dict(request["settings"])
    work = Workload(**request["workload"])
    base_rss = _peak_rss()
    t0 = time.perf_counter()
    with captured_log(echo=True) as lines:
        try:
            draft = None
            if settings.draft_model:
                from .draft import GreedyDraft

                draft = GreedyDraft(settings.draft_model, settings)
            # With a draft, the library keeps a logits row per evaluated token, but sizes its score array
            # by n_batch unless logits_all is passed: a prompt longer than a batch would overflow it.
            llm = load_llama(request["model"], settings, verbose=True, draft_model=draft, logits_all=draft is not None)
            failure = ""
        except Exception as e:
            failure = str(e) or type(e).__name__
    if failure:
        return {"ok": False, "error": f"the engine refused these settings: {last_error(lines) or failure}"}
    load_s = time.perf_counter() - t0
    buffers = parse_buffers(lines).to_dict()
    _inject_fault(int(request.get("index", 0)))

    text = prompt_text(work.prompt_kind)
    tokens = llm.tokenize(text.encode())
    while len(tokens) < work.prompt_tokens:
        tokens += llm.tokenize(text.encode(), add_bos=False)
    prompt = tokens[: work.prompt_tokens]
    if work.prompt_tokens + work.gen_tokens > settings.n_ctx:
        return {"ok": False, "error": f"n_ctx {settings.n_ctx} is smaller than prompt + generated tokens"}

    def one_pass(n_prompt: int, n_gen: int) -> tuple[float, float, float, list[int]]:
        llm.reset()
        if draft is not None:
            draft.reset()
        out: list[int] = []
        start = time.perf_counter()
        first = start
        for tok in llm.generate(prompt[:n_prompt], top_k=1, temp=0.0, repeat_penalty=1.0):
            out.append(int(tok))
            if len(out) == 1:
                first = time.perf_counter()
            if len(out) >= n_gen:
                break
        end = time.perf_counter()
        ttft = first - start
        decode = (len(out) - 1) / (end - first) if len(out) > 1 and end > first else 0.0
        return ttft, n_prompt / ttft, decode, out

    one_pass(min(16, len(prompt)), 2)  # warm-up: page in weights, build graphs
    samples = [one_pass(len(prompt), work.gen_tokens) for _ in range(work.reps)]
    m = {
        "ok": True,
        "error": "",
        "prefill_tps": [s[1] for s in samples],
        "decode_tps": [s[2] for s in samples],
        "ttft_s": [s[0] for s in samples],
        "load_s": load_s,
        "wall_s": 0.0,
        "peak_rss": _peak_rss(),
        "base_rss": base_rss,
        "peak_vram": None,
        "buffers": buffers,
        "draft": draft.stats() if draft is not None else {},
        "output_tokens": samples[-1][3],
    }
    return {"ok": True, "measurement": m}


def kv_divergence(
    model_path: str, pairs: list[tuple[str, str]], base: Settings, n_tokens: int = 256, timeout: float = 600.0
) -> dict[str, dict[str, float]]:
    """How far each quantized (K, V) cache pair moves the model's next-token distributions from an f16
    cache on the fixed text: top-1 agreement and mean KL(f16 || quantized), keyed "k/v".

    Runs in a child process like every engine run; a pair the engine refuses is reported with an error.
    """
    request = {"mode": "divergence", "model": model_path, "settings": base.to_dict(),
               "pairs": [list(p) for p in pairs], "tokens": n_tokens}
    done = subprocess.run([sys.executable, "-m", "autotune.runner"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout)
    result = _parse_result(done.stdout)
    if done.returncode != 0 or result is None or not result.get("ok"):
        reason = (result or {}).get("error") or _failure_reason(done.returncode, done.stdout, done.stderr, result)
        return {f"{k}/{v}": {"error": reason} for k, v in pairs}
    return result["divergence"]


def _divergence(request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from .engine import load_llama, mark

    base = Settings.from_dict(request["settings"]).replace(flash_attn=True, draft_model=None)
    n = int(request["tokens"])

    def log_probs(type_k: str, type_v: str) -> Any:
        s = base.replace(type_k=type_k, type_v=type_v, n_ctx=max(base.n_ctx, 512))
        mark(f"the {'f16 reference' if (type_k, type_v) == ('f16', 'f16') else f'{type_k}/{type_v}'} cache", phase=True)
        llm = load_llama(request["model"], s, verbose=False, logits_all=True)
        tokens = llm.tokenize(prompt_text("prose").encode())[:n]
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
        llm.close()
        logits -= logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    ref = log_probs("f16", "f16")
    out: dict[str, dict[str, float]] = {}
    for k, v in request["pairs"]:
        try:
            lp = log_probs(k, v)
        except Exception as e:
            out[f"{k}/{v}"] = {"error": str(e)}
            continue
        kl = (np.exp(ref) * (ref - lp)).sum(axis=1)
        out[f"{k}/{v}"] = {
            "top1_agreement": float((ref.argmax(axis=1) == lp.argmax(axis=1)).mean()),
            "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()),
            "tokens": int(len(kl)),
        }
    return {"ok": True, "divergence": out}


def _exit_with_parent() -> None:
    """If the tuner dies (kill -9), end this engine process too rather than hold memory as an orphan."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _child_main() -> int:
    from .engine import instrument

    _exit_with_parent()
    instrument()
    request = json.loads(sys.stdin.read())
    try:
        result = _divergence(request) if request.get("mode") == "divergence" else _measure(request)
    except Exception as e:  # report, don't crash: the parent turns this into a failed trial
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(_child_main())
