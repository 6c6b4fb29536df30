"""Every filesystem mutation provisioner makes.

Writes are atomic (temp file in the same directory, fsync, rename), deletions
only touch trees that carry provisioner's marker file, renames survive the
transient locks that antivirus and indexers hold on Windows, and directory
copies never leave a half-copied destination behind. On Windows every walk
uses extended-length (``\\\\?\\``) paths, because conda prefixes easily exceed
260 characters.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from provisioner.errors import BuildError, EnvironmentProblemError
from provisioner.paths import (
    free_disk_bytes,
    is_junction,
    os_path,
    read_bytes_retrying,
    to_extended_path,
    tree_size,
)

__all__ = ["free_disk_bytes", "to_extended_path", "tree_size"]  # re-exported for callers

MARKER_NAME = ".provisioner-owned"
RENAME_RETRY_BUDGET_S = 25.0
#: seconds a rename refused with "access denied" (not a sharing violation) is retried:
#: a scanner's handle goes away in that time, a permanent denial never does
DENIED_RETRY_BUDGET_S = 1.0
#: seconds of sleep a deletion waits for files in use to be released before reporting them
DELETE_RETRY_BUDGET_S = 2.0
# ERROR_ACCESS_DENIED and ERROR_SHARING_VIOLATION: a scanner or indexer holds a handle.
_TRANSIENT_WINERRORS = (5, 32)
# ...and ERROR_DIR_NOT_EMPTY: a file in the directory is still delete-pending.
_IN_USE_WINERRORS = (5, 32, 145)
_IN_USE_ERRNOS = (errno.EBUSY, errno.ETXTBSY, errno.EACCES)
_FIRST_DELAY_S = 0.05
_MAX_DELAY_S = 2.0
_IS_WINDOWS = sys.platform == "win32"


class UnsafeDeleteError(BuildError):
    """A deletion was refused because the target is not provably provisioner's."""


class InUseError(EnvironmentProblemError):
    """Files that another process holds open stopped a deletion; the marker is kept."""

    def __init__(self, path: Path, in_use: Sequence[str]) -> None:
        shown = ", ".join(in_use[:3]) + (f" and {len(in_use) - 3} more" if len(in_use) > 3 else "")
        super().__init__(f"{path}: {len(in_use)} path(s) in use by another process: {shown}",
                         hint="stop the program that uses them, then run 'provisioner gc'")
        self.path = path
        self.in_use = tuple(in_use)


