"""Engine child processes, supervised: a request in as a JSON line, one result out, whatever happens in between.

A crash, abort, out-of-memory kill or hang inside the engine takes down only the child; the parent gets a
``Spawned`` saying how the request ended (result, exit status, stderr, time, peak GPU memory) and the engine
module turns that into a Measurement or an error with a specific reason. The child runs in its own process
group, so a timeout kills everything it started, and it exits when the tuner dies. A ``Worker`` keeps one child
for several requests (a model load shared by runs); ``spawn`` uses a fresh child for one.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .base import REP_MARK, RESULT_MARK, child_failure


@dataclass
class Spawned:
    """How one request to a child ended."""

    result: dict[str, Any] | None  # the child's result line, when it wrote one (and, if it exited, cleanly)
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool = False
    peak_vram: int | None = None
    gpus: tuple[str, ...] = ()  # the GPUs the peak was read on (NVML names)
    reps: list[dict[str, Any]] = field(default_factory=list)  # what the child reported per repetition
    stopped: bool = False  # the parent's ``on_rep`` stopped it after ``reps``

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
        self._vram_base: int | None = None

    def _start(self, watch_vram: bool) -> subprocess.Popen[str]:
        self._vram_base = _VramWatch.used_now() if watch_vram else None  # before the child: not ours
        self._out, self._err, self._lines = [], [], queue.Queue()
        proc = subprocess.Popen(
            [sys.executable, "-c", self.prelude + CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # so a timeout can kill the whole group, and Ctrl-C reaches only us
        )
        self._readers = [threading.Thread(target=_read, args=(proc.stdout, self._out, self._lines), daemon=True),
                         threading.Thread(target=_read, args=(proc.stderr, self._err, None), daemon=True)]
        for t in self._readers:
            t.start()
        self.proc = proc
        return proc

    def ask(self, request: dict[str, Any], timeout: float, watch_vram: bool = False,
            on_rep: Callable[[dict[str, Any]], bool] | None = None, last: bool = False) -> Spawned:
        """Send ``request`` and wait for its answer; never raises for what the child does (a KeyboardInterrupt
        kills the child, then propagates). ``last``: the child exits after answering.

        Each repetition the child reports (a ``REP_MARK`` line) goes to ``on_rep`` in this thread as it
        arrives; when that returns False the child is killed there and then (a pruned trial costs only the
        repetitions it ran)."""
        start = time.perf_counter()
        proc = self.proc or self._start(watch_vram)
        out_from, err_from = len(self._out), len(self._err)
        vram = _VramWatch(self._vram_base) if watch_vram else None
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
                    reps.append(json.loads(line[len(REP_MARK):]))
                    if on_rep is not None and not on_rep(reps[-1]):
                        stopped = True
                        self._kill()
                elif line.startswith(RESULT_MARK) and not (stopped or timed_out):
                    try:
                        result = json.loads(line[len(RESULT_MARK):])
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
            peak_vram = vram.stop() if vram else None
        stdout, stderr = "".join(self._out[out_from:]), "".join(self._err[err_from:])
        return Spawned(result if returncode == 0 else None, returncode, stdout, stderr, time.perf_counter() - start,
                       timed_out=timed_out, peak_vram=peak_vram, gpus=vram.names if vram else (), reps=reps,
                       stopped=stopped)

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


def spawn(request: dict[str, Any], timeout: float, watch_vram: bool = False,
          on_rep: Callable[[dict[str, Any]], bool] | None = None) -> Spawned:
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
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _VramWatch:
    """Peak GPU memory in use during a run, over ``base`` (what was in use before the child started; NVML,
    none without GPUs)."""

    def __init__(self, base: int | None, interval: float = 0.05) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        self._handles = _nvml_handles()
        self.names: tuple[str, ...] = ()
        if not self._handles:
            return
        import pynvml

        self.names = tuple(_text(pynvml.nvmlDeviceGetName(h)) for h in self._handles)
        self._base = self._used() if base is None else base
        self.peak = 0
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def used_now() -> int | None:
        """GPU memory in use on every GPU now; None without NVML."""
        handles = _nvml_handles()
        if not handles:
            return None
        try:
            return _VramWatch._sum(handles)
        finally:
            _nvml_shutdown()

    @staticmethod
    def _sum(handles: list[Any]) -> int:
        import pynvml

        return sum(int(pynvml.nvmlDeviceGetMemoryInfo(h).used) for h in handles)

    def _used(self) -> int:
        return self._sum(self._handles)

    def _poll(self, interval: float) -> None:
        while True:
            self.peak = max(self.peak or 0, self._used() - self._base)
            if self._stop.wait(interval):
                return

    def stop(self) -> int | None:
        self._stop.set()
        if self._handles:
            self._thread.join()
            _nvml_shutdown()
        return self.peak


def _nvml_handles() -> list[Any]:
    """Handles of every NVIDIA GPU (NVML initialised: shut it down after), or [] where there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        return []


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_shutdown() -> None:
    import pynvml

    pynvml.nvmlShutdown()
