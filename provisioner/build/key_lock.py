"""One OS file lock per env key, held across plan, build and promote.

The lock file lives in ``<home>/locks/``, outside every env, and is never
deleted (deleting a lock file is how two processes end up holding "the same"
lock). A waiter logs every few seconds and gives up after ``timeout`` seconds
with an error that names the lock file. Threads of one process serialise on a
per-key ``threading.Lock`` first, so a GUI that resolves from several threads
neither deadlocks nor relies on flock semantics between threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from provisioner.errors import LockTimeoutError

log = logging.getLogger(__name__)
WAIT_LOG_INTERVAL_S = 3.0

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(str(path.absolute()), threading.Lock())


def _acquire_thread_lock(
    lock: threading.Lock, key: str, path: Path, deadline: float | None
) -> None:
    while True:
        wait = WAIT_LOG_INTERVAL_S
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - time.monotonic()))
        if lock.acquire(timeout=wait):
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise _timeout_error(key, path)
        log.info("waiting for another thread building %s", key)


def _file_lock(path: Path) -> FileLock:
    # A soft-lock fallback would silently stop excluding other processes, and a
    # deleted lock file lets a late waiter lock a different inode.
    return FileLock(
        str(path), is_singleton=False, thread_local=False,
        fallback_to_soft=False, preserve_lock_file=True,
    )


def _timeout_error(key: str, path: Path) -> LockTimeoutError:
    return LockTimeoutError(
        f"timed out waiting for the lock of {key} ({path})",
        hint="another process is building this env; wait, or raise --lock-timeout",
    )


@contextmanager
def hold_key_lock(key: str, path: Path, *, timeout: float | None = None) -> Iterator[float]:
    """Hold the lock of ``key`` at ``path``; yields the seconds spent waiting.

    ``timeout=None`` waits forever; ``0`` fails at once if the lock is taken.
    """
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    path.parent.mkdir(parents=True, exist_ok=True)
    tlock = _thread_lock(path)
    _acquire_thread_lock(tlock, key, path, deadline)
    try:
        flock = _file_lock(path)
        while True:
            wait = WAIT_LOG_INTERVAL_S
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            try:
                flock.acquire(timeout=wait, poll_interval=0.05)
                break
            except Timeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise _timeout_error(key, path) from None
                log.info("waiting for another process building %s", key)
        try:
            yield time.monotonic() - start
        finally:
            flock.release()
    finally:
        tlock.release()


def is_key_locked(path: Path) -> bool:
    """Whether another process holds the lock at ``path`` right now (non-blocking probe)."""
    if not path.exists():
        return False
    tlock = _thread_lock(path)
    if not tlock.acquire(blocking=False):
        return True
    try:
        flock = _file_lock(path)
        try:
            flock.acquire(timeout=0)
        except Timeout:
            return True
        flock.release()
        return False
    finally:
        tlock.release()
