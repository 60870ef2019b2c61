"""Engine child processes, supervised: a request in as a JSON line, one result out, whatever happens in between.

A crash, abort, out-of-memory kill or hang inside the engine takes down only the child; the parent gets a
``Spawned`` saying how the request ended (result, exit status, stderr, time, peak GPU memory) and the engine
module turns that into a Measurement or an error with a specific reason. The child runs in its own process
group, so a timeout kills everything it started, and it exits when the tuner dies. A ``Worker`` keeps one child
for several requests (a model load shared by runs); ``spawn`` uses a fresh child for one.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import REP_MARK, RESULT_MARK, GpuPeak, child_failure


@dataclass
class Spawned:
    """How one request to a child ended."""

    result: dict[str, Any] | None  # the child's result line, when it wrote one (and, if it exited, cleanly)
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool = False
    gpu_peaks: list[GpuPeak] = field(default_factory=list)  # per visible GPU (NVML), none without one
    reps: list[dict[str, Any]] = field(default_factory=list)  # what the child reported per repetition
    stopped: bool = False  # the parent's ``on_rep`` stopped it after ``reps``

    @property
    def peak_vram(self) -> int | None:
        """Bytes, all GPUs together; None without one."""
        return sum(g.peak for g in self.gpu_peaks) if self.gpu_peaks else None

    def failure(self) -> str:
        """Why there is no result, in one line."""
        if self.returncode != 0:
            return child_failure(self.returncode, self.stderr)
        junk = self.stdout.strip().splitlines()[-1][:80] if self.stdout.strip() else "nothing"
        return f"no result from the engine process (it printed {junk!r})"


# How a child starts: the engine's library is loaded before anything else. On a build whose compiler's libstdc++
# is not the system's (a CUDA build with another GCC, a conda toolchain), a model load dies in the vocabulary's
# std::regex whenever numpy, gguf or sentencepiece brought the system libstdc++ into the process first; the
# package inits of ``autotune.engine`` import those, so the child cannot be started as ``-m autotune.engine``.
CHILD = "import llama_cpp\nfrom autotune.engine.__main__ import main\nraise SystemExit(main())"


class Worker:
    """One engine child answering requests one after another. A request that fails, times out or is stopped
    ends the child; the next request starts a new one. ``spawn`` is a worker for one request."""

    def __init__(self, prelude: str = "") -> None:
        self.prelude = prelude  # code run before the child's own (``diagnose`` loads libstdc++ first with it)
        self.proc: subprocess.Popen[str] | None = None
        self._out: list[str] = []
        self._err: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._vram_base: dict[str, int] | None = None

    def _start(self, watch_vram: bool) -> subprocess.Popen[str]:
        self._vram_base = VramWatch.device_use() if watch_vram else None  # before the child: not ours
        self._out, self._err, self._lines = [], [], queue.Queue()
        proc = subprocess.Popen(
            [sys.executable, "-c", self.prelude + CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # so a timeout can kill the whole group, and Ctrl-C reaches only us
        )
        self._readers = [
            threading.Thread(target=_read, args=(proc.stdout, self._out, self._lines), daemon=True),
            threading.Thread(target=_read, args=(proc.stderr, self._err, None), daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.proc = proc
        return proc

    def ask(
        self,
        request: dict[str, Any],
        timeout: float,
        watch_vram: bool = False,
        on_rep: Callable[[dict[str, Any]], bool] | None = None,
        last: bool = False,
    ) -> Spawned:
        """Send ``request`` and wait for its answer; never raises for what the child does (a KeyboardInterrupt
        kills the child, then propagates). ``last``: the child exits after answering.

        Each repetition the child reports (a ``REP_MARK`` line) goes to ``on_rep`` in this thread as it
        arrives; when that returns False the child is killed there and then (a pruned trial costs only the
        repetitions it ran)."""
        start = time.perf_counter()
        proc = self.proc or self._start(watch_vram)
        out_from, err_from = len(self._out), len(self._err)
        vram = VramWatch(proc.pid, self._vram_base) if watch_vram else None
        reps: list[dict[str, Any]] = []
        result: dict[str, Any] | None = None
        stopped = timed_out = ended = False
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps(request) + "\n")
                proc.stdin.flush()
                if last:
                    proc.stdin.close()
            except BrokenPipeError:  # the child died before reading: its exit status says why
                pass
            deadline = start + timeout
            while True:
                killed = timed_out or stopped  # then its output ends soon: wait for that
                try:
                    line = self._lines.get(timeout=None if killed else max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    timed_out = True
                    self._kill()
                    continue
                if line is None:  # the child closed its stdout: it is ending
                    ended = True
                    break
                if line.startswith(REP_MARK) and not stopped:
                    reps.append(json.loads(line[len(REP_MARK) :]))
                    if on_rep is not None and not on_rep(reps[-1]):
                        stopped = True
                        self._kill()
                elif line.startswith(RESULT_MARK) and not (stopped or timed_out):
                    try:
                        result = json.loads(line[len(RESULT_MARK) :])
                    except json.JSONDecodeError:
                        result = None
                    if not last:
                        break
            returncode = 0
            if ended or last:
                try:  # a child that closed its output but hangs on its way out is killed at the same deadline
                    proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    self._kill()
                returncode = self._reap()
        except BaseException:  # KeyboardInterrupt included: never leave an engine running behind us
            self._kill()
            self._reap()
            raise
        finally:
            gpu_peaks = vram.stop() if vram else []
        stdout, stderr = "".join(self._out[out_from:]), "".join(self._err[err_from:])
        return Spawned(
            result if returncode == 0 else None,
            returncode,
            stdout,
            stderr,
            time.perf_counter() - start,
            timed_out=timed_out,
            gpu_peaks=gpu_peaks,
            reps=reps,
            stopped=stopped,
        )

    def _kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)

    def _reap(self) -> int:
        """Wait for the child to be gone and its output read; its exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        proc.wait()
        for t in self._readers:
            t.join()
        return proc.returncode

    def close(self) -> None:
        """End the child: stdin closed, a few seconds to exit, then killed."""
        proc = self.proc
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._kill()
        self._reap()


