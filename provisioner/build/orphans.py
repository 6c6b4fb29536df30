"""Processes of a build: recorded in its in-progress marker, stopped before its dir goes.

A build's children die with it on Linux (``PR_SET_PDEATHSIG``, set by
:mod:`provisioner.processes`), but their own children do not: a package's
import may start a helper that keeps writing into the prefix after a kill -9
of ``ensure``. So the in-progress marker records who builds (host, pid, pgid)
and the process group of every child the build started, every child carries
``PROVISIONER_BUILD_DIR=<build dir>`` in its environment (inherited by its
children, even those that leave the group), and :func:`stop_build_processes`
kills whatever still carries that tag, or still belongs to a recorded group
and holds the build dir open, before the dir is removed or promoted.

On Linux processes are found through ``/proc``; the environment tag (a path
with a random part) is what proves a process belongs to this build, so a
recycled pid or process group is never killed. Elsewhere on POSIX the
recorded process groups are killed (best effort); on Windows nothing is
recorded yet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from provisioner import fsops
from provisioner.build.fingerprint import in_progress_path
from provisioner.processes import BUILD_DIR_ENV

log = logging.getLogger(__name__)
STOP_WAIT_S = 10.0
_SCAN_ROUNDS = 5
_TICK_SLACK = 100
_PROC = Path("/proc")


def build_tag(directory: Path) -> str:
    """The value of ``PROVISIONER_BUILD_DIR`` for a build in ``directory``."""
    return os.path.realpath(directory)


def _boot_ticks() -> int | None:
    """Now, in the unit of ``/proc/<pid>/stat``'s start time (clock ticks since boot)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))
    except (AttributeError, OSError, ValueError):
        return None


def mark_building(prefix: Path, detail: str) -> None:
    """Write the in-progress marker: what is built, and by which process, since when."""
    pid = os.getpid()
    record = {
        "detail": detail,
        "host": socket.gethostname(),
        "pid": pid,
        "pgid": os.getpgid(pid) if hasattr(os, "getpgid") else None,
        "started": _boot_ticks(),
        "children": [],
    }
    fsops.atomic_write_text(in_progress_path(prefix), json.dumps(record, sort_keys=True) + "\n")


def read_record(prefix: Path) -> dict[str, object]:
    """The in-progress marker of ``prefix`` as a dict (empty if missing or not JSON)."""
    try:
        data = json.loads(in_progress_path(prefix).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_child(prefix: Path, pid: int) -> None:
    """Add a child's process group (its pid: it leads its own session) to the marker."""
    record = read_record(prefix)
    if not record:
        return  # the marker is already gone (the build finished or was discarded)
    children = record.get("children")
    groups = [c for c in children if isinstance(c, int)] if isinstance(children, list) else []
    record["children"] = [*groups, pid]
    fsops.atomic_write_text(in_progress_path(prefix), json.dumps(record, sort_keys=True) + "\n")


def _recorded_groups(record: dict[str, object]) -> set[int]:
    if record.get("host") not in (None, socket.gethostname()):
        return set()  # a build on another machine sharing this home: its pids mean nothing here
    children = record.get("children")
    if not isinstance(children, list):
        return set()
    return {c for c in children if isinstance(c, int) and c > 1}


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, pgid, sid, start time) of a process, from ``/proc/<pid>/stat``."""
    try:
        data = (_PROC / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[2]), int(fields[3]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _carries_tag(pid: int, needle: bytes) -> bool:
    try:
        environ = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return needle in environ.split(b"\0")


def _holds_open(pid: int, tag: str) -> bool:
    """Whether the process's cwd or an open file lies under the build dir ``tag``."""
    base = _PROC / str(pid)
    links = [base / "cwd"]
    with contextlib.suppress(OSError):
        links += [base / "fd" / fd for fd in os.listdir(base / "fd")]
    for link in links:
        with contextlib.suppress(OSError):
            target = os.readlink(link)
            if target == tag or target.startswith(tag + os.sep):
                return True
    return False


def _linux_members(tag: str, groups: set[int], since: int | None) -> list[int]:
    needle = f"{BUILD_DIR_ENV}={tag}".encode()
    me = os.getpid()
    found = []
    for entry in os.listdir(_PROC):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        info = _stat(pid)
        if info is None or info[0] in ("Z", "X"):
            continue
        if since is not None and info[3] < since:
            continue  # older than the build: cannot be one of its processes
        if _carries_tag(pid, needle) or (
            (info[1] in groups or info[2] in groups) and _holds_open(pid, tag)
        ):
            found.append(pid)
    return found


def _gone(pid: int) -> bool:
    info = _stat(pid)
    return info is None or info[0] in ("Z", "X")


def stop_build_processes(directory: Path, *, wait: float = STOP_WAIT_S) -> list[int]:
    """Kill every process still working for the build in ``directory``; return their pids.

    Call it only while holding the key's lock, so that the build that owned
    ``directory`` is known to be dead (or finished). Waits up to ``wait``
    seconds for the killed processes to be gone.
    """
    tag = build_tag(directory)
    record = read_record(directory)
    groups = _recorded_groups(record)
    started = record.get("started") if record.get("host") == socket.gethostname() else None
    # About a second of slack for rounding between this clock and /proc's.
    since = started - _TICK_SLACK if isinstance(started, int) else None
    if sys.platform == "win32":
        return []
    if not sys.platform.startswith("linux") or not _PROC.is_dir():
        if record.get("pid") == os.getpid():
            return []  # our own, finished children: their group ids may be reused already
        for group in sorted(groups):
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGKILL)
        return sorted(groups)
    stopped: list[int] = []
    for _ in range(_SCAN_ROUNDS):  # a process may fork between a scan and its kill
        members = _linux_members(tag, groups, since)
        if not members:
            break
        for pid in members:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        stopped += members
    deadline = time.monotonic() + wait
    while not all(_gone(pid) for pid in stopped) and time.monotonic() < deadline:
        time.sleep(0.01)
    if stopped:
        log.info("stopped %d process(es) left by the build in %s", len(set(stopped)), directory)
    return sorted(set(stopped))
