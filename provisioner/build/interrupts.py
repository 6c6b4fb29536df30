"""SIGTERM during a build behaves like Ctrl-C: it unwinds, and cleanup runs.

Python turns SIGINT into ``KeyboardInterrupt``; SIGTERM's default kills the
process on the spot, leaving the staging dir and the installer child's partial
cache entries behind. While a build runs, SIGTERM raises
:class:`~provisioner.errors.Interrupted` instead, but only in the main thread
and only where nobody else handles SIGTERM: a host app's own handler wins.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from provisioner.errors import Interrupted


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn the first SIGTERM into ``Interrupted(SIGTERM)``; later ones wait for cleanup."""
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield
        return
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:  # a second SIGTERM must not cut the cleanup of the first short
            raised = True
            raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
