"""Deleting envs, staging dirs and legacy venvs without ever leaving half of one.

A tree leaves its place by one rename into the home's ``.trash/`` (atomic: the
env is whole where it was, or gone from there), then its contents are deleted
in the trash, with the in-progress marker, the fingerprint and ``pyvenv.cfg``
after everything else and the ownership marker last
(:func:`provisioner.fsops.safe_rmtree`). Files that another process holds open
(a running ``python.exe``, a loaded DLL on Windows) are retried for a bounded
time, then reported and left, still marked, for the next ``gc``. A rename that
a running process refuses moves nothing: the tree stays whole and is reported.

Also the records ``gc`` keeps of what it removed, kept, skipped and could not
finish (:class:`Collector`), which hold the deletion policy per kind of path.
"""

from __future__ import annotations

import errno
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from provisioner import fsops
from provisioner.build import orphans
from provisioner.build.home_checks import is_real_directory
from provisioner.build.layout import FINGERPRINT_NAME, IN_PROGRESS_NAME, HomeLayout
from provisioner.errors import ProvisionerError

log = logging.getLogger(__name__)

#: what identifies a tree, deleted after everything else in it (the marker goes after these)
LAST_PATHS = (IN_PROGRESS_NAME, FINGERPRINT_NAME, "pyvenv.cfg", ".venv/pyvenv.cfg")
#: seconds a rename into the trash rides out sharing violations: deletion can wait for gc
TRASH_RENAME_BUDGET_S = 2.0

GcKind = Literal["staging", "trash", "generation", "cache-partial", "cache-entry", "cache-archive"]


@dataclass(frozen=True)
class Discarded:
    """Where a discarded tree went, and what of it another process still holds."""

    path: Path
    trashed: Path
    in_use: tuple[str, ...] = ()


def _stem(layout: HomeLayout, path: Path) -> str:
    """``<key>.<generation>`` for a generation or staging dir, so gc files it under its key."""
    if path.parent == layout.staging:
        return path.name.rpartition(".")[0] or path.name
    return f"{path.parent.name}.{path.name}"


def move_to_trash(layout: HomeLayout, path: Path, *, stem: str | None = None,
                  require_marker: bool = True, in_place_ok: bool = False) -> Path:
    """Rename ``path`` into the trash (one rename) and return where it is now.

    Raises :class:`~provisioner.fsops.InUseError` when another process's open
    files refuse the rename (nothing moved), :class:`~provisioner.fsops.UnsafeDeleteError`
    for a link, a non-directory, or (``require_marker``) an unmarked tree. With
    ``in_place_ok``, a tree on another filesystem than the home stays where it
    is (``path`` comes back) and is deleted there.
    """
    if not is_real_directory(path):
        raise fsops.UnsafeDeleteError(f"refusing to delete {path}: it is not a directory "
                                      "(a link, a file or nothing)")
    if require_marker and not fsops.has_marker(path):
        raise fsops.UnsafeDeleteError(f"refusing to delete {path}: it has no "
                                      f"{fsops.MARKER_NAME} marker")
    layout.trash.mkdir(parents=True, exist_ok=True)
    trashed = layout.trash / f"{stem or _stem(layout, path)}.{secrets.token_hex(4)}"
    try:
        fsops.rename_with_retry(path, trashed, budget=TRASH_RENAME_BUDGET_S)
    except OSError as exc:
        if fsops.is_in_use(exc):
            raise fsops.InUseError(path, [str(path)]) from exc
        if not (in_place_ok and exc.errno == errno.EXDEV):
            raise
        return path
    return trashed


def discard(layout: HomeLayout, path: Path, *, stem: str | None = None,
            require_marker: bool = True, in_place_ok: bool = False) -> Discarded:
    """:func:`move_to_trash`, then delete it there (marker last).

    Files still in use after the retries are returned in
    :attr:`Discarded.in_use`; they stay, marked, in the trash for ``gc``.
    """
    trashed = move_to_trash(layout, path, stem=stem, require_marker=require_marker,
                            in_place_ok=in_place_ok)
    gone = _delete_here(trashed, require_marker=trashed == path)
    return Discarded(path, trashed, gone.in_use)


