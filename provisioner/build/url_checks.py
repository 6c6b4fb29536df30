"""Lock URLs are confined to the channels the lock names (and their configured mirrors).

A lock is an input like any other: a ``file://`` URL outside every mirror, a
``..`` path, or an ``http://`` host that is no channel of the lock was fetched
before, as long as its sha256 matched. Now every package URL must be
``<channel>/<subdir>/<file>`` of one of the lock's channels, exactly, with no
query, fragment, dot segment or escape; it is then rewritten to the channel's
source, and a ``file://`` source must stay inside the mirror's root once
normalised (symlinks included). ``http://`` is fetched only where a channel
itself is configured that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

from provisioner.errors import LockfileError
from provisioner.lock.channels import ChannelSource, file_url_to_path
from provisioner.lock.lockfile import LockedPackage

_BAD_CHARS = ("\\", "\x00", "\n", "\r", "?", "#", "%")


def _refuse(pkg: LockedPackage, why: str) -> LockfileError:
    return LockfileError(f"lock URL of {pkg.name} {pkg.version} refused: {why}: {pkg.url[:300]}",
                         hint="relock with 'provisioner lock', or fix the lockfile's url fields")


def _segment_ok(segment: str) -> bool:
    # Conda subdirs and file names never need percent-encoding; refusing it closes %2F tricks.
    return bool(segment) and segment not in (".", "..") and not any(
        c in segment for c in _BAD_CHARS)


def confined_source(pkg: LockedPackage, sources: Sequence[ChannelSource]) -> str:
    """Where to fetch ``pkg`` from; raise ``LockfileError`` if its URL leaves its channels."""
    parts = urlsplit(pkg.url)
    if parts.query or parts.fragment or "?" in pkg.url or "#" in pkg.url:
        raise _refuse(pkg, "a query or fragment")
    if any(seg in (".", "..") or unquote(seg) in (".", "..") for seg in parts.path.split("/")):
        raise _refuse(pkg, "a '.' or '..' path segment")
    for src in sources:
        prefix = src.canonical + "/"
        if not pkg.url.startswith(prefix):
            continue
        rest = pkg.url[len(prefix):].split("/")
        if len(rest) != 2 or not all(_segment_ok(s) for s in rest):
            raise _refuse(pkg, f"not <subdir>/<file> of channel {src.name}")
        url = f"{src.source}/{rest[0]}/{rest[1]}"
        if url.startswith("file://"):
            root = file_url_to_path(src.source).resolve()
            path = file_url_to_path(url).resolve()
            if not path.is_relative_to(root):
                raise _refuse(pkg, f"resolves outside the mirror of {src.name} ({root})")
        return url
    names = ", ".join(s.canonical for s in sources) or "none"
    raise _refuse(pkg, f"not in any channel the lock names ({names})")
