"""The per-key lock: a real OS file lock between processes, a thread lock inside one."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from provisioner.build import key_lock as keylock
from provisioner.build.key_lock import hold_key_lock, is_key_locked
from provisioner.errors import LockTimeoutError, UserError

KEY = "sample-key"

# A second process that takes the lock the way provisioner does (or with bare filelock),
# says "locked", and lets go when its stdin closes; with a third argument it writes that
# marker file *before* letting go, so a waiter can prove the order holder-then-waiter.
_HOLDER = """
import sys
from pathlib import Path
def wait_then_mark():
    sys.stdin.read()
    if len(sys.argv) > 3:
        Path(sys.argv[3]).write_text("released")
if sys.argv[2] == "provisioner":
    from provisioner.build.key_lock import hold_key_lock
    with hold_key_lock("k", Path(sys.argv[1])):
        print("locked", flush=True)
        wait_then_mark()
else:
    from filelock import FileLock
    with FileLock(sys.argv[1]):
        print("locked", flush=True)
        wait_then_mark()
"""
WAITING = f"waiting for another process building {KEY}"


@contextmanager
def held_elsewhere(path: Path, how: str = "filelock",
                   marker: Path | None = None) -> Iterator[subprocess.Popen[str]]:
    extra = [] if marker is None else [str(marker)]
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), how, *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=10)


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "locks" / f"{KEY}.lock"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
         ) -> pytest.LogCaptureFixture:
    monkeypatch.setattr(logging.getLogger("provisioner"), "propagate", True)
    caplog.set_level(logging.INFO, logger="provisioner")
    return caplog


def _acquire_timeouts(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the timeout of every file-lock acquire attempt hold_key_lock makes."""
    calls: list[float] = []
    real = keylock._file_lock

    def spying(path: Path) -> FileLock:
        flock = real(path)
        acquire = flock.acquire

        def recorded(timeout: float | None = None, **kw: Any) -> Any:
            calls.append(-1.0 if timeout is None else float(timeout))
            return acquire(timeout=timeout, **kw)

        setattr(flock, "acquire", recorded)  # noqa: B010 - mypy rejects assigning a method
        return flock

    monkeypatch.setattr(keylock, "_file_lock", spying)
    return calls


