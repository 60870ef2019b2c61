"""The engine child process: ``python -m autotune.engine`` reads one JSON request on stdin and writes one
result line (``RESULT_MARK`` + JSON) on stdout. Only ``process.spawn`` starts it."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from .base import RESULT_MARK


def _exit_with_parent() -> None:
    """If the tuner dies (kill -9), end this engine process too rather than hold memory as an orphan."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main() -> int:
    from . import bundled, faults

    _exit_with_parent()
    faults.instrument()
    request = json.loads(sys.stdin.read())
    try:
        result = bundled.serve(request)
    except Exception as e:  # report, don't crash: the parent turns this into a failed run with this reason
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
