"""How provisioner names and measures paths, without changing anything.

Windows extended-length (``\\\\?\\``) spelling, link-safe directory tests, tree
sizes that count a hard-linked file once, and free space. :mod:`provisioner.fsops`
holds every mutation and builds on these.
"""

from __future__ import annotations

import ntpath
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path, PurePath, PureWindowsPath

_IS_WINDOWS = sys.platform == "win32"
#: seconds of sleep a reader spends riding out a sharing violation before giving up
READ_RETRY_BUDGET_S = 2.0
# ERROR_ACCESS_DENIED and ERROR_SHARING_VIOLATION: os.replace (or a scanner) holds the file.
_SHARING_WINERRORS = (5, 32)
_READ_FIRST_DELAY_S = 0.01


def to_extended_path(path: str | PurePath, *, windows: bool | None = None) -> str:
    """Return ``path`` in Windows extended-length form (``\\\\?\\C:\\...``).

    On POSIX (``windows`` false, or unset on a non-Windows host) the path comes
    back unchanged. Otherwise it is normalised (``.``/``..`` collapsed, ``/``
    turned into ``\\``) and prefixed: ``\\\\?\\C:\\...`` for drive paths,
    ``\\\\?\\UNC\\server\\share\\...`` for UNC paths. Paths already in device
    form (``\\\\?\\`` or ``\\\\.\\``) are left alone. A relative path is made
    absolute on a real Windows host and left unprefixed elsewhere, since the
    prefix is only valid on fully qualified paths.
    """
    text = os.fspath(path)
    if windows is None:
        windows = _IS_WINDOWS
    if not windows:
        return text
    if text.startswith(("\\\\?\\", "\\\\.\\")):
        return text
    normed = ntpath.normpath(text)
    pure = PureWindowsPath(normed)
    if not (pure.drive and pure.root) and _IS_WINDOWS:
        normed = ntpath.abspath(normed)
        pure = PureWindowsPath(normed)
    if not (pure.drive and pure.root):
        return normed
    if pure.drive.startswith("\\\\"):
        return "\\\\?\\UNC\\" + normed[2:]
    return "\\\\?\\" + normed


def os_path(path: str | PurePath) -> str:
    """The string to hand to the OS: extended-length on Windows, as is elsewhere."""
    return to_extended_path(path) if _IS_WINDOWS else os.fspath(path)


def is_junction(st: os.stat_result) -> bool:
    """A Windows directory junction (a mount point reparse tag); never one elsewhere."""
    tag = getattr(st, "st_reparse_tag", 0)
    return bool(tag) and tag == getattr(stat, "IO_REPARSE_TAG_MOUNT_POINT", -1)


def is_real_dir(entry: os.DirEntry[str]) -> bool:
    """A directory entry that is a real directory: not a symlink, not a junction."""
    if not entry.is_dir(follow_symlinks=False):
        return False
    return not (_IS_WINDOWS and is_junction(entry.stat(follow_symlinks=False)))


def tree_size(path: Path) -> int:
    """Bytes held by the regular files under ``path``.

    Symlinks are not followed, and a file hard-linked several times inside the
    tree is counted once. A missing ``path`` has size 0.
    """
    try:
        st = os.lstat(os_path(path))
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    seen: set[tuple[int, int]] = set()
    pending = [os_path(path)]
    while pending:
        with os.scandir(pending.pop()) as it:
            entries = list(it)
        for entry in entries:
            if is_real_dir(entry):
                pending.append(entry.path)
                continue
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_nlink == 0:
                # Windows' DirEntry.stat leaves st_nlink/st_ino at zero; lstat fills them.
                st = os.lstat(entry.path)
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_size
    return total


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(os_path(probe)).free


def _read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def read_bytes_retrying(path: Path, *, budget: float | None = None,
                        sleep: Callable[[float], None] | None = None) -> bytes:
    """The bytes of ``path``, riding out Windows sharing violations for a bounded time.

    Reading a small file (the ``current`` pointer, the state file) while another
    process replaces it (``os.replace``) fails on Windows with WinError 5 or 32 for a
    moment. Those are retried with backoff for ``budget`` seconds of sleep in
    all; then, and for every other error at once, the error propagates (a
    POSIX ``PermissionError`` has no ``winerror`` and is never retried).
    """
    budget = READ_RETRY_BUDGET_S if budget is None else budget
    sleep = time.sleep if sleep is None else sleep
    delay, slept = _READ_FIRST_DELAY_S, 0.0
    while True:
        try:
            return _read_file(os.fspath(path))
        except OSError as exc:
            if getattr(exc, "winerror", None) not in _SHARING_WINERRORS or slept >= budget - 1e-9:
                raise
            wait = min(delay, budget - slept)
            sleep(wait)
            slept += wait
            delay *= 2
