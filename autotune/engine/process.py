"""Engine child processes, supervised: one request in as JSON, one result out, whatever happens in between.

A crash, abort, out-of-memory kill or hang inside the engine takes down only the child; the parent gets a
``Spawned`` saying how it ended (result, exit status, stderr tail, time, peak GPU memory) and the engine
module turns that into a Measurement or an error with a specific reason. The child runs in its own
process group, so a timeout kills everything it started, and it exits when the tuner dies.
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
    """How one child process ended."""

    result: dict[str, Any] | None  # the child's result line, when it wrote one and exited cleanly
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool = False
    peak_vram: int | None = None
    reps: list[dict[str, Any]] = field(default_factory=list)  # what the child reported per repetition
    stopped: bool = False  # the parent's ``on_rep`` stopped it after ``reps``

    def failure(self) -> str:
        """Why there is no result, in one line."""
        if self.returncode != 0:
            return child_failure(self.returncode, self.stderr)
        junk = self.stdout.strip().splitlines()[-1][:80] if self.stdout.strip() else "nothing"
        return f"no result from the engine process (it printed {junk!r})"


def spawn(request: dict[str, Any], timeout: float, watch_vram: bool = False,
          on_rep: Callable[[dict[str, Any]], bool] | None = None) -> Spawned:
    """Run ``python -m autotune.engine`` on ``request``; never raises for what the child does (a
    KeyboardInterrupt kills the child, then propagates).

    Each repetition the child reports (a ``REP_MARK`` line) goes to ``on_rep`` in this thread as it
    arrives; when that returns False the child is killed there and then (a pruned trial costs only the
    repetitions it ran)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "autotune.engine"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a timeout can kill the whole group, and Ctrl-C reaches only us
    )
    vram = _VramWatch() if watch_vram else None
    out: list[str] = []
    err: list[str] = []
    lines: queue.Queue[str | None] = queue.Queue()
    readers = [threading.Thread(target=_read, args=(proc.stdout, out, lines), daemon=True),
               threading.Thread(target=_read, args=(proc.stderr, err, None), daemon=True)]
    for t in readers:
        t.start()
    reps: list[dict[str, Any]] = []
    stopped = timed_out = False
    try:
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(request))
            proc.stdin.close()
        except BrokenPipeError:  # the child died before reading: its exit status says why
            pass
        deadline = start + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                timed_out = True
                _kill_group(proc)
                break
            if line is None:  # the child closed its stdout: it is ending
                break
            if line.startswith(REP_MARK) and not stopped:
                reps.append(json.loads(line[len(REP_MARK):]))
                if on_rep is not None and not on_rep(reps[-1]):
                    stopped = True
                    _kill_group(proc)
        try:  # a child that closed its output but hangs on its way out is killed at the same deadline
            proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
    except BaseException:  # KeyboardInterrupt included: never leave an engine running behind us
        _kill_group(proc)
        proc.wait()
        raise
    finally:
        peak_vram = vram.stop() if vram else None
        for t in readers:
            t.join()
    stdout, stderr = "".join(out), "".join(err)
    result = _parse_result(stdout) if proc.returncode == 0 else None
    return Spawned(result, proc.returncode, stdout, stderr, time.perf_counter() - start, timed_out=timed_out,
                   peak_vram=peak_vram, reps=reps, stopped=stopped)


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


def _parse_result(out: str) -> dict[str, Any] | None:
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            try:
                return json.loads(line[len(RESULT_MARK):])
            except json.JSONDecodeError:
                return None
    return None


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