def _delete_here(path: Path, *, require_marker: bool = False) -> Discarded:
    try:
        fsops.safe_rmtree(path, require_marker=require_marker, last=LAST_PATHS)
    except fsops.InUseError as exc:
        return Discarded(path, path, exc.in_use)
    return Discarded(path, path)


def purge(trashed: Path, doing: str) -> None:
    """Delete what :func:`move_to_trash` moved; a failure is logged, never raised."""
    try:
        gone = _delete_here(trashed)
    except (ProvisionerError, OSError) as exc:
        log.warning("%s: could not remove %s: %s", doing, trashed, exc)
        return
    if gone.in_use:
        log.warning("%s: %d file(s) in use by another process stay in %s until the next "
                    "'provisioner gc'", doing, len(gone.in_use), trashed)


def cleanup(layout: HomeLayout, path: Path, doing: str, *, require_marker: bool = True) -> None:
    """:func:`discard` ``path`` if it exists; a failure is logged, never raised.

    For cleanups on the way out of an error (the real error must surface) and of
    leftovers that do not block the work at hand (a failed trash delete never fails
    ``ensure``).
    """
    try:
        if path.exists() or path.is_symlink():
            gone = discard(layout, path, require_marker=require_marker, in_place_ok=True)
            if gone.in_use:
                log.warning("%s: %d file(s) in use by another process stay in %s until the "
                            "next 'provisioner gc'", doing, len(gone.in_use), gone.trashed)
    except (ProvisionerError, OSError) as exc:
        log.warning("%s: could not remove %s: %s", doing, path, exc)


# --------------------------------------------------------------------------- gc records


@dataclass(frozen=True)
class GcItem:
    """One path that ``gc`` removed (or, in a dry run, would remove)."""

    kind: GcKind
    path: Path
    bytes: int
    key: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "key": self.key, "path": str(self.path), "bytes": self.bytes}


@dataclass(frozen=True)
class GcSkip:
    """One path (or key) that ``gc`` left alone, and why."""

    path: Path
    reason: str
    key: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"key": self.key, "path": str(self.path), "reason": self.reason}


@dataclass(frozen=True)
class GcInUse:
    """A path ``gc`` could not finish: files in it are held open by another process.

    ``path`` is where the tree is now (in ``.trash/``, or where it was when the
    rename was refused); it keeps its marker, and the next ``gc`` retries it.
    """

    kind: GcKind
    path: Path
    files: tuple[str, ...]
    key: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "key": self.key, "path": str(self.path),
                "files": list(self.files)}


@dataclass
class Collector:
    """What one ``gc`` run did so far; :meth:`remove` deletes by the policy for each kind."""

    layout: HomeLayout
    dry_run: bool
    removed: list[GcItem] = field(default_factory=list)
    kept: list[GcSkip] = field(default_factory=list)
    skipped: list[GcSkip] = field(default_factory=list)
    in_use: list[GcInUse] = field(default_factory=list)

    def remove(self, kind: GcKind, path: Path, key: str | None) -> bool:
        """Delete ``path``; return whether it left its place (in a dry run: would)."""
        size = fsops.tree_size(path)
        if not self.dry_run:
            try:
                if kind == "staging":  # its build is dead: stop what it left running first
                    orphans.stop_build_processes(path)
                if kind in ("staging", "generation"):
                    gone = discard(self.layout, path)
                else:
                    # Trash entries were renamed there by provisioner, and a partly deleted
                    # tree may have lost its marker already; partial cache entries have none.
                    gone = _delete_here(path)
            except fsops.InUseError as exc:  # the rename was refused: nothing moved
                self.in_use.append(GcInUse(kind, path, exc.in_use, key))
                return False
            except (ProvisionerError, OSError) as exc:
                self.skipped.append(GcSkip(path, f"could not remove: {exc}", key))
                return False
            if gone.in_use:
                self.in_use.append(GcInUse(kind, gone.trashed, gone.in_use, key))
                return True
        self.removed.append(GcItem(kind, path, size, key))
        return True

    def log_in_use(self) -> None:
        """One log line for everything left in use (the details are in the report)."""
        if self.in_use:
            log.warning("gc: %d path(s) hold files in use by another process, left (marked) "
                        "for the next gc: %s", len(self.in_use),
                        ", ".join(str(i.path) for i in self.in_use))
