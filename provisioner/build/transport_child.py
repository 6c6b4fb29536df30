"""The S3 download child: ``python -m provisioner.build.transport_child``.

Reads one request (JSON, from :func:`provisioner.build.transport._in_child`) on
stdin, downloads it with :func:`provisioner.build.transport.serve_child`, and
prints ``bytes N`` lines, a ``tick`` every 50 ms (so that the parent can cancel
it) and one ``result {...}`` line. It ends with ``os._exit``: with py-rattler
0.28 an interpreter that used S3 crashes while it shuts down.
"""

from __future__ import annotations

import json
import os
import sys
import threading


def child_main() -> int:
    """Entry point of ``python -m provisioner.build.transport_child``."""
    request = json.loads(sys.stdin.read())
    lock = threading.Lock()
    finished = threading.Event()

    def say(line: str) -> None:
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def ticker() -> None:
        while not finished.wait(0.05):
            say("tick")

    threading.Thread(target=ticker, daemon=True).start()
    from provisioner.build.transport import serve_child

    try:
        serve_child(request, say)
    finally:
        finished.set()
    return 0


if __name__ == "__main__":
    code = child_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown (see the module docstring)
