"""Channel names, their canonical URLs, and local mirrors.

Lockfiles always name a package by its channel's canonical URL
(``https://conda.anaconda.org/<channel>/<subdir>/<file>``), wherever it was
solved from. A *mirror* (``[channels]`` in ``provisioner.toml``, or
``<channel-root>/<name>``) only changes where metadata and packages are read
from, the way pixi's mirror configuration does. With a channel root, every
channel must resolve under it (or to a mirror): a missing one is an error
that names it, never a silent fallback to the live channel.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from urllib.parse import unquote, urlparse

from provisioner.config import Config
from provisioner.errors import SpecError, UserError

CANONICAL_BASE = "https://conda.anaconda.org"
_DRIVE_URL_PATH = re.compile(r"^/[A-Za-z][:|](/|$)")


@dataclass(frozen=True)
class ChannelSource:
    """One channel of a spec: its canonical URL and where it is read from."""

    name: str  # as written in the spec
    canonical: str  # no trailing slash
    source: str  # URL to read from (file:// for local mirrors), no trailing slash

    @property
    def is_mirrored(self) -> bool:
        return self.source != self.canonical

    def to_canonical(self, url: str) -> str:
        """Rewrite a package URL read from the source into its canonical form."""
        prefix = self.source + "/"
        if url.startswith(prefix):
            return self.canonical + "/" + url[len(prefix):]
        return url

    def to_source(self, url: str) -> str:
        """Rewrite a canonical package URL into the URL to download it from."""
        prefix = self.canonical + "/"
        if url.startswith(prefix):
            return self.source + "/" + url[len(prefix):]
        return url


def canonical_channel_url(name: str) -> str:
    """``pytorch`` -> ``https://conda.anaconda.org/pytorch``; URLs stay as they are."""
    if "://" in name:
        return name.rstrip("/")
    if not name.strip("/") or any(c.isspace() for c in name):
        raise SpecError(f"channel {name!r} is neither a channel name nor a URL")
    return f"{CANONICAL_BASE}/{name.strip('/')}"


def path_to_file_url(path: PurePath) -> str:
    """A ``file://`` URL for a local directory (absolute, no trailing slash).

    Windows spellings: ``C:\\x`` -> ``file:///C:/x``, a UNC share
    ``\\\\server\\share\\x`` -> ``file://server/share/x`` (the server is the URL's host).
    """
    if isinstance(path, Path):
        path = path.absolute()
    return path.as_uri().rstrip("/")


def file_url_to_pure_path(url: str, *, windows: bool) -> PurePath:
    """The path of a ``file://`` URL under Windows (``windows``) or POSIX path rules.

    The inverse of :func:`path_to_file_url`: ``file://server/share/x`` is the UNC
    path ``\\\\server\\share\\x`` on Windows (its host is the server, not dropped);
    ``file:///C:/x`` is ``C:\\x``. On POSIX a URL naming another host is no local
    path, and saying so beats reading ``/share/x`` on this machine.
    """
    parsed = urlparse(url)
    host = "" if parsed.netloc.lower() == "localhost" else parsed.netloc
    path = unquote(parsed.path)
    if windows:
        if host:
            return PureWindowsPath(f"//{host}{path}")
        if _DRIVE_URL_PATH.match(path):  # /C:/x or the old /C|/x
            path = f"{path[1]}:{path[3:] or '/'}"
        return PureWindowsPath(path)
    if host:
        raise UserError(
            f"file URL {url} names the host {host!r}: not a path on this machine",
            hint="mount the share and use file:///<mount point>, or a path in provisioner.toml",
        )
    return PurePosixPath(path)


def file_url_to_path(url: str) -> Path:
    """The local path of a ``file://`` URL (UNC shares kept on Windows)."""
    return Path(str(file_url_to_pure_path(url, windows=os.name == "nt")))


def resolve_channels(channels: tuple[str, ...] | list[str], config: Config) -> list[ChannelSource]:
    """Map each spec channel to its canonical URL and its (possibly mirrored) source."""
    result = []
    for name in channels:
        canonical = canonical_channel_url(name)
        short = name.strip("/") if "://" not in name else name
        mirror = config.channel_mirrors.get(short) or config.channel_mirrors.get(canonical)
        source = canonical
        if mirror is not None:
            source = mirror.rstrip("/") if "://" in mirror else path_to_file_url(Path(mirror))
            if "://" not in mirror and not Path(mirror).is_dir():
                raise SpecError(
                    f"mirror of channel '{name}' is not a directory: {Path(mirror).name}",
                    hint="fix [channels] in provisioner.toml",
                )
        elif config.channel_root is not None:
            source = _under_root(name, short, config.channel_root)
        result.append(ChannelSource(name=name, canonical=canonical, source=source))
    return result


def _under_root(name: str, short: str, root: Path) -> str:
    """The channel's directory under ``--channel-root``; never a fallback to the network."""
    if name.startswith("file://"):
        return name.rstrip("/")  # already local
    candidate = root / short if "://" not in name else None
    if candidate is None or not candidate.is_dir():
        raise SpecError(
            f"channel '{name}' has no directory under the channel root {root}"
            if candidate is not None else
            f"channel '{name}' is a URL, and a channel root serves named channels only",
            hint=f"add {root / (short if candidate is not None else '<name>')} or map the "
                 "channel in [channels] of provisioner.toml; nothing falls back to the network",
        )
    return path_to_file_url(candidate)


def source_for_url(url: str, sources: list[ChannelSource]) -> str:
    """Where to download a canonical package URL from, given the configured mirrors."""
    for src in sources:
        rewritten = src.to_source(url)
        if rewritten != url:
            return rewritten
    return url