def spawn(
    request: dict[str, Any],
    timeout: float,
    watch_vram: bool = False,
    on_rep: Callable[[dict[str, Any]], bool] | None = None,
) -> Spawned:
    """Run one request in a fresh engine child (``Worker.ask`` with ``last``)."""
    return Worker().ask(request, timeout, watch_vram, on_rep, last=True)


def _read(stream: Any, into: list[str], lines: queue.Queue[str | None] | None) -> None:
    """Collect a child's stream (a thread per stream, so neither pipe fills up and blocks the child)."""
    for line in stream:
        into.append(line)
        if lines is not None:
            lines.put(line)
    if lines is not None:
        lines.put(None)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


class VramWatch:
    """Peak GPU memory of one engine process while it runs, per visible GPU (NVML; none without GPUs): an engine
    child serving a request, a llama-bench run, a llama-server under load.

    The child's own use where NVML accounts per process (the entries of its process group in the GPU's running
    processes): another program allocating during the run does not count. Where NVML never shows the child (a
    container's PID namespace, a driver without accounting), each GPU's use less ``base`` (what was in use before
    the child started); every record says which it is."""

    def __init__(self, pid: int, base: dict[str, int] | None, interval: float = 0.05) -> None:
        self._stop = threading.Event()
        self._gpus = _visible_gpus()
        if not self._gpus:
            return
        self._pid = pid
        try:
            self._group = os.getpgid(pid)
        except OSError:  # already gone: only its own entries can match
            self._group = -1
        self._base = base if base is not None else _use(self._gpus)
        self._own = {g.device: 0 for g in self._gpus}
        self._device = {g.device: 0 for g in self._gpus}
        self._seen = False  # NVML listed the child with its memory on some GPU
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def device_use() -> dict[str, int] | None:
        """Memory in use on each visible GPU now; None without NVML."""
        gpus = _visible_gpus()
        if not gpus:
            return None
        try:
            return _use(gpus)
        finally:
            _nvml_shutdown()

    def _poll(self, interval: float) -> None:
        while True:
            used = _use(self._gpus)
            for g in self._gpus:
                self._device[g.device] = max(self._device[g.device], used[g.device] - self._base.get(g.device, 0))
                own = self._child_use(g.handle)
                if own is not None:
                    self._seen = True
                    self._own[g.device] = max(self._own[g.device], own)
            if self._stop.wait(interval):
                return

    def _child_use(self, handle: Any) -> int | None:
        """Bytes the child's process group holds on one GPU; None where NVML lists none of it with its memory."""
        import pynvml

        found: dict[int, int] = {}
        for query in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                listed = query(handle)
            except Exception:  # not supported here: the other list, or the device-wide reading
                continue
            for p in listed:
                if p.usedGpuMemory is not None and self._ours(p.pid):
                    found[p.pid] = max(found.get(p.pid, 0), int(p.usedGpuMemory))
        return sum(found.values()) if found else None

    def _ours(self, pid: int) -> bool:
        if pid == self._pid:
            return True
        try:
            return os.getpgid(pid) == self._group
        except OSError:  # gone, or a PID of another namespace
            return False

    def stop(self) -> list[GpuPeak]:
        """End the watch: each visible GPU's peak, the child's own where NVML showed it anywhere."""
        self._stop.set()
        if not self._gpus:
            return []
        self._thread.join()
        _nvml_shutdown()
        peaks = self._own if self._seen else self._device
        source = "process" if self._seen else "device"
        return [GpuPeak(g.device, g.name, g.driver, peaks[g.device], source) for g in self._gpus]


