"""``provisioner mirror KEY... DIR``: a static channel subset that any static host can serve.

``DIR/<channel name>/<subdir>/`` holds every conda archive the keys' locks pin
(for their platforms, or the ones asked for), each subdir indexed with
rattler's indexer. It is plain files: copy it to an S3 bucket, a web server or
a CDN, or mount it, and point provisioner at it::

    channel-root = "/mnt/mirror"                        # every channel under one root
    [channels]
    pytorch = "https://mirror.example.com/pytorch"     # or per channel
    conda-forge = "s3://bucket/mirror/conda-forge"

Lockfiles keep their canonical URLs; only where archives are read from
changes. Archives are verified against the lock before they are added, an
existing file of the same name must have the same bytes, and running it again
adds the new archives of other keys or relocks to the same directory. The pip
layer's wheels are not part of a channel: serve them with ``[pip] find-links``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from provisioner import fscopy
from provisioner.build.artifacts import sha256_file, verify_artifacts
from provisioner.build.layout import HomeLayout
from provisioner.build.pack import index_pack_channel
from provisioner.config import Config
from provisioner.errors import IntegrityError, LockfileError, UserError
from provisioner.keys import validate_env_key
from provisioner.lock.channels import ChannelSource, resolve_channels
from provisioner.lock.lockfile import LockedPackage, lockfile_path
from provisioner.lock.platforms import validate_platform

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class MirrorResult:
    """What ``mirror`` wrote into ``directory``."""

    directory: Path
    keys: list[str]
    platforms: dict[str, list[str]] = field(default_factory=dict)  # key -> platforms
    channels: dict[str, int] = field(default_factory=dict)  # channel dir -> archives in it
    added: int = 0
    present: int = 0
    bytes_added: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"directory": str(self.directory), "keys": self.keys,
                "platforms": self.platforms,
                "channels": [{"name": name, "path": str(self.directory / name),
                              "archives": count} for name, count in sorted(self.channels.items())],
                "added": self.added, "present": self.present, "bytes_added": self.bytes_added}


def channel_dir_name(source: ChannelSource) -> str:
    """The folder of a channel in a mirror: its name (``conda-forge``, ``pytorch/label/x``)."""
    name = source.name.strip("/")
    if "://" in name or not all(_SEGMENT.fullmatch(s) for s in name.split("/")):
        raise UserError(f"channel {source.name!r} is not a channel name; a mirror holds "
                        "named channels only",
                        hint="name the channel in the spec (e.g. conda-forge), and map it to a "
                             "mirror in provisioner.toml")
    return name


def _owner(pkg: LockedPackage, sources: Sequence[ChannelSource]) -> ChannelSource:
    for src in sources:
        if pkg.url.startswith(src.canonical + "/"):
            return src
    raise LockfileError(f"{pkg.name} {pkg.version}: {pkg.url} is in no channel of the lock",
                        hint="relock with 'provisioner lock'")


def make_mirror(config: Config, keys: Sequence[str], directory: Path, *,
                platforms: Sequence[str] = ()) -> MirrorResult:
    """Add every conda archive of ``keys`` (all their locked platforms, or ``platforms``)."""
    from provisioner.lock.reader import read_lockfile

    if not keys:
        raise UserError("name at least one key to mirror")
    wanted = [validate_platform(p) for p in platforms]
    out = MirrorResult(directory=directory.absolute(), keys=[validate_env_key(k) for k in keys])
    cache = HomeLayout(config.home).package_cache
    touched: set[str] = set()
    done: set[Path] = set()  # noarch archives come once per platform
    for key in out.keys:
        path = lockfile_path(config.locks_dir, key)
        if not path.is_file():
            raise LockfileError(f"{key} has no lock ({path.name})",
                                hint=f"run 'provisioner lock {key}' first")
        lock = read_lockfile(path)
        plats = [p for p in lock.platforms if not wanted or p in wanted]
        if not plats:
            raise UserError(f"the lock of {key} has none of the platforms {', '.join(wanted)}",
                            hint=f"it locks {', '.join(lock.platforms)}")
        out.platforms[key] = plats
        sources = resolve_channels(lock.channels, config)
        for plat in plats:
            artifacts = verify_artifacts(lock.for_platform(plat, "conda"), sources, cache,
                                         fetch_timeout=config.fetch_timeout, config=config)
            for art in artifacts:
                name = channel_dir_name(_owner(art.package, sources))
                touched.add(name)
                dst = out.directory / name / art.package.subdir / art.package.file_name
                if dst not in done:
                    done.add(dst)
                    _add(out, art.path, dst, art.package.sha256)
    for name in sorted(touched):
        index_pack_channel(out.directory / name)
        out.channels[name] = sum(1 for p in (out.directory / name).glob("*/*")
                                 if p.name.endswith((".conda", ".tar.bz2")))
    return out


def _add(out: MirrorResult, src: Path, dst: Path, sha256: str | None) -> None:
    if dst.is_file():
        if sha256_file(dst) != sha256:
            raise IntegrityError(f"the mirror already holds another {dst.name} (in {dst.parent})",
                                 hint="a channel's archive never changes under one name; "
                                      "remove the stale file, or mirror into a new directory")
        out.present += 1
        return
    # A copy: a mirror is edited and uploaded by hand, and must never share an inode
    # with the package cache or a channel it was read from.
    fscopy.link_or_copy(src, dst, link=False)
    out.added += 1
    out.bytes_added += dst.stat().st_size
