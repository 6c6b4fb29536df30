"""Every subprocess provisioner starts.

Children run in their own process group (session on POSIX), with stdin closed
unless input is given and output captured as UTF-8 text. On timeout the whole
group is killed, grandchildren included, so a hung solver or installer never
outlives the command that started it. On Linux every child also gets
``PR_SET_PDEATHSIG``: a kill -9 of provisioner kills its direct children too.
Inside :func:`build_scope` every child carries the build's directory in its
environment (``PROVISIONER_BUILD_DIR``, inherited by grandchildren) and is
reported to the scope, so that whatever a dead build left running can be found
and stopped (:mod:`provisioner.build.orphans`). Non-zero exit codes are data,
not exceptions; only a missing program raises (``ToolMissingError``).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner.errors import ToolMissingError

_IS_WINDOWS = sys.platform == "win32"
if sys.platform == "win32":
    _CREATION_FLAGS = subprocess.CREATE_NEW_PROCESS_GROUP
else:
    _CREATION_FLAGS = 0
# After the kill, how long to wait for the pipes to close; only a process that
# left the group (setsid, or a Windows orphan) can hold them open past it.
_DRAIN_S = 0.25
_REAP_S = 5.0
log = logging.getLogger(__name__)
# The children's own output is detail for -vv; the CLI sets this logger apart.
_tools_log = logging.getLogger("provisioner.tools")
BUILD_DIR_ENV = "PROVISIONER_BUILD_DIR"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class _BuildScope:
    directory: str
    on_spawn: Callable[[int], None] | None


# Per thread (and per asyncio task): threads of one process may build several keys at once.
_SCOPE: contextvars.ContextVar[_BuildScope | None] = contextvars.ContextVar(
    "provisioner_build_scope", default=None
)


@contextlib.contextmanager
def build_scope(
    directory: Path, on_spawn: Callable[[int], None] | None = None
) -> Iterator[None]:
    """Tag every child started in this block (in this thread) as part of the build in ``directory``.

    Each child gets ``PROVISIONER_BUILD_DIR=<directory>`` in its environment,
    and ``on_spawn(pid)`` is called right after it starts (its pid is also its
    process group id on POSIX).
    """
    token = _SCOPE.set(_BuildScope(str(directory), on_spawn))
    try:
        yield
    finally:
        _SCOPE.reset(token)


@functools.lru_cache(maxsize=1)
def _prctl() -> Any:
    """libc's ``prctl``, loaded in the parent: a forked child should only call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError, ImportError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return fn


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this thread's process dies."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """Start ``argv`` the way provisioner starts every child, and return the process.

    The child leads a new session (a new process group on Windows), dies with
    this process on Linux (``PR_SET_PDEATHSIG``; the thread that calls this
    must wait for it), and inside :func:`build_scope` carries and reports the
    build's tag. ``popen`` is passed to :class:`subprocess.Popen` (stdio,
    encoding). Raises ``ToolMissingError`` if the program does not exist.
    """
    args = tuple(str(a) for a in argv)
    if not args:
        raise ValueError("start() needs a program to run")
    executable = _resolve(args[0], env)
    scope = _SCOPE.get()
    child_env = None if env is None else dict(env)
    if scope is not None:
        child_env = dict(os.environ) if child_env is None else child_env
        child_env[BUILD_DIR_ENV] = scope.directory
    try:
        proc: subprocess.Popen[Any] = subprocess.Popen(
            [executable, *args[1:]], env=child_env, cwd=cwd,
            start_new_session=not _IS_WINDOWS, creationflags=_CREATION_FLAGS,
            preexec_fn=_die_with_parent(), **popen,
        )
    except FileNotFoundError:
        if cwd is not None and not os.path.isdir(cwd):
            raise
        raise _missing(args[0]) from None
    if scope is not None and scope.on_spawn is not None:
        try:
            scope.on_spawn(proc.pid)
        except BaseException:
            _kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_REAP_S)
            raise
    return proc


@dataclass(frozen=True)
class ProcResult:
    """What a finished (or timed-out) command did.

    ``returncode`` is ``None`` when the command timed out and was killed.
    """

    argv: tuple[str, ...]
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    truncated: bool = False  # output went past the cap of run_contained; the group was killed

    @property
    def ok(self) -> bool:
        """Whether the command finished in time with exit code 0."""
        return self.returncode == 0 and not self.timed_out


def which(name: str, path: str | None = None) -> str | None:
    """The full path of program ``name`` on ``path`` (default: ``PATH``), or ``None``."""
    return shutil.which(name, path=path)


def _missing(name: str) -> ToolMissingError:
    return ToolMissingError(
        f"'{name}' was not found",
        hint=f"install {name} or put it on PATH",
    )


def _resolve(argv0: str, env: Mapping[str, str] | None) -> str:
    if os.sep in argv0 or (os.altsep and os.altsep in argv0):
        return argv0
    search = None if env is None else env.get("PATH", os.defpath)
    found = which(argv0, search)
    if found is None:
        raise _missing(argv0)
    return found


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    if sys.platform == "win32":
        # taskkill /T walks the parent-child tree; proc.kill() covers a missing taskkill.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["taskkill", "/T", "/F", "/PID", str(proc.pid)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=_REAP_S,
                check=False,
            )
        with contextlib.suppress(OSError):
            proc.kill()
        return
    # The child leads its own session, so its pid is the group id. The group id
    # stays reserved while any member (even the unreaped child) exists.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _collect_after_kill(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=_DRAIN_S)
        return out or "", err or ""
    except subprocess.TimeoutExpired as exc:
        out, err = _decode(exc.stdout), _decode(exc.stderr)
    if not _IS_WINDOWS:
        # On Windows reader threads still hold these; closing would block on their locks.
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_REAP_S)
    return out, err


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input_text: str | None = None,
) -> ProcResult:
    """Run ``argv`` to completion (or ``timeout`` seconds) and return what it did.

    ``env`` replaces the environment entirely when given. On timeout the
    child's whole process group is killed and reaped, and the result has
    ``timed_out=True``; the call returns within about ``timeout + 0.5`` s.
    Raises ``ToolMissingError`` if the program does not exist; never raises
    for a non-zero exit code.
    """
    args = tuple(str(a) for a in argv)
    if not args:
        raise ValueError("run() needs a program to run")
    started = time.monotonic()
    proc = start(
        args, env=env, cwd=cwd,
        stdin=subprocess.DEVNULL if input_text is None else subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
    )

    timed_out = False
    try:
        out, err = proc.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        out, err = _collect_after_kill(proc)
    except BaseException:
        _kill_group(proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_REAP_S)
        raise
    result = ProcResult(
        argv=args,
        returncode=None if timed_out else proc.returncode,
        stdout=out or "",
        stderr=err or "",
        timed_out=timed_out,
        seconds=time.monotonic() - started,
    )
    brief = (a if len(a) <= 80 and "\n" not in a else a.splitlines()[0][:60] + "..." for a in args)
    log.debug("ran %s: %s in %.2f s", " ".join(brief),
              "timed out" if timed_out else f"exit {result.returncode}", result.seconds)
    if result.stderr.strip():
        _tools_log.debug("%s said:\n%s", Path(args[0]).name, result.stderr.rstrip())
    return result


def run_streaming(
    argv: Sequence[str],
    *,
    on_line: Callable[[str], None],
    input_text: str = "",
    env: Mapping[str, str] | None = None,
    stderr_lines: int = 40,
) -> ProcResult:
    """Run ``argv`` in its own process group, handing each stdout line to ``on_line``.

    Only the last ``stderr_lines`` lines of stderr are kept (a crash's last
    words). If anything interrupts the wait (Ctrl-C, a SIGTERM handler, an
    exception from ``on_line``), the child's whole group is killed and reaped
    before the exception propagates, so nothing it started is still writing
    when the caller cleans up.
    """
    args = tuple(str(a) for a in argv)
    started = time.monotonic()
    proc = start(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    tail: collections.deque[str] = collections.deque(maxlen=stderr_lines)
    assert proc.stderr is not None and proc.stdout is not None and proc.stdin is not None
    reader = threading.Thread(target=lambda: tail.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(input_text)
            proc.stdin.close()
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        proc.wait()
    except BaseException:
        _kill_group(proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_REAP_S)
        raise
    finally:
        reader.join(timeout=_REAP_S)
    result = ProcResult(argv=args, returncode=proc.returncode, stdout="",
                        stderr="".join(tail), timed_out=False,
                        seconds=time.monotonic() - started)
    if result.stderr.strip():
        _tools_log.debug("%s said (last lines):\n%s", Path(args[0]).name, result.stderr.rstrip())
    return result


def run_passthrough(argv: Sequence[str], env: Mapping[str, str] | None = None,
                    pass_fds: Sequence[int] = ()) -> int:
    """Run ``argv`` with inherited stdin/stdout/stderr and return its exit code.

    For commands the user runs in an env (``provisioner run``): the child shares
    the terminal and its process group, so Ctrl-C reaches it directly; this
    process waits for it to finish. ``argv[0]`` is looked up on ``env``'s
    ``PATH`` when given. A child killed by signal N gives ``128 + N``, as in a
    shell. Raises ``ToolMissingError`` if the program does not exist. The
    descriptors in ``pass_fds`` are inherited by the child (a lease, for one).
    """
    args = [str(a) for a in argv]
    if not args:
        raise ValueError("run_passthrough() needs a program to run")
    executable = _resolve(args[0], env)
    try:
        proc = subprocess.Popen([executable, *args[1:]], env=None if env is None else dict(env),
                                pass_fds=tuple(pass_fds))
    except FileNotFoundError:
        raise _missing(args[0]) from None
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            continue  # the child got the same SIGINT; let it decide when to stop
    return 128 - code if code < 0 else code