@dataclass(frozen=True)
class _Gpu:
    device: str  # CUDA0, CUDA1 ...: the engine's name for it
    handle: Any
    name: str
    driver: str


def _visible_gpus() -> list[_Gpu]:
    """The NVIDIA GPUs the engine child sees, in its order (NVML initialised: shut it down after), or []."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        order = visible(os.environ.get("CUDA_VISIBLE_DEVICES"), [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles])
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = [
            _Gpu(f"CUDA{i}", handles[j], _text(pynvml.nvmlDeviceGetName(handles[j])), driver)
            for i, j in enumerate(order)
        ]
    except Exception:
        gpus = []
    if not gpus:
        _nvml_shutdown()
    return gpus


def visible(spec: str | None, uuids: list[str]) -> list[int]:
    """NVML indices of the GPUs ``CUDA_VISIBLE_DEVICES`` (``spec``) leaves visible, in CUDA's order: indices or
    GPU UUIDs (a unique prefix is enough), read as CUDA reads them, up to the first entry naming no GPU (MIG
    instances name none here). Unset: every GPU. An index counts in NVML's (PCI bus) order, which is CUDA's with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or identical GPUs."""
    if spec is None:
        return list(range(len(uuids)))
    out: list[int] = []
    for item in (x.strip() for x in spec.split(",")):
        if item.lstrip("-").isdigit():
            matches = [int(item)] if 0 <= int(item) < len(uuids) else []
        else:
            matches = [i for i, u in enumerate(uuids) if item and u.lower().startswith(item.lower())]
        if len(matches) != 1 or matches[0] in out:
            break
        out.append(matches[0])
    return out


def _use(gpus: list[_Gpu]) -> dict[str, int]:
    import pynvml

    return {g.device: int(pynvml.nvmlDeviceGetMemoryInfo(g.handle).used) for g in gpus}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_shutdown() -> None:
    import pynvml

    pynvml.nvmlShutdown()
