"""Deleting provisioner's trees without ever half-deleting one (:func:`fsops.safe_rmtree`).

The walk never follows links or junctions, stays on one filesystem, and takes
the tree's identity last: first everything else, then the named ``last`` paths
(a fingerprint, ``pyvenv.cfg``), then the ownership marker, then the root.
Files that another process holds open (a running ``python.exe`` or a loaded DLL
on Windows: WinError 5, 32 or 145; ``EBUSY``/``ETXTBSY``/``EACCES`` on POSIX)
do not stop the walk: it removes what it can, retries the rest with backoff
for :data:`fsops.DELETE_RETRY_BUDGET_S` seconds, then raises
:class:`fsops.InUseError` naming them, with the marker still in place so that
the next ``gc`` finishes the job. Split from :mod:`provisioner.fsops` to keep
both under 400 lines.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from provisioner import fsops
from provisioner.fsops import (
    MARKER_NAME,
    InUseError,
    UnsafeDeleteError,
    _add_mode,
    _list_dir,
    has_marker,
    is_in_use,
    read_marker,
    remove_file,
    write_marker,
)
from provisioner.paths import is_junction, is_real_dir, os_path

_FIRST_DELAY_S = 0.05
_MAX_DELAY_S = 0.5


def _retry_writable(op: Callable[[str], None], path: str, parent: str | None) -> None:
    """Run ``op(path)``; on a permission error make path and parent writable, then retry."""
    try:
        op(path)
    except PermissionError:
        # Windows refuses to delete read-only files; POSIX refuses entries of read-only dirs.
        _add_mode(path, stat.S_IWRITE)
        if parent is not None:
            _add_mode(parent, stat.S_IRWXU)
        op(path)


def _hold_parents(path: str, top: str, held: set[str]) -> None:
    """Keep every directory from ``path``'s parent up to ``top``: something stays inside."""
    parent = os.path.dirname(path)
    while parent not in held:
        held.add(parent)
        if parent == top or len(parent) <= len(top):
            break
        parent = os.path.dirname(parent)


def _remove_tree(top: str, keep: frozenset[str]) -> list[str]:
    """Delete the tree ``top`` except ``keep`` (paths in it) and their parents.

    Returns the paths that were in use (left in place, their parents too);
    ``top`` itself goes only when nothing was kept.
    """
    # Iterative post-order walk: no recursion limit, never follows links or junctions.
    top_dev = os.lstat(top).st_dev
    die = os.environ.get("PROVISIONER_TEST_FAULT") == "during-rmtree"  # test hook: kill -9 here
    held: set[str] = set()
    for path in keep:
        _hold_parents(path, top, held)
    in_use: list[str] = []

    def attempt(op: Callable[[str], None], path: str, parent: str | None) -> None:
        try:
            _retry_writable(op, path, parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not is_in_use(exc):
                raise
            in_use.append(path)
            _hold_parents(path, top, held)

    stack: list[tuple[str, str | None, bool]] = [(top, None, False)]
    while stack:
        directory, parent, listed = stack.pop()
        if listed:
            if directory not in held:
                attempt(os.rmdir, directory, parent)
            continue
        stack.append((directory, parent, True))
        for entry in _list_dir(directory, repair=True):
            if entry.path in keep:
                continue
            if is_real_dir(entry):
                # Like rm --one-file-system: a mount inside the tree is someone else's data.
                if not fsops._IS_WINDOWS and entry.stat(follow_symlinks=False).st_dev != top_dev:
                    raise UnsafeDeleteError(
                        f"refusing to delete {entry.path}: another filesystem is mounted there"
                    )
                stack.append((entry.path, directory, False))
            else:
                # os.unlink also removes directory symlinks and junctions on Windows.
                attempt(os.unlink, entry.path, directory)
                if die:
                    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
    return in_use


def _remove_retrying(top: str, keep: frozenset[str], sleep: Callable[[float], None]) -> None:
    """:func:`_remove_tree`, again and again while files are in use, then :class:`InUseError`."""
    budget = fsops.DELETE_RETRY_BUDGET_S
    delay, slept = _FIRST_DELAY_S, 0.0
    while True:
        in_use = _remove_tree(top, keep)
        if not in_use:
            return
        if slept >= budget - 1e-9:
            raise InUseError(Path(_shown(top)), [_shown(p) for p in in_use])
        wait = min(delay, budget - slept)
        sleep(wait)
        slept += wait
        delay = min(delay * 2, _MAX_DELAY_S)


def _remove_in_order(top: str, last: Sequence[str], sleep: Callable[[float], None]) -> None:
    """Everything, then ``last``, then the marker, then ``top``; see the module doc."""
    late = frozenset(os.path.join(top, *p.split("/")) for p in last)
    if not has_marker(Path(top)):
        _remove_retrying(top, late, sleep)
        if os.path.lexists(top):
            _remove_retrying(top, frozenset(), sleep)
        return
    marker = os.path.join(top, MARKER_NAME)
    role = read_marker(Path(top)) or "env"
    _remove_retrying(top, late | {marker}, sleep)
    if late:
        _remove_retrying(top, frozenset({marker}), sleep)
    remove_file(Path(marker))
    try:
        _retry_writable(os.rmdir, top, None)
    except OSError:
        write_marker(Path(top), role)  # something wrote into it meanwhile: keep it removable
        raise


def _shown(path: str) -> str:
    """``path`` without the extended-length prefix, as a user would write it."""
    if path.startswith("\\\\?\\UNC\\"):
        return "\\\\" + path[8:]
    return path.removeprefix("\\\\?\\")


def _refuse_reason(path: Path) -> str | None:
    real = Path(os.path.realpath(path))
    if real.parent == real:
        return "it is a filesystem root"
    try:
        home = Path.home().resolve()
    except (KeyError, RuntimeError):
        home = None
    if home is not None and (real == home or real in home.parents):
        return "it is the home directory or one of its parents"
    return None


def safe_rmtree(path: Path, *, require_marker: bool = True, last: Sequence[str] = (),
                sleep: Callable[[float], None] | None = None) -> None:
    """:func:`provisioner.fsops.safe_rmtree`; ``sleep`` (default ``time.sleep``) for tests."""
    path = Path(os.path.abspath(path))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or is_junction(st):
        raise UnsafeDeleteError(
            f"refusing to delete {path}: it is a link, not a directory",
            hint="remove the link itself if that is what you meant",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDeleteError(f"refusing to delete {path}: it is not a directory")
    reason = _refuse_reason(path)
    if reason is not None:
        raise UnsafeDeleteError(f"refusing to delete {path}: {reason}")
    if require_marker and not has_marker(path):
        raise UnsafeDeleteError(
            f"refusing to delete {path}: it has no {MARKER_NAME} marker",
            hint="provisioner only deletes directories it created; remove it by hand if unwanted",
        )
    _remove_in_order(os_path(path), last, time.sleep if sleep is None else sleep)
