"""``gc`` of the shared package cache (``<home>/pkgs``).

Plain ``gc`` removes partial extractions (``.<name>XXXXXX`` dirs that an
interrupted rattler leaves) whenever it can take the cache's exclusive lock.
``gc --cache`` also removes what no remaining generation uses:

* extracted entries ``pkgs/<name>-<version>-<build>/`` (and rattler's
  ``<entry>.lock`` beside each) and downloaded archives ``pkgs/downloads/<file>``
  that no generation's ``conda-meta`` record names (``fn``,
  ``extracted_package_dir``); every generation left in ``envs/`` counts, and so
  does anything in ``.staging/`` that has records;
* partial downloads ``pkgs/downloads/.<file>.<pid>-<tid>.partial``.

It runs after the generations were collected, and only while it holds every
key's lock (taken without waiting) and the cache's exclusive lock: a build holds
its key's lock from its plan to its pointer switch, and the cache's shared lock
while rattler links, so no running build loses an archive or an entry it is
about to use. A build that starts meanwhile waits for these locks. The one gap: the
first build of a key that has no lock file yet, started while this runs, may find
an archive gone that it had just found present; it fails on the missing file and
succeeds when run again (entries are extracted again from the archives). A record
that cannot be read stops the collection of unused entries: what it names is
unknown, so nothing is called unused.

On Windows the cache has no exclusive lock (:func:`package_cache.cache_lock`), so
nothing in it is removed there, and the report says why.

Bytes freed count each inode once, and only when every one of its links is
removed: a file still hardlinked into an env (or anywhere else) frees nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from provisioner import fsops
from provisioner.build.home_checks import is_real_directory
from provisioner.build.key_lock import hold_key_lock, is_key_locked
from provisioner.build.layout import HomeLayout
from provisioner.build.package_cache import cache_lock, partial_entries
from provisioner.build.trash import Collector, GcInUse, GcItem, GcKind, GcSkip
from provisioner.errors import LockTimeoutError, ProvisionerError
from provisioner.keys import validate_env_key

DOWNLOADS = "downloads"
_ARCHIVE_SUFFIXES = (".conda", ".tar.bz2")


def _stem(file_name: str) -> str:
    return file_name.removesuffix(".conda").removesuffix(".tar.bz2")


@dataclass
class _Used:
    """What the remaining generations use, by cache entry name and archive file name."""

    entries: set[str] = field(default_factory=set)
    archives: set[str] = field(default_factory=set)


def _dirs(directory: Path) -> list[Path]:
    if not is_real_directory(directory):
        return []
    return sorted(p for p in directory.iterdir() if is_real_directory(p))


def _prefixes(layout: HomeLayout) -> Iterator[Path]:
    """Every generation in ``envs/`` and every build dir in ``.staging/``."""
    for key_dir in _dirs(layout.envs):
        yield from _dirs(key_dir)
    yield from _dirs(layout.staging)


def used_by_generations(layout: HomeLayout) -> _Used:
    """Entries and archives named by the records of every prefix (raises if one is unreadable)."""
    used = _Used()
    for prefix in _prefixes(layout):
        meta = prefix / "conda-meta"
        if not is_real_directory(meta):
            continue
        for record in sorted(meta.glob("*.json")):
            try:
                data = json.loads(record.read_text(encoding="utf-8"))
                fn = str(data.get("fn") or str(data["url"]).rsplit("/", 1)[-1])
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise ProvisionerError(f"could not read the record {record}: {exc}") from None
            used.archives.add(fn)
            used.entries.add(_stem(fn))
            extracted = data.get("extracted_package_dir")
            if isinstance(extracted, str) and extracted:
                used.entries.add(Path(extracted).name)
    return used


def _unused(cache: Path, used: _Used) -> list[tuple[GcKind, Path]]:
    """Cache entries, their rattler lock files, archives and partial downloads to remove."""
    found: list[tuple[GcKind, Path]] = []
    for entry in sorted(cache.iterdir()) if is_real_directory(cache) else []:
        name = entry.name
        if name.startswith(".") or name == DOWNLOADS:
            continue
        if is_real_directory(entry) and (entry / "info").is_dir() and name not in used.entries:
            found.append(("cache-entry", entry))
        elif (name.endswith(".lock") and entry.is_file() and not entry.is_symlink()
              and name.removesuffix(".lock") not in used.entries):
            found.append(("cache-entry", entry))  # rattler's lock file of an unused entry
    downloads = cache / DOWNLOADS
    for file in sorted(downloads.iterdir()) if is_real_directory(downloads) else []:
        if file.is_symlink() or not file.is_file():
            continue
        if file.name.startswith(".") and file.name.endswith(".partial"):
            found.append(("cache-partial", file))
        elif file.name.endswith(_ARCHIVE_SUFFIXES) and file.name not in used.archives:
            found.append(("cache-archive", file))
    return found


def _inodes(path: Path) -> dict[tuple[int, int], list[int]]:
    """(device, inode) -> [size, link count, links under ``path``]; links are not followed."""
    out: dict[tuple[int, int], list[int]] = {}
    paths = [path]
    if is_real_directory(path):
        for root, dirs, files in os.walk(path, followlinks=False):
            paths += [Path(root, n) for n in files]
            paths += [Path(root, d) for d in dirs if os.path.islink(os.path.join(root, d))]
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.lstat(p)
            if not stat.S_ISDIR(st.st_mode):
                out.setdefault((st.st_dev, st.st_ino), [st.st_size, st.st_nlink, 0])[2] += 1
    return out


def freed_bytes(paths: list[Path]) -> list[int]:
    """Bytes each path frees when all of ``paths`` go: an inode counts once, in the first
    path that holds it, and only if every one of its links is among ``paths``."""
    per_path = [_inodes(p) for p in paths]
    links: dict[tuple[int, int], int] = {}
    for inodes in per_path:
        for ino, (_size, _nlink, found) in inodes.items():
            links[ino] = links.get(ino, 0) + found
    seen: set[tuple[int, int]] = set()
    result = []
    for inodes in per_path:
        total = 0
        for ino, (size, nlink, _found) in inodes.items():
            if ino not in seen and links[ino] >= nlink:
                total += size
            seen.add(ino)
        result.append(total)
    return result


def _remove_all(found: list[tuple[GcKind, Path]], out: Collector) -> None:
    for (kind, path), size in zip(found, freed_bytes([p for _, p in found]), strict=True):
        if not out.dry_run:
            try:
                if is_real_directory(path):
                    fsops.safe_rmtree(path, require_marker=False)
                else:
                    fsops.remove_file(path)
            except fsops.InUseError as exc:  # held open elsewhere: left for the next gc
                out.in_use.append(GcInUse(kind, path, exc.in_use))
                continue
            except (ProvisionerError, OSError) as exc:
                out.skipped.append(GcSkip(path, f"could not remove: {exc}"))
                continue
        out.removed.append(GcItem(kind, path, size))


@contextlib.contextmanager
def _every_key_lock(layout: HomeLayout, dry_run: bool) -> Iterator[str | None]:
    """Hold every key's lock (probe only in a dry run); yield the first busy key, or None."""
    keys = {d.name for d in _dirs(layout.envs)}
    if is_real_directory(layout.locks):
        keys |= {p.name.removesuffix(".lock") for p in layout.locks.glob("*.lock")}
    with contextlib.ExitStack() as stack:
        for key in sorted(keys):
            try:
                validate_env_key(key)
            except ProvisionerError:
                continue
            if dry_run:
                busy = is_key_locked(layout.lock_file(key))
            else:
                try:
                    stack.enter_context(hold_key_lock(key, layout.lock_file(key), timeout=0))
                    busy = False
                except LockTimeoutError:
                    busy = True
            if busy:
                yield key
                return
        yield None


