"""Copies: a tree copied into place keeping its link structure, and one file linked or copied.

The fallback of promotion when a rename cannot be used (``EXDEV``, or a forced
copy on Windows and cross-filesystem setups). An env that rattler hardlinked
from the package cache stays hardlinked to it, so a copied env costs the same
disk as a renamed one. Split from :mod:`provisioner.fsops` (which it uses for
renames and cleanup) to keep that module small.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from provisioner.errors import BuildError, ProvisionerError
from provisioner.fsops import (
    _IS_WINDOWS,
    RENAME_RETRY_BUDGET_S,
    _list_dir,
    _temp_sibling,
    atomic_write_with,
    fsync_dir,
    rename_with_retry,
    safe_rmtree,
)
from provisioner.paths import is_real_dir, os_path


def _copy_file(path: str, target: str, same_fs: bool, links: dict[tuple[int, int], str]) -> None:
    """Copy one file; a hardlinked one (from the package cache) is linked, not copied."""
    st = os.lstat(path)
    ident = (st.st_dev, st.st_ino)
    if st.st_nlink > 1:
        for source in (links.get(ident), path if same_fs else None):
            if source is not None:
                with contextlib.suppress(OSError):
                    os.link(source, target)
                    return
    shutil.copy2(path, target, follow_symlinks=False)
    if st.st_nlink > 1:
        links.setdefault(ident, target)


def _copy_walk(src: str, dst: str) -> None:
    dirs: list[tuple[str, str]] = []
    pending = [(src, dst)]
    same_fs = os.lstat(src).st_dev == os.lstat(os.path.dirname(dst)).st_dev
    links: dict[tuple[int, int], str] = {}
    while pending:
        s_dir, d_dir = pending.pop()
        os.mkdir(d_dir, 0o700)
        dirs.append((s_dir, d_dir))
        for entry in _list_dir(s_dir):
            target = os.path.join(d_dir, entry.name)
            if entry.is_symlink():
                link = os.readlink(entry.path)
                os.symlink(link, target, target_is_directory=_IS_WINDOWS and entry.is_dir())
            elif is_real_dir(entry):
                pending.append((entry.path, target))
            elif entry.is_file(follow_symlinks=False):
                _copy_file(entry.path, target, same_fs, links)
            else:
                raise BuildError(f"cannot copy {entry.path}: not a file, directory or symlink")
    # Modes last and deepest first, so that a read-only directory does not block its children.
    for s_dir, d_dir in reversed(dirs):
        shutil.copystat(s_dir, d_dir, follow_symlinks=False)


def copy_tree_into(src: Path, dst: Path) -> None:
    """Copy the tree ``src`` to the new path ``dst`` as one all-or-nothing step.

    The promotion fallback for when a rename cannot be used (``EXDEV``, or a
    forced copy). The tree is copied into a temporary sibling of ``dst`` (so on
    ``dst``'s filesystem), keeping symlinks as symlinks, hardlinks as hardlinks
    (to the same inode when ``src`` is on ``dst``'s filesystem, so an env
    linked from the package cache stays linked to it) and file modes, then
    renamed to ``dst``. On any failure the temporary copy is removed and the
    error re-raised, so ``dst`` is either complete or absent.
    """
    if os.path.lexists(dst):
        raise BuildError(f"cannot copy into {dst}: it already exists")
    if not os.path.isdir(src) or os.path.islink(src):
        raise BuildError(f"cannot copy {src}: it is not a directory")
    tmp = _temp_sibling(dst, "copy")
    try:
        _copy_walk(os_path(src), os_path(tmp))
        if os.path.lexists(dst):
            raise BuildError(f"cannot copy into {dst}: it appeared while copying")
        rename_with_retry(tmp, dst, denied_budget=RENAME_RETRY_BUDGET_S)  # a fresh tree: scanned
    except BaseException:
        # A failed cleanup must not hide the error that caused it.
        with contextlib.suppress(OSError, ProvisionerError):  # files in use, too
            safe_rmtree(tmp, require_marker=False)
        raise
    fsync_dir(dst.parent)


def link_or_copy(src: Path, dst: Path, *, link: bool = True) -> None:
    """Put the file ``src`` at ``dst``: a hardlink (where ``link`` and possible), or a copy.

    ``dst`` never exists half-written; an existing ``dst`` is replaced.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(dst, "link")
    try:
        if not link:
            raise OSError(errno.EXDEV, "a copy was asked for")
        os.link(os_path(src), os_path(tmp))
    except OSError:  # another filesystem, no hardlinks there, or a copy wanted
        def copy(fh: BinaryIO) -> None:
            with open(os_path(src), "rb") as source:
                shutil.copyfileobj(source, fh, 1 << 20)

        atomic_write_with(dst, copy)
        return
    try:
        rename_with_retry(tmp, dst, rename=os.replace)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(os_path(tmp))
        raise