def test_hold_creates_and_keeps_the_lock_file(lock_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              logs: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(keylock, "WAIT_LOG_INTERVAL_S", 0.01)  # any refusal would log
    with hold_key_lock(KEY, lock_path) as waited:
        assert waited >= 0.0
        assert "waiting for another" not in logs.text, "an uncontended lock never waits"
        assert lock_path.is_file()
        assert is_key_locked(lock_path) is True  # held by this thread
    assert lock_path.is_file(), "the lock file is never deleted"
    inode = lock_path.stat().st_ino
    with hold_key_lock(KEY, lock_path, timeout=0):
        pass
    assert lock_path.stat().st_ino == inode
    assert is_key_locked(lock_path) is False


def test_is_key_locked_on_missing_file_creates_nothing(lock_path: Path) -> None:
    assert is_key_locked(lock_path) is False
    assert not lock_path.exists() and not lock_path.parent.exists()


@pytest.mark.parametrize("how", ["filelock", "provisioner"])
def test_is_key_locked_sees_another_process(lock_path: Path, how: str) -> None:
    lock_path.parent.mkdir(parents=True)
    with held_elsewhere(lock_path, how):
        assert is_key_locked(lock_path) is True
        assert is_key_locked(lock_path) is True  # probing does not steal it
    assert is_key_locked(lock_path) is False
    assert lock_path.exists()


def test_timeout_zero_fails_at_once(lock_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    logs: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(keylock, "WAIT_LOG_INTERVAL_S", 0.01)  # any retry would log
    attempts = _acquire_timeouts(monkeypatch)
    lock_path.parent.mkdir(parents=True)
    with held_elsewhere(lock_path) as holder:
        with pytest.raises(LockTimeoutError) as err, hold_key_lock(KEY, lock_path, timeout=0):
            pytest.fail("acquired a lock held by another process")
        assert holder.poll() is None, "it failed while the lock was still held"
    # "At once": exactly one non-blocking attempt, no retry loop, nothing logged.
    assert attempts == [0.0]
    assert "waiting for another" not in logs.text
    assert isinstance(err.value, UserError)
    assert str(lock_path) in str(err.value) and KEY in str(err.value)
    assert err.value.hint is not None and "--lock-timeout" in err.value.hint


def test_waiter_logs_and_times_out(lock_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   logs: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(keylock, "WAIT_LOG_INTERVAL_S", 0.2)
    lock_path.parent.mkdir(parents=True)
    with held_elsewhere(lock_path) as holder:
        start = time.monotonic()
        with pytest.raises(LockTimeoutError), hold_key_lock(KEY, lock_path, timeout=1):
            pass
        elapsed = time.monotonic() - start
        # The error came while the holder still held the lock, and took nothing from it.
        assert holder.poll() is None
        assert is_key_locked(lock_path) is True
    assert elapsed >= 1.0, "it gave up before its timeout"  # lower bound only: load only adds
    waits = [r for r in logs.records if r.getMessage() == WAITING]
    assert len(waits) >= 2


class _ReleaseOnFirstWait(logging.Handler):
    """Lets the holder go once the waiter has logged that it was refused."""

    def __init__(self, holder: subprocess.Popen[str]) -> None:
        super().__init__()
        self.holder = holder
        self.refusals = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == WAITING:
            self.refusals += 1
            assert self.holder.stdin is not None
            self.holder.stdin.close()  # idempotent


def test_waiter_gets_the_lock_when_it_is_released(lock_path: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  logs: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(keylock, "WAIT_LOG_INTERVAL_S", 0.05)
    released = tmp_path / "released"
    lock_path.parent.mkdir(parents=True)
    with held_elsewhere(lock_path, marker=released) as holder:
        handler = _ReleaseOnFirstWait(holder)
        logging.getLogger("provisioner").addHandler(handler)
        try:
            # 60 s is a hang guard only: the holder lets go on the first refusal.
            with hold_key_lock(KEY, lock_path, timeout=60) as waited:
                # Order: refused while held, then the holder let go, then we got it.
                assert handler.refusals >= 1
                assert released.read_text() == "released"
                assert waited > 0
                assert is_key_locked(lock_path) is True
        finally:
            logging.getLogger("provisioner").removeHandler(handler)


def test_killed_holder_releases_at_once(lock_path: Path) -> None:
    lock_path.parent.mkdir(parents=True)
    with held_elsewhere(lock_path, "provisioner") as holder:
        os.kill(holder.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
        holder.wait(timeout=10)
        # Reaped means its descriptors are closed: the OS has dropped the lock, so a
        # single non-blocking attempt gets it (no stale lock to wait out or break).
        with hold_key_lock(KEY, lock_path, timeout=0):
            assert is_key_locked(lock_path) is True
    assert lock_path.exists()


def test_threads_serialise_without_deadlock(lock_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            logs: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(keylock, "WAIT_LOG_INTERVAL_S", 0.1)
    inside = 0
    peak = 0
    guard = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        nonlocal inside, peak
        try:
            with hold_key_lock(KEY, lock_path, timeout=30):
                with guard:
                    inside += 1
                    peak = max(peak, inside)
                time.sleep(0.15)
                with guard:
                    inside -= 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert errors == [] and peak == 1
    assert "waiting for another thread building" in logs.text


def test_other_thread_sees_the_lock_and_times_out(lock_path: Path) -> None:
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with hold_key_lock(KEY, lock_path):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder, daemon=True)
    t.start()
    assert held.wait(10)
    try:
        assert is_key_locked(lock_path) is True
        start = time.monotonic()
        # If the timeout were ignored this would block until the holder's 10 s hang
        # guard let go, and then acquire: pytest.raises would fail.
        with pytest.raises(LockTimeoutError), hold_key_lock(KEY, lock_path, timeout=0.3):
            pass
        assert time.monotonic() - start >= 0.3, "it gave up before its timeout"
        assert not release.is_set() and is_key_locked(lock_path) is True
    finally:
        release.set()
        t.join(10)
    assert is_key_locked(lock_path) is False


def test_different_keys_do_not_block_each_other(tmp_path: Path) -> None:
    a = tmp_path / "locks" / "a.lock"
    b = tmp_path / "locks" / "b.lock"
    with hold_key_lock("a", a, timeout=0), hold_key_lock("b", b, timeout=0):
        assert is_key_locked(a) and is_key_locked(b)
    b.parent.mkdir(exist_ok=True)
    with held_elsewhere(a), hold_key_lock("b", b, timeout=0):
        assert is_key_locked(a)
