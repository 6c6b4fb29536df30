"""Runs of untrusted programs (health probes) that leave nothing behind.

Split from :mod:`provisioner.processes` (which runs every other subprocess) to
keep both under 400 lines. The child runs in its own session; its whole
process group is killed after it exits, not only on timeout. On Linux this
process is a child subreaper for the duration, and every descendant carries a
token in its environment, so grandchildren that called ``setsid`` (or
double-forked) are found and killed too. At most 1 MiB of output is read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from provisioner.processes import (
    _DRAIN_S,
    _IS_WINDOWS,
    _REAP_S,
    ProcResult,
    _decode,
    _kill_group,
    _missing,
    _resolve,
    run,
)

#: the environment variable that marks every descendant of a contained run
CONTAINED_TOKEN_VAR = "PROVISIONER_CONTAINED_RUN"
MAX_CONTAINED_OUTPUT = 1 << 20
_PR_SET_CHILD_SUBREAPER = 36
_subreaper_users = 0
_subreaper_guard = threading.Lock()


def _set_subreaper(on: bool) -> None:
    """Linux: adopt orphaned descendants (``setsid`` daemons) instead of init; refcounted."""
    global _subreaper_users
    if not sys.platform.startswith("linux"):
        return
    with _subreaper_guard:
        _subreaper_users += 1 if on else -1
        if (on and _subreaper_users == 1) or (not on and _subreaper_users == 0):
            with contextlib.suppress(OSError, AttributeError):
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)


def _marked_pids(token: str) -> list[int]:
    """Linux: live processes whose environment carries ``token`` (descendants of one run)."""
    needle = f"{CONTAINED_TOKEN_VAR}={token}".encode()
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as fh:
                    if needle in fh.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                continue
    return found


def _kill_marked(token: str) -> None:
    """Kill every process marked with ``token``; reap those that became our children."""
    for _ in range(20):  # a fork bomb cannot outrun SIGKILL for long
        pids = _marked_pids(token)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:  # as subreaper we are their parent now: reap, or they stay zombies
            for _attempt in range(100):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except OSError:  # not our child (init reaps it), or already reaped
                    break
                time.sleep(0.01)


def _read_capped(proc: subprocess.Popen[bytes], deadline: float | None,
                 cap: int) -> tuple[bytes, bytes, bool, bool]:
    """(stdout, stderr, timed_out, truncated); stops reading at ``cap`` bytes in all."""
    import selectors

    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    total, exited_at = 0, None
    timed_out = truncated = False
    try:
        while sel.get_map() and not (timed_out or truncated):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                timed_out = True
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > _DRAIN_S:
                break  # only a process that left the group still holds the pipes
            wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - now))
            for key, _ in sel.select(wait):
                fd = int(key.fd)
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    continue
                room = cap - total
                bufs[fd] += chunk[:room]
                total += min(len(chunk), room)
                if len(chunk) > room:
                    truncated = True
                    break
    finally:
        sel.close()
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), timed_out, truncated


def run_contained(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    max_output: int = MAX_CONTAINED_OUTPUT,
) -> ProcResult:
    """Like :func:`run`, for untrusted programs (health probes); nothing outlives the call.

    The child runs in its own session; its whole process group is killed after
    it exits, not only on timeout. On Linux this process is a child subreaper
    for the duration, and every descendant carries a marker in its
    environment, so grandchildren that called ``setsid`` (or double-forked) are
    found and killed too. At most ``max_output`` bytes of stdout and stderr
    together are kept; past that the group is killed and ``truncated`` is set.
    Falls back to :func:`run` on Windows.
    """
    if _IS_WINDOWS:
        return run(argv, timeout=timeout, env=env)
    args = tuple(str(a) for a in argv)
    if not args:
        raise ValueError("run_contained() needs a program to run")
    token = secrets.token_hex(8)
    child_env = dict(os.environ if env is None else env)
    child_env[CONTAINED_TOKEN_VAR] = token
    executable = _resolve(args[0], child_env)
    started = time.monotonic()
    _set_subreaper(True)
    try:
        try:
            proc = subprocess.Popen([executable, *args[1:]], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=child_env, start_new_session=True)
        except FileNotFoundError:
            raise _missing(args[0]) from None
        try:
            deadline = None if timeout is None else started + timeout
            out, err, timed_out, truncated = _read_capped(proc, deadline, max_output)
        finally:
            _kill_group(proc)  # type: ignore[arg-type]
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_REAP_S)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            _kill_marked(token)
    finally:
        _set_subreaper(False)
    return ProcResult(
        argv=args, returncode=None if timed_out else proc.returncode,
        stdout=_decode(out), stderr=_decode(err), timed_out=timed_out,
        seconds=time.monotonic() - started, truncated=truncated,
    )


_STILL_ACTIVE = 259  # GetExitCodeProcess's code for a process that has not exited
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_ERROR_ACCESS_DENIED = 5


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs, without signalling it (a zombie counts as gone).

    ``os.kill(pid, 0)`` is that question on POSIX, but on Windows ``os.kill``
    with any signal but the two console events *terminates* the process: there
    the process is opened for query and its exit code read instead.
    """
    if pid <= 0:
        return False  # 0 and negatives name groups to os.kill, never one process
    if sys.platform == "win32":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; another user's
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs (macOS): os.kill said it exists
    return state not in ("Z", "X")


def _windows_pid_alive(pid: int) -> bool:
    if sys.platform != "win32":  # also tells mypy the rest is Windows-only
        raise NotImplementedError("the Windows liveness check runs on Windows only")
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        # Access denied: it exists (a protected or elevated process); anything else: gone.
        return bool(ctypes.get_last_error() == _ERROR_ACCESS_DENIED)
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True  # opened, so it exists; its code is unreadable
        # A process that exited with 259 itself reads as running: Windows' own ambiguity.
        return bool(code.value == _STILL_ACTIVE)
    finally:
        kernel32.CloseHandle(handle)