def is_in_use(exc: OSError) -> bool:
    """Whether ``exc`` says another process holds the file (Windows sharing, POSIX busy)."""
    winerror = getattr(exc, "winerror", None)
    if winerror is not None:
        return winerror in _IN_USE_WINERRORS
    return not _IS_WINDOWS and exc.errno in _IN_USE_ERRNOS


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk so that a rename inside it survives a crash.

    A no-op on Windows, which cannot open directories this way, and on
    filesystems that refuse to fsync directories.
    """
    if _IS_WINDOWS:
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or new file, never a mix."""
    atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_with(path: Path, write: Callable[[BinaryIO], object], *,
                      durable: bool = True) -> None:
    """Replace ``path`` with what ``write`` writes into the open file, all or nothing.

    ``durable=False`` skips the fsyncs, for scratch files that a crash may lose.
    """
    for _ in range(100):
        tmp = _temp_sibling(path, "tmp")
        try:
            # 0o666 so that the process umask decides the mode, as for a plain open().
            fd = os.open(os_path(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 100 random-name collisions in a row
        raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        rename_with_retry(tmp, path, rename=os.replace)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(os_path(tmp))
        raise
    if durable:
        fsync_dir(path.parent)


def remove_file(path: Path) -> None:
    """Delete one file (or symlink) if it exists; a read-only file is made writable first."""
    try:
        os.unlink(os_path(path))
    except FileNotFoundError:
        return
    except PermissionError:
        _add_mode(os_path(path), stat.S_IWRITE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os_path(path))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_pointer(path: Path, value: str) -> None:
    """Atomically point a small pointer file (such as an active generation) at ``value``."""
    if not value or "\n" in value or "\r" in value:
        raise ValueError(f"a pointer value must be one non-empty line, got {value!r}")
    atomic_write_text(path, value + "\n")


def read_pointer(path: Path) -> str | None:
    """The value written by :func:`replace_pointer`, or ``None`` if there is none."""
    try:
        value = read_bytes_retrying(path).decode("utf-8").strip()
    except FileNotFoundError:
        return None
    return value or None


def write_marker(directory: Path, role: str) -> None:
    """Mark ``directory`` as created and owned by provisioner, in the given ``role``."""
    payload = {"owner": "provisioner", "role": role}
    atomic_write_text(directory / MARKER_NAME, json.dumps(payload, sort_keys=True) + "\n")


def read_marker(directory: Path) -> str | None:
    """The role recorded in ``directory``'s marker; ``None`` if it has no valid marker."""
    marker = directory / MARKER_NAME
    try:
        if not stat.S_ISREG(marker.lstat().st_mode):
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    role = data.get("role") if isinstance(data, dict) else None
    return role if isinstance(role, str) else None


def has_marker(directory: Path) -> bool:
    """Whether ``directory`` holds provisioner's marker as a regular file."""
    try:
        return stat.S_ISREG((directory / MARKER_NAME).lstat().st_mode)
    except OSError:
        return False


def remove_unmarked_stub(directory: Path) -> bool:
    """Remove ``directory`` if it is what a kill between its mkdir and its marker leaves.

    That is a real directory without a marker that holds nothing but temporary
    files of an interrupted :func:`write_marker`. Returns whether it was
    removed; any other directory is left alone (use :func:`safe_rmtree`).
    """
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or is_junction(st) or has_marker(directory):
        return False
    leftover = f".{MARKER_NAME}.tmp-"
    entries = _list_dir(os_path(directory))
    if not all(e.name.startswith(leftover) and e.is_file(follow_symlinks=False) for e in entries):
        return False
    for entry in entries:
        os.unlink(entry.path)
    os.rmdir(os_path(directory))
    return True


def _add_mode(path: str, bits: int) -> None:
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISLNK(mode):
            os.chmod(path, stat.S_IMODE(mode) | bits)
    except OSError:
        pass


def _list_dir(path: str, *, repair: bool = False) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except PermissionError:
        if not repair:
            raise
        _add_mode(path, stat.S_IRWXU)
        with os.scandir(path) as it:
            return list(it)


def safe_rmtree(path: Path, *, require_marker: bool = True, last: Sequence[str] = ()) -> None:
    """Delete the directory tree at ``path``, but only if it is provably provisioner's.

    Refuses (``UnsafeDeleteError``) a symlink or junction as the root, a
    non-directory, a filesystem root, the home directory or one of its parents,
    and, when ``require_marker``, any directory without provisioner's marker.
    Links inside the tree are unlinked, never followed, so their targets
    survive. The paths in ``last`` (relative, ``/``-separated: a fingerprint,
    ``pyvenv.cfg``) go after everything else, and the marker after them: a
    removal that is interrupted, or stopped by files in use, leaves a marked
    directory that the next call can remove. Files in use (Windows sharing
    violations, POSIX ``EBUSY``) are retried for :data:`DELETE_RETRY_BUDGET_S`
    seconds, then raised as :class:`InUseError` listing them, with ``last`` and
    the marker intact. Read-only files and directories are made writable and
    retried. A missing ``path`` is a no-op. (:mod:`provisioner.fsdelete`)
    """
    from provisioner.fsdelete import safe_rmtree as delete

    delete(path, require_marker=require_marker, last=last)


def rename_with_retry(
    src: Path,
    dst: Path,
    *,
    budget: float = RENAME_RETRY_BUDGET_S,
    denied_budget: float | None = None,
    sleep: Callable[[float], None] | None = None,
    rename: Callable[[str, str], object] | None = None,
    is_windows: bool | None = None,
) -> None:
    """Rename ``src`` to ``dst``, riding out Windows' transient file locks.

    On Windows, WinError 32 (a sharing violation: antivirus or the indexer
    holding a handle) is retried with exponential backoff for ``budget`` seconds
    of sleep in total, WinError 5 (access denied, which may be permanent) for at
    most ``denied_budget`` (default :data:`DENIED_RETRY_BUDGET_S`; a caller that
    renames a tree it has just written, which scanners hold with exactly this
    error, passes ``budget``); elsewhere, and for every other error, the first
    error propagates.
    In particular ``EXDEV`` surfaces at once so the caller can fall back to
    :func:`copy_tree_into`. ``sleep`` (default ``time.sleep``) and ``rename``
    (default ``os.rename``) are injectable so tests can simulate Windows.
    """
    if is_windows is None:
        is_windows = _IS_WINDOWS
    denied = min(budget, DENIED_RETRY_BUDGET_S if denied_budget is None else denied_budget)
    sleep = time.sleep if sleep is None else sleep
    rename = os.rename if rename is None else rename
    src_s, dst_s = os_path(src), os_path(dst)
    delay, slept = _FIRST_DELAY_S, 0.0
    while True:
        try:
            rename(src_s, dst_s)
            return
        except OSError as exc:
            winerror = getattr(exc, "winerror", None)
            if not (is_windows and winerror in _TRANSIENT_WINERRORS):
                raise
            # Only a sharing violation is surely transient; "access denied" may be for good.
            remaining = (budget if winerror == 32 else denied) - slept
            if remaining <= 1e-9:
                raise
            wait = min(delay, remaining)
            sleep(wait)
            slept += wait
            delay = min(delay * 2, _MAX_DELAY_S)


def copy_tree_into(src: Path, dst: Path) -> None:
    """Copy the tree ``src`` to the new path ``dst``, all or nothing (:mod:`provisioner.fscopy`)."""
    from provisioner.fscopy import copy_tree_into as copy

    copy(src, dst)
