"""One copy on disk: a downloaded archive goes once its package-cache entry is verified.

A remote package used to stay twice in the home: the archive in
``<cache>/downloads/`` and its extracted entry in ``<cache>/<name>-<version>-<build>/``,
which envs hardlink from. With the rattler backend only the entry is needed
afterwards: rattler links from an entry whose ``.lock`` records the sha256 it asks
for and never opens the archive. So, after a build is promoted,
:func:`drop_downloaded_archives` removes each downloaded archive whose entry holds
that sha256 and still matches the checked package; and before the next build
:func:`cached_without_archive` names the packages that need no archive, so that
``verify_artifacts`` neither downloads nor hashes them.

Where an archive is needed again it is downloaded again (and verified against the
lock first): an entry ``gc --cache`` removed or that a check found damaged, a
``verify --deep --repair`` whose cache entry lacks the file, another backend.
Archives in local mirrors (``file://``) are never touched, and archives are only
dropped while no other build holds the cache (its flock, taken without waiting):
a build that found an entry intact can still lose it to a concurrent cleaner before
it links, and then fails with an error that a rerun fixes by downloading again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from provisioner import fsops
from provisioner.build.artifacts import VerifiedArtifact
from provisioner.build.package_cache import cache_lock, entry_matches
from provisioner.build.package_checks import remembered_summaries
from provisioner.config import PackageLimits
from provisioner.lock.channels import ChannelSource, source_for_url
from provisioner.lock.lockfile import LockedPackage

log = logging.getLogger(__name__)
DOWNLOADS = "downloads"


def cached_without_archive(packages: Sequence[LockedPackage], sources: list[ChannelSource],
                           cache_dir: Path, limits: PackageLimits) -> frozenset[str]:
    """sha256s of the remote packages whose archive is gone but whose cache entry serves them."""
    downloads = cache_dir / DOWNLOADS
    summaries = remembered_summaries(cache_dir, limits)
    found = set()
    for pkg in packages:
        summary = summaries.get(pkg.sha256 or "")
        if summary is None or (downloads / pkg.file_name).exists() \
                or source_for_url(pkg.url, sources).startswith("file://"):
            continue
        if entry_matches(cache_dir, pkg.file_name, pkg.sha256 or "", summary.paths_json_sha256):
            found.add(pkg.sha256 or "")
    return frozenset(found)


def drop_downloaded_archives(artifacts: Sequence[VerifiedArtifact], cache_dir: Path,
                             limits: PackageLimits) -> int:
    """Remove downloaded archives whose cache entries are verified; return the bytes freed."""
    downloads = cache_dir / DOWNLOADS
    mine = [a for a in artifacts if a.path.parent == downloads and a.path.is_file()]
    if not mine:
        return 0
    freed = 0
    with cache_lock(cache_dir, exclusive=True, wait=False) as free:
        if not free:
            log.info("package cache is in use; downloaded archives are kept for now")
            return 0
        summaries = remembered_summaries(cache_dir, limits)
        for art in mine:
            pkg = art.package
            summary = summaries.get(pkg.sha256 or "")
            if summary is None or not entry_matches(cache_dir, pkg.file_name, pkg.sha256 or "",
                                                    summary.paths_json_sha256):
                continue
            size = art.path.stat().st_size
            fsops.remove_file(art.path)
            freed += size
    log.info("dropped %d bytes of downloaded archives now in the package cache", freed)
    return freed