def collect_cache(layout: HomeLayout, out: Collector, *, unused: bool) -> None:
    """Partial extractions; with ``unused``, also unused entries, archives, partial downloads."""
    cache = layout.package_cache
    if not is_real_directory(cache):
        return
    if not unused:
        found: list[tuple[GcKind, Path]] = [("cache-partial", p) for p in partial_entries(cache)]
        if found:
            with cache_lock(cache, exclusive=True, wait=False) as free:
                if free:
                    _remove_all(found, out)
                else:
                    out.skipped.extend(GcSkip(p, "the package cache is in use by a build")
                                       for _, p in found)
        return
    with _every_key_lock(layout, out.dry_run) as busy:
        if busy is not None:
            out.skipped.append(GcSkip(cache, f"a build of {busy} is running; the package "
                                             "cache is collected when no build runs", busy))
            return
        with cache_lock(cache, exclusive=True, wait=False) as free:
            if not free:
                out.skipped.append(GcSkip(cache, "the package cache is in use by a build"))
                return
            try:
                used = used_by_generations(layout)
            except ProvisionerError as exc:
                out.skipped.append(GcSkip(cache, f"unused entries kept: {exc.message}"))
                used = None
            found = [("cache-partial", p) for p in partial_entries(cache)]
            if used is not None:
                found += _unused(cache, used)
            else:
                found += [(k, p) for k, p in _unused(cache, _Used()) if k == "cache-partial"]
            _remove_all(found, out)
