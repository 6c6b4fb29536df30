"""Package archives, verified against the lock's sha256 before anything is installed.

rattler does not check the hash of packages read from ``file://`` channels, so
provisioner verifies every archive itself: local mirror files in place, remote
ones after ``build.fetch`` downloaded them into ``<cache>/downloads`` (only
bytes that match the lock are ever renamed into place there; once extracted
and verified in the package cache they go again, see ``build.downloads``). Hashes
of unchanged files are remembered by (size, mtime, inode, ctime) so that warm
builds do not re-hash gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from provisioner import fsops
from provisioner.build.url_checks import confined_source
from provisioner.config import Config
from provisioner.errors import BuildError, IntegrityError, LockfileError
from provisioner.lock.channels import (
    ChannelSource,
    file_url_to_path,
    path_to_file_url,
    resolve_channels,
    source_for_url,
)
from provisioner.lock.lockfile import LockData, LockedPackage
from provisioner.progress import Phase

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class VerifiedArtifact:
    """A locked package and the local archive that matches its sha256."""

    package: LockedPackage
    path: Path

    @property
    def url(self) -> str:
        return path_to_file_url(self.path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _HashMemo:
    """path -> (size, mtime_ns, inode, ctime_ns, sha256), persisted as JSON in the cache.

    A user can set a file's size and mtime (``touch -d``), not its ctime or inode:
    bytes swapped under the same size and mtime are hashed again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dirty = False
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self.entries: dict[str, list[object]] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key = str(file)
        entry = self.entries.get(key)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == stamp:
            return str(entry[4])
        digest = sha256_file(file)
        self.entries[key] = [*stamp, digest]
        self.dirty = True
        return digest

    def forget(self, file: Path) -> None:
        if self.entries.pop(str(file), None) is not None:
            self.dirty = True

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fsops.atomic_write_text(self.path, json.dumps(self.entries, sort_keys=True))


def _channel_of(pkg: LockedPackage, sources: list[ChannelSource]) -> str:
    return next((s.name for s in sources if pkg.url.startswith(s.canonical + "/")), "")


def _fetch_missing(packages: Sequence[LockedPackage], sources: list[ChannelSource],
                   downloads: Path, timeout: float, config: Config | None,
                   cached: frozenset[str], download: Phase | None) -> None:
    from provisioner.build.fetch import FetchJob, fetch_all

    jobs = []
    for pkg in packages:
        if not pkg.sha256:
            raise LockfileError(
                f"{pkg.name} {pkg.version} has no sha256 in the lock; provisioner "
                "builds only fully hash-pinned locks",
                hint="regenerate the lock with 'provisioner lock'",
            )
        url = confined_source(pkg, sources)
        if not url.startswith("file://") and pkg.sha256 not in cached \
                and not (downloads / pkg.file_name).is_file():
            jobs.append(FetchJob(pkg, url, downloads / pkg.file_name,
                                 _channel_of(pkg, sources)))
    if download is not None:
        download.set_note(f"{len(jobs)} of {len(packages)} archives fetched")
    fetch_all(jobs, timeout=timeout, config=config,
              on_bytes=download.add if download is not None else None)


def forget_verified(cache_dir: Path, root: Path) -> None:
    """Drop the remembered hashes of files under ``root`` (an unpacked pack, now removed)."""
    memo = _HashMemo(cache_dir / "verified-sha256.json")
    prefix = str(root).rstrip("/\\")
    for key in [k for k in memo.entries if k.startswith((prefix + "/", prefix + "\\"))]:
        del memo.entries[key]
        memo.dirty = True
    memo.save()


def verify_artifacts(
    packages: Sequence[LockedPackage], sources: list[ChannelSource], cache_dir: Path,
    *, fetch_timeout: float = DOWNLOAD_TIMEOUT_S, config: Config | None = None,
    cached: frozenset[str] = frozenset(), download: Phase | None = None,
) -> list[VerifiedArtifact]:
    """Locate (or download, see ``build.fetch``) and verify every package.

    ``config`` gives the ``[s3-options]`` for ``s3://`` mirrors. A remote package
    whose sha256 is in ``cached`` and whose archive is gone is neither downloaded
    nor hashed: its verified package-cache entry serves it (``build.downloads``).
    ``download`` counts the bytes fetched (and expected) for a progress display.

    Raises on the first mismatch.
    """
    memo = _HashMemo(cache_dir / "verified-sha256.json")
    downloads = cache_dir / "downloads"
    _fetch_missing(packages, sources, downloads, fetch_timeout, config, cached, download)
    result = []
    try:
        for pkg in packages:
            url = confined_source(pkg, sources)
            downloaded = not url.startswith("file://")
            if downloaded:
                path = downloads / pkg.file_name
                if pkg.sha256 in cached and not path.is_file():
                    result.append(VerifiedArtifact(pkg, path))
                    continue
            else:
                path = file_url_to_path(url)
                if not path.is_file():
                    raise BuildError(
                        f"{pkg.file_name} is missing from the channel mirror ({path.parent})",
                        hint="check [channels] in provisioner.toml",
                    )
            actual = memo.sha256(path)
            if actual != pkg.sha256:
                memo.forget(path)
                if downloaded:
                    fsops.remove_file(path)
                raise IntegrityError(
                    f"sha256 mismatch for {pkg.name} {pkg.version} ({pkg.file_name}): "
                    f"lock has {pkg.sha256}, archive has {actual}",
                    hint="the archive or the lock was altered; relock, or fix the mirror",
                )
            result.append(VerifiedArtifact(pkg, path))
    finally:
        memo.save()
    return result


def locate_sizes(
    config: Config, lock: LockData, packages: Sequence[LockedPackage]
) -> dict[str, object]:
    """Archive sizes, where the channel is a local mirror (for ``ensure --dry-run``)."""
    sources = resolve_channels(lock.channels, config)
    total = 0
    known = 0
    for pkg in packages:
        url = source_for_url(pkg.url, sources)
        if url.startswith("file://"):
            path = file_url_to_path(url)
            if path.is_file():
                total += path.stat().st_size
                known += 1
    return {"archive_bytes": total if known == len(packages) else None,
            "archives_known": known}
