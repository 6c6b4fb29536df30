"""Conda package archives read as streams, with a budget on decompressed bytes.

A ``.tar.bz2`` is one bz2-compressed tar; a ``.conda`` is a zip holding
``metadata.json`` and two zstd-compressed tars (``info-*`` and ``pkg-*``). Each
stream stops with :class:`~provisioner.errors.UnsafePackageError` once it has
produced more than its budget, so a compression bomb is never fully inflated.
"""

from __future__ import annotations

import bz2
import io
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from provisioner.errors import UnsafePackageError

_HINT = "the package is malformed or hostile; remove it from the lock or fix the channel"


def _refuse(pkg: str, what: str, why: str) -> UnsafePackageError:
    return UnsafePackageError(f"package {pkg} refused: {what}: {why}", hint=_HINT)


class _Budget(io.RawIOBase):
    """A read-only stream that stops once ``limit`` decompressed bytes were read."""

    def __init__(self, inner: IO[bytes], limit: int, pkg: str) -> None:
        self.inner, self.limit, self.pkg, self.read_bytes = inner, limit, pkg, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.inner.read(len(buf))
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            raise _refuse(self.pkg, "(archive)", f"decompresses past {self.limit} bytes")
        buf[: len(data)] = data
        return len(data)


@contextmanager
def tar_streams(path: Path, limit: int, pkg: str) -> Iterator[list[IO[bytes]]]:
    """Decompressed tar streams of a ``.tar.bz2`` (one) or ``.conda`` (info and pkg)."""
    if path.name.endswith(".tar.bz2"):
        with bz2.open(path, "rb") as raw:
            yield [io.BufferedReader(_Budget(raw, limit, pkg))]
        return
    if not path.name.endswith(".conda"):
        raise _refuse(pkg, path.name, "not a .conda or .tar.bz2 archive")
    import zstandard

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        for name in names:
            if name != "metadata.json" and not re.fullmatch(r"(info|pkg)-[^/\\]+\.tar\.zst", name):
                raise _refuse(pkg, name, "unexpected member of a .conda archive")
        streams: list[IO[bytes]] = []
        for name in sorted(n for n in names if n.endswith(".tar.zst")):
            # One decompressor per stream: tarfile may stop before the end of the info
            # frame, and a shared one then starts the pkg stream mid-frame.
            reader = zstandard.ZstdDecompressor().stream_reader(  # type: ignore[arg-type]
                zf.open(name))
            streams.append(io.BufferedReader(_Budget(reader, limit, pkg)))  # type: ignore[arg-type]
        yield streams
