"""The llama.cpp people deploy as engines: the user's own ``llama-bench`` or ``llama-server`` binary runs each
measurement, in a fresh process per run like the bundled engine's child. Memory (the dry run, real loads) and
K/V divergence still come from the bundled engine, which vendors the same llama.cpp.

* ``llama-bench:PATH`` measures prefill and decode with llama-bench's own timers (``-o json``, ``-d`` for
  the depth); its time to first token is the prompt's prefill time, which is what llama-bench can see.
* ``llama-server:PATH`` starts the server with the exported flags and sends ``/completion`` requests with the
  prompt as token ids: prefill and decode from the server's timings, time to first token as a client sees
  it (the first streamed chunk).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from ..facts.probe import BuildInfo
from ..vocabulary.errors import SettingsError
from ..vocabulary.settings import Settings
from . import bundled
from .base import (
    GpuPeak,
    Measurement,
    OnRep,
    Workload,
    child_failure,
    llama_cpp_defaults,
    prompt_text,
)
from .process import VramWatch

KINDS = ("llama-bench", "llama-server")


def parse(spec: str) -> tuple[str, Path]:
    """``llama-bench:PATH`` or ``llama-server:PATH`` (``bundled`` is the default engine, not this)."""
    kind, _, path = spec.partition(":")
    if kind not in KINDS or not path:
        raise SettingsError(f"--engine {spec!r}: expected llama-bench:PATH or llama-server:PATH (or bundled)")
    p = Path(path).expanduser()
    if not p.is_file() or not os.access(p, os.X_OK):
        raise SettingsError(f"--engine {spec!r}: {p} is not an executable file")
    return kind, p


@dataclass(frozen=True)
class Tool:
    """One external binary as an engine (``base.Engine``)."""

    kind: str  # llama-bench or llama-server
    path: Path

    @property
    def name(self) -> str:
        return f"{self.kind} ({self.path})"

    def build_info(self) -> BuildInfo:
        return _version(str(self.path))

    def build_key(self) -> str:
        st = self.path.stat()
        return hashlib.sha256(f"{self.path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]

    def defaults(self, n_ctx: int) -> Settings:
        return llama_cpp_defaults(n_ctx)

    def dry_run(self, model_path: str, settings: list[Settings], timeout: float = 300) -> list[Any]:
        return bundled.dry_run(model_path, settings, timeout)

    def loaded_buffers(self, model_path: str, settings: Settings, timeout: float = 300) -> dict[str, int]:
        return bundled.loaded_buffers(model_path, settings, timeout)

    def divergence(
        self, model_path: str, pairs: list[tuple[str, str]], base: Settings, n_tokens: int = 256, timeout: float = 600.0
    ) -> dict[str, dict[str, Any]]:
        return bundled.divergence(model_path, pairs, base, n_tokens, timeout)

    def measure(
        self,
        model_path: str,
        settings: Settings,
        workload: Workload = Workload(),
        timeout: float = 300.0,
        index: int = 0,
        on_rep: OnRep | None = None,
    ) -> Measurement:
        """One run of the tool; it reports every repetition at once, so ``on_rep`` is never called."""
        if settings.spec_type != "none":
            return Measurement(
                settings,
                False,
                f"{self.kind} as an engine measures the main model alone "
                "(speculation is measured by the speculation stage)",
            )
        if self.kind == "llama-bench":
            return _bench(self.path, model_path, settings, workload, timeout)
        return _server(self.path, model_path, settings, workload, timeout)


@lru_cache(maxsize=8)
def _version(path: str) -> BuildInfo:
    """From the binary itself: ``--version`` (version, commit, compiler) and its device list."""
    done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    text = (done.stdout + done.stderr).strip()
    listed = subprocess.run([path, "--list-devices"], capture_output=True, text=True, timeout=60)
    devices = (listed.stdout + listed.stderr).strip()
    m = re.search(r"version: (\S+.*?)\n", text + "\n")
    backend = next((b for b in ("cuda", "metal", "vulkan", "hip", "sycl") if b in devices.lower()), "cpu")
    return BuildInfo(m.group(1) if m else "unknown", backend, backend != "cpu", (), f"{text}\n{devices}")


class PeakRss:
    """The largest resident set a child process reaches, sampled every 50 ms until it ends."""

    def __init__(self, pid: int) -> None:
        import threading

        self.peak = 0
        self._pid = pid
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self._pid)
            while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.05)  # a sampling period, not a wait for anything
        except psutil.Error:
            pass

    def stop(self) -> int:
        self._thread.join(timeout=1)
        return self.peak


def _run(argv: list[str], timeout: float) -> tuple[int, str, str, int, list[GpuPeak], float]:
    """(exit status, stdout, stderr, peak RSS bytes, peak GPU memory per GPU, seconds) of a child, its group killed
    at the timeout."""
    start = time.perf_counter()
    base = VramWatch.device_use()  # before the child: not its own
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    rss, vram = PeakRss(proc.pid), VramWatch(proc.pid, base)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        err += f"\ntimeout: no result after {timeout:.0f} s (killed)"
        return -9, out, err, rss.stop(), vram.stop(), time.perf_counter() - start
    return proc.returncode, out, err, rss.stop(), vram.stop(), time.perf_counter() - start


def moe_layers(model: str, s: Settings) -> tuple[int, ...] | None:
    """The model's expert layers where the settings keep the last N layers' experts on the host (llama.cpp's tools
    name them layer by layer, ``flags.overrides``); None where the flags need no model facts."""
    if not s.experts_by_layer() or s.moe_host_layers:
        return None
    from ..facts.gguf_model import read_facts

    return read_facts(model).moe_layers


def _bench(binary: Path, model: str, s: Settings, w: Workload, timeout: float) -> Measurement:
    from ..vocabulary.flags import bench_flags

    argv = [str(binary), *bench_flags(s, model, w.prompt_tokens, w.gen_tokens, w.depth, w.reps, moe_layers(model, s))]
    code, out, err, rss, gpus, wall = _run(argv, timeout)
    if code != 0:
        reason = err.strip().splitlines()[-1] if code == -9 else child_failure(code, err)
        return Measurement(s, False, f"llama-bench: {reason}", wall_s=wall)
    try:
        rows = json.loads(out)
        pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
        tg = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    except (ValueError, StopIteration, KeyError, TypeError):
        return Measurement(s, False, f"llama-bench printed no results ({out.strip()[:80]!r})", wall_s=wall)
    prefill = [float(x) for x in pp["samples_ts"]]
    return Measurement(
        s,
        True,
        prefill_tps=prefill,
        decode_tps=[float(x) for x in tg["samples_ts"]],
        ttft_s=[w.prompt_tokens / x for x in prefill],
        wall_s=wall,
        peak_rss=rss,
        peak_vram=sum(g.peak for g in gpus) if gpus else None,
        gpu_peaks=gpus,
    )


class Server:
    """llama-server on a free loopback port with ``flags``, its log in a file, its peak RSS sampled; ``with``
    stops it (SIGTERM, SIGKILL after 30 s) on the way out."""

    def __init__(self, binary: Path, flags: list[str]) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.start = time.perf_counter()
        base = VramWatch.device_use()  # before the server: not its own
        # a file, not a pipe: nobody reads the log while it runs; it is read after the server stops (its failure,
        # its acceptance lines), so it lives as long as this object
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(binary), *flags, "--host", "127.0.0.1", "--port", str(port), "--no-webui"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.rss = PeakRss(self.proc.pid)
        self.vram = VramWatch(self.proc.pid, base)
        self.gpu_peaks: list[GpuPeak] = []  # each GPU's peak while it ran, once stopped
        self.died: int | None = None  # its exit status, where it ended before we stopped it

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.gpu_peaks = self.vram.stop()
        self.died = self.proc.poll()
        if self.died is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()

    def healthy(self, timeout: float) -> bool:
        return wait_healthy(self.proc, self.url, self.start + timeout)

    def failure(self, what: str) -> str:
        """Why it failed, after the ``with`` block: how it died (from its log) where it died, else ``what``."""
        if not self.died:
            return f"llama-server {what}"
        self.log.seek(0)
        return f"llama-server {child_failure(self.died, self.log.read())}"


T = TypeVar("T")


def serve(
    binary: Path, flags: list[str], timeout: float, work: Callable[[str], T]
) -> tuple[Server, T | None, str, float]:
    """A fresh llama-server with ``flags``, once healthy given to ``work`` (its URL); never raises for a server
    that does not come up or stops answering: the stopped server, what ``work`` returned, "" or why it failed
    (``Server.failure`` tells how it died), and the seconds it took to come up."""
    error, result, load_s = "", None, 0.0
    with Server(binary, flags) as srv:
        try:
            if not srv.healthy(timeout):
                error = "did not come up"
            else:
                load_s = time.perf_counter() - srv.start
                result = work(srv.url)
        except (OSError, ValueError, KeyError) as e:
            error = f"stopped answering ({e})"
    return srv, result, error, load_s


def _server(binary: Path, model: str, s: Settings, w: Workload, timeout: float) -> Measurement:
    from ..vocabulary.flags import server_flags

    srv, samples, error, load_s = serve(
        binary, server_flags(s, model, moe_layers(model, s)), timeout, lambda url: _completions(url, w)
    )
    wall = time.perf_counter() - srv.start
    if error or samples is None:
        return Measurement(s, False, srv.failure(error), wall_s=wall)
    return Measurement(
        s,
        True,
        prefill_tps=[x[0] for x in samples],
        decode_tps=[x[1] for x in samples],
        ttft_s=[x[2] for x in samples],
        load_s=load_s,
        wall_s=wall,
        peak_rss=srv.rss.stop(),
        peak_vram=sum(g.peak for g in srv.gpu_peaks) if srv.gpu_peaks else None,
        gpu_peaks=srv.gpu_peaks,
    )


def _completions(url: str, w: Workload) -> list[tuple[float, float, float]]:
    """The workload's repetitions on a running server: (prefill tok/s, decode tok/s, seconds to first token)."""
    ids = post_json(url + "/tokenize", {"content": prompt_text(w.prompt_kind)})["tokens"]
    rounds = w.reps + 1  # a warm-up, then the repetitions
    while len(ids) < w.depth + rounds * w.prompt_tokens:
        ids += ids
    history = ids[: w.depth]
    body = {"n_predict": w.gen_tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": True}
    if history:  # the history every repetition starts from, left in the server's cache
        post_json(url + "/completion", {**body, "prompt": history, "n_predict": 0})
    # Each round sends the history and a prompt it has not seen: the server reuses the cached history
    # (its prefix match) and evaluates the whole prompt, as for a new turn of a conversation.
    return [
        _stream(
            url, {**body, "prompt": history + ids[w.depth + r * w.prompt_tokens : w.depth + (r + 1) * w.prompt_tokens]}
        )
        for r in range(rounds)
    ][1:]


def wait_healthy(proc: subprocess.Popen, url: str, deadline: float) -> bool:
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if get_json(url + "/health").get("status") == "ok":
                return True
        except (OSError, ValueError):
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):  # wait a moment: it may die, or the port may open
            proc.wait(timeout=0.1)
    return False


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _stream(url: str, body: dict[str, Any]) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, seconds to the first token) of one streamed completion."""
    req = urllib.request.Request(
        url + "/completion", json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    first, timings = 0.0, None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if not first and chunk.get("content") is not None:
                first = time.perf_counter() - start
            timings = chunk.get("timings") or timings
    if not timings:
        raise ValueError("no timings in the server's answer")
    return float(timings["prompt_per_second"]), float(timings["predicted_per_second"]), first


@dataclass
class Reply:
    """One greedy completion on a llama-server: its decode timing, the speculation counters of its timings
    (``draft_n`` proposed, ``draft_n_accepted`` kept) and the tokens it produced."""

    decode_tps: float
    predicted_n: int
    predicted_ms: float
    draft_n: int
    accepted: int
    tokens: list[int]
    mean_len: float | None = None  # the server log's "mean len": 1 + accepted tokens per verification step

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# llama-server logs, per finished request that drafted: "draft acceptance = 0.53571 (30 accepted / 56 generated),
# mean len = 5.29"
_ACCEPTANCE = re.compile(r"draft acceptance = [\d.]+ \(\s*(\d+) accepted /\s*(\d+) generated\), mean len =\s*([\d.]+)")


def speculative_replies(
    binary: Path, model: str, s: Settings, messages: list[str], n_predict: int, timeout: float
) -> tuple[list[Reply], str, float]:
    """A fresh llama-server with ``s`` (its speculation flags included) answers each user message once, in order,
    greedily, through the model's chat template (``/apply-template``; the raw text where it has none): the
    replies, "" or why it failed, and the seconds the server took to come up."""
    from ..vocabulary.flags import server_flags

    srv, replies, error, load_s = serve(
        binary,
        server_flags(s, model, moe_layers(model, s)),
        timeout,
        lambda url: [_greedy(url, text, n_predict) for text in messages],
    )
    if error or replies is None:
        return [], srv.failure(error), load_s
    srv.log.seek(0)
    lines = iter(_ACCEPTANCE.findall(srv.log.read()))
    for r in replies:  # one log line per reply that drafted, in order
        if r.draft_n and (line := next(lines, None)) and int(line[1]) == r.draft_n:
            r.mean_len = float(line[2])
    return replies, "", load_s


def _greedy(url: str, text: str, n_predict: int) -> Reply:
    try:
        prompt = post_json(url + "/apply-template", {"messages": [{"role": "user", "content": text}]})["prompt"]
    except (OSError, KeyError):  # no chat template: the message as it is
        prompt = text
    body = {
        "prompt": prompt,
        "n_predict": n_predict,
        "temperature": 0,
        "top_k": 1,
        "seed": 0,
        "cache_prompt": False,
        "return_tokens": True,
    }
    out = post_json(url + "/completion", body)
    t = out["timings"]
    return Reply(
        float(t["predicted_per_second"]),
        int(t["predicted_n"]),
        float(t["predicted_ms"]),
        int(t.get("draft_n", 0)),
        int(t.get("draft_n_accepted", 0)),
        [int(x) for x in out.get("tokens", [])],
    )
