"""Plain data for conda-lock v1 lockfiles.

These classes hold what provisioner needs from a lockfile without importing
conda-lock (which is slow to import): :mod:`provisioner.lock.reader` reads
them by structure, :mod:`provisioner.lock.conda_lock_io` writes them with
conda-lock's own models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.errors import LockfileError

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MD5_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class LockedPackage:
    """One package of one platform in a lockfile."""

    name: str
    version: str
    manager: str  # "conda" or "pip"
    platform: str
    url: str
    sha256: str | None
    md5: str | None = None
    dependencies: tuple[tuple[str, str], ...] = ()
    categories: tuple[str, ...] = ("main",)

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def build(self) -> str:
        """The build string, taken from the conda file name (empty for pip)."""
        if self.manager != "conda":
            return ""
        stem = self.file_name.removesuffix(".conda").removesuffix(".tar.bz2")
        return stem.rsplit("-", 1)[-1] if stem.count("-") >= 2 else ""

    @property
    def subdir(self) -> str:
        parts = self.url.rstrip("/").split("/")
        return parts[-2] if len(parts) >= 2 else ""

    @property
    def channel_url(self) -> str:
        """The channel part of the URL (everything before ``/<subdir>/<file>``)."""
        return self.url.rsplit("/", 2)[0]


@dataclass(frozen=True)
class LockData:
    """A whole lockfile: metadata plus packages of every platform."""

    platforms: tuple[str, ...]
    channels: tuple[str, ...]
    content_hash: dict[str, str]
    packages: tuple[LockedPackage, ...]
    sources: tuple[str, ...] = ()
    #: ``metadata.custom_metadata``: conda-lock keeps it; provisioner's own facts live there
    extra: dict[str, str] = field(default_factory=dict)

    def for_platform(self, platform: str, manager: str | None = None) -> list[LockedPackage]:
        """Packages of ``platform`` (optionally of one manager), sorted by name."""
        return sorted(
            (p for p in self.packages
             if p.platform == platform and (manager is None or p.manager == manager)),
            key=lambda p: p.name,
        )


def validate_hashes(pkg: LockedPackage, source: str) -> None:
    """Reject a package whose hashes are not well-formed lower-case hex."""
    # conda-lock v1 allows md5-only entries (old pytorch-nightly packages have no sha256);
    # building requires a sha256 and checks that separately.
    if pkg.sha256 is None and pkg.md5 is not None and _MD5_RE.fullmatch(pkg.md5):
        return
    if pkg.sha256 is None or not _SHA256_RE.fullmatch(pkg.sha256):
        raise LockfileError(
            f"{source}: package {pkg.name} {pkg.version} ({pkg.platform}) has a malformed "
            f"sha256 {pkg.sha256!r}",
            hint="regenerate the lock with 'provisioner lock'",
        )
    if pkg.md5 is not None and not _MD5_RE.fullmatch(pkg.md5):
        raise LockfileError(
            f"{source}: package {pkg.name} {pkg.version} has a malformed md5 {pkg.md5!r}"
        )


def lockfile_path(locks_dir: Path, key: str) -> Path:
    """``lockfiles/<key>.conda-lock.yml``."""
    return locks_dir / f"{key}.conda-lock.yml"
