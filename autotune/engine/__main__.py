"""The engine child process: reads JSON requests on stdin, one per line, and answers each with one result line
(``RESULT_MARK`` + JSON) on stdout, until stdin closes. Only ``process`` starts it, through ``process.CHILD``,
which loads the engine's library before this module (and numpy, gguf, ...) is imported."""

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
    from . import faults
    from .child import Session, serve

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _exit_with_parent()
    session = Session(faults.from_env())
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = serve(json.loads(line), session)
        except Exception as e:  # report, don't crash: the parent turns this into a failed run with this reason
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
        sys.stdout.flush()
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
