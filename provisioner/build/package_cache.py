"""The shared package cache (``<home>/pkgs``): locked, cleaned, checked and sized.

rattler extracts each package into ``pkgs/<name>-<version>-<build>/`` (next to a
``.lock`` file holding its sha256) and hardlinks envs from there, but it never
re-validates an entry: a truncated cached file was copied into a new env. An
interrupted extraction leaves a ``.<name>XXXXXX`` partial dir behind.

* Builds hold a *shared* flock on ``pkgs/.provisioner-cache.lock`` while they
  install; cleaning and repairing take it *exclusively*, so nothing a running
  build extracts or links from is ever removed. (POSIX only; on Windows the lock
  is a no-op and partial dirs are left to a later, idle ``gc``.)
* :func:`discard_damaged_entries` drops an entry whose ``info/paths.json``
  is not the verified archive's or whose files don't have the sizes it lists;
  rattler then extracts it again from the verified archive.
* :func:`check_free_space` refuses a build that cannot fit before it starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from provisioner import fsops
from provisioner.errors import UserError

if TYPE_CHECKING:  # the checks (tarfile, bz2, zstd) load only when a build runs
    from provisioner.build.package_checks import CheckedPackage

log = logging.getLogger(__name__)
LOCK_NAME = ".provisioner-cache.lock"
_RATTLER_FILES = {".cache.lock", LOCK_NAME}
_MARGIN = 64 << 20  # metadata, conda-meta records, fs overhead


class DiskFullError(UserError):
    """Not enough free space for a build (exit 2, with the sizes and the path)."""


@contextlib.contextmanager
def cache_lock(cache_dir: Path, *, exclusive: bool, wait: bool = True) -> Iterator[bool]:
    """Hold the cache's flock; yields whether it was taken (``wait=False`` may fail)."""
    if sys.platform == "win32":
        yield not exclusive  # no flock: never claim the exclusive right to clean
        return
    import fcntl

    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the flock


def partial_entries(cache_dir: Path) -> list[Path]:
    """Leftovers of interrupted extractions: dot-named dirs in the cache."""
    try:
        entries = list(os.scandir(cache_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(Path(e.path) for e in entries
                  if e.name.startswith(".") and e.name not in _RATTLER_FILES
                  and e.is_dir(follow_symlinks=False))


def clean_partial_entries(cache_dir: Path, *, dry_run: bool = False) -> list[Path]:
    """Remove partial entries when no build holds the cache; return what went (or would)."""
    found = partial_entries(cache_dir)
    if not found:
        return []
    with cache_lock(cache_dir, exclusive=True, wait=False) as free:
        if not free:
            log.info("package cache is in use; %d partial entries left for later", len(found))
            return []
        if dry_run:
            return found
        for path in found:
            fsops.safe_rmtree(path, require_marker=False)
        return found


def _stem(c: CheckedPackage) -> str:
    return c.artifact.package.file_name.removesuffix(".conda").removesuffix(".tar.bz2")


def _entry_problem(entry: Path, pj_sha256: str) -> str | None:
    pj = entry / "info" / "paths.json"
    try:
        raw = pj.read_bytes()
    except OSError:
        return "info/paths.json unreadable"
    if hashlib.sha256(raw).hexdigest() != pj_sha256:
        return "info/paths.json differs from the verified archive's"
    for e in json.loads(raw).get("paths", []):
        path = entry / e["_path"]
        ptype = e.get("path_type", "hardlink")
        try:
            st = os.lstat(path)
        except OSError:
            return f"{e['_path']} missing"
        if ptype == "hardlink" and e.get("size_in_bytes") not in (None, st.st_size):
            return f"{e['_path']} has {st.st_size} bytes, paths.json says {e['size_in_bytes']}"
    return None


def entry_matches(cache_dir: Path, file_name: str, sha256: str, paths_json_sha256: str) -> bool:
    """Whether rattler will link ``file_name`` from its cache entry without its archive.

    rattler's ``<entry>.lock`` holds an 8-byte revision and the sha256 the entry
    was extracted from; with the lock's sha256 there, rattler reads no archive.
    The entry must also still match the checked package's ``paths.json``.
    """
    stem = file_name.removesuffix(".conda").removesuffix(".tar.bz2")
    entry = cache_dir / stem
    try:
        recorded = (cache_dir / f"{stem}.lock").read_bytes()[8:40].hex()
    except OSError:
        return False
    return (recorded == sha256 and entry.is_dir() and not entry.is_symlink()
            and _entry_problem(entry, paths_json_sha256) is None)


def discard_damaged_entries(checked: Sequence[CheckedPackage], cache_dir: Path) -> list[str]:
    """Drop cache entries that don't match their verified archive (hold the lock exclusively)."""
    dropped = []
    for c in checked:
        stem = _stem(c)
        entry = cache_dir / stem
        if not entry.is_dir() or entry.is_symlink():
            continue
        problem = _entry_problem(entry, c.summary.paths_json_sha256)
        if problem is None:
            continue
        log.warning("package cache entry %s is damaged (%s); extracting it again", stem, problem)
        fsops.safe_rmtree(entry, require_marker=False)
        fsops.remove_file(cache_dir / f"{stem}.lock")
        dropped.append(stem)
    if dropped:  # an import check passed with the old bytes says nothing about the new ones
        from provisioner.build.import_memo import forget_packages

        forget_packages(cache_dir, [c.artifact.package.sha256 for c in checked
                                    if _stem(c) in dropped and c.artifact.package.sha256])
    return dropped


def bytes_needed(checked: Sequence[CheckedPackage], cache_dir: Path, *, copy: bool) -> int:
    """What a build writes: uncached packages, files patched per env, copies if forced."""
    needed = _MARGIN
    for c in checked:
        stem = _stem(c)
        if copy or not (cache_dir / stem).is_dir():
            needed += c.summary.unpacked_bytes
        needed += c.summary.placeholder_bytes
    return needed


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_free_space(checked: Sequence[CheckedPackage], cache_dir: Path, *, copy: bool,
                     free: int | None = None) -> None:
    """Refuse a build that needs more than the free space where the home is."""
    needed = bytes_needed(checked, cache_dir, copy=copy)
    available = fsops.free_disk_bytes(cache_dir) if free is None else free
    if needed > available:
        raise DiskFullError(
            f"the build needs {_gb(needed)}, {_gb(available)} free at {cache_dir.parent}",
            hint="free some space (provisioner gc), or move the home to a larger disk")


def _damaged(checked: Sequence[CheckedPackage], cache_dir: Path) -> bool:
    return any(_entry_problem(cache_dir / _stem(c), c.summary.paths_json_sha256) is not None
               for c in checked if (cache_dir / _stem(c)).is_dir())


def prepare(checked: Sequence[CheckedPackage], cache_dir: Path, *, copy: bool) -> None:
    """Before installing: clean leftovers, drop damaged entries, check the space.

    Waits for other builds' installs only when an entry needs repair.
    """
    with cache_lock(cache_dir, exclusive=True, wait=False) as held:
        if held:
            for path in partial_entries(cache_dir):
                fsops.safe_rmtree(path, require_marker=False)
            discard_damaged_entries(checked, cache_dir)
    if not held and _damaged(checked, cache_dir):
        with cache_lock(cache_dir, exclusive=True) as held:
            discard_damaged_entries(checked, cache_dir)
    check_free_space(checked, cache_dir, copy=copy)
