"""Locked archives that changed in their channel under the same file name.

A relock prefers the locked records, and rattler's solver keeps a preferred
record as it is, old sha256 included: a channel archive rebuilt under the same
name, version and build would stay locked with hashes that no longer match, and
every ``ensure`` would then fail. So before a relock, each locked package is
compared with the channel's record for the same file name (sha256 and md5),
and the changed ones are relocked from the channel, held at their locked
version and build. ``lock --check`` does not do this: it stays a fast,
solve-free comparison of content hashes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from provisioner.lock.channels import ChannelSource
from provisioner.lock.lockfile import LockedPackage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChangedArchive:
    """A locked package whose archive in the channel now has other bytes."""

    name: str
    version: str
    platform: str
    file_name: str
    locked_sha256: str | None
    channel_sha256: str | None

    def describe(self) -> str:
        """One line for the user."""
        old = (self.locked_sha256 or "none")[:12]
        new = (self.channel_sha256 or "none")[:12]
        return (f"{self.name} {self.version} ({self.platform}): the channel's {self.file_name} "
                f"changed under the same name (sha256 {old}... -> {new}...)")

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "platform": self.platform,
                "file_name": self.file_name, "locked_sha256": self.locked_sha256,
                "channel_sha256": self.channel_sha256}


def _source_url(pkg: LockedPackage, sources: Sequence[ChannelSource]) -> str | None:
    for channel in sources:
        if pkg.url.startswith(channel.canonical + "/"):
            return channel.to_source(pkg.url)
    return None


def changed_archives(
    packages: Sequence[LockedPackage], sources: Sequence[ChannelSource], platform: str,
    gateway: Any = None,
) -> list[ChangedArchive]:
    """The locked ``packages`` of ``platform`` whose channel record has another sha256 or md5.

    Packages the channel no longer lists are left to the solve (which drops or
    replaces them); only the same file name with other bytes counts here.
    """
    if not packages or not sources:
        return []
    import rattler

    from provisioner.lock.solve import run_rattler

    wanted = {url: pkg for pkg in packages if (url := _source_url(pkg, sources)) is not None}
    if not wanted:
        return []
    names = sorted({pkg.name for pkg in wanted.values()})
    subdirs: list[Any] = [platform, "noarch"]
    try:
        result = run_rattler((gateway or rattler.Gateway()).query(
            [rattler.Channel(c.source) for c in sources], subdirs,
            [rattler.MatchSpec(name) for name in names], recursive=False,
        ))
    except Exception as exc:  # rattler's own errors; the solve that follows reports them well
        log.debug("could not compare locked archives with the channel: %s", exc)
        return []
    changed = []
    for records in result:
        for record in records:
            pkg = wanted.get(str(record.url))
            if pkg is None:
                continue
            sha = record.sha256.hex() if record.sha256 else None
            md5 = record.md5.hex() if record.md5 else None
            if (sha and pkg.sha256 and sha != pkg.sha256) or (md5 and pkg.md5 and md5 != pkg.md5):
                changed.append(ChangedArchive(pkg.name, pkg.version, platform, pkg.file_name,
                                              pkg.sha256, sha))
    for item in changed:
        log.warning("%s; relocking it", item.describe())
    return sorted(changed, key=lambda c: (c.name, c.file_name))
