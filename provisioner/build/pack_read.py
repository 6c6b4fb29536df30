"""Reading a pack (:mod:`provisioner.build.pack`) back, as untrusted input.

Only its headers are read to learn its key, platform and lock (a tar of
archives is skipped through with seeks); a build then unpacks it into a fresh
directory. Every member must be a plain file or directory at a path of the
pack's layout, listed in its manifest with that size and sha256; a member that
is not, a missing one (a truncated download) or a cut-off tar stops the read
with one line, before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from provisioner import fsops
from provisioner.build.pack import (
    CHANNEL,
    ENVIRONMENT,
    MANIFEST,
    METADATA,
    OWN,
    PACK_FORMAT,
    PYPI,
    lock_member,
    spec_member,
)
from provisioner.errors import EnvironmentProblemError, IntegrityError, UserError
from provisioner.keys import validate_env_key
from provisioner.paths import free_disk_bytes

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SMALL = 64 << 20  # the manifest and pixi-pack.json are a few KiB; refuse to read more
_CHUNK = 1 << 20
_NAME_BAD = ("\\", "\x00", ":")


class PackError(UserError):
    """A pack that cannot be used: not a pack, truncated, for another platform or lock."""


@dataclass(frozen=True)
class PackInfo:
    """What a pack says about itself (its manifest), checked for shape."""

    file: Path
    label: str  # how the user named it
    key: str
    platform: str
    lock_sha256: str
    files: dict[str, tuple[str, int]]  # member -> (sha256, bytes)

    def to_dict(self) -> dict[str, object]:
        return {"source": self.label, "key": self.key, "platform": self.platform,
                "lock_sha256": self.lock_sha256, "files": len(self.files)}


def _damaged(label: str, why: str) -> PackError:
    return PackError(f"pack {label} is truncated or damaged: {why}",
                     hint="download or copy the pack again, or make it again with "
                          "'provisioner pack'")


def _members(tar: tarfile.TarFile, label: str) -> Iterator[tarfile.TarInfo]:
    try:
        while (member := tar.next()) is not None:
            yield member
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _damaged(label, str(exc) or type(exc).__name__) from None


def _open(file: Path, label: str) -> tarfile.TarFile:
    try:
        return tarfile.open(file, mode="r:")
    except FileNotFoundError:
        raise PackError(f"pack {label} does not exist",
                        hint="give the path or URL of a file made by 'provisioner pack'") from None
    except (tarfile.TarError, EOFError) as exc:
        raise PackError(f"pack {label} is not a pack (not an uncompressed tar: {exc})",
                        hint="give a file made by 'provisioner pack'") from None
    except OSError as exc:
        raise PackError(f"cannot read pack {label}: {exc.strerror or exc}",
                        hint="give the path or URL of a file made by 'provisioner pack'"
                        ) from None


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, label: str) -> Any:
    if not member.isfile() or member.size > _SMALL:
        raise PackError(f"pack {label}: {member.name} is not a small regular file")
    handle = tar.extractfile(member)
    assert handle is not None  # a regular file
    try:
        raw = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _damaged(label, str(exc)) from None
    if len(raw) != member.size:
        raise _damaged(label, f"{member.name} is cut short")
    try:
        return json.loads(raw)
    except ValueError:
        raise PackError(f"pack {label}: {member.name} is not JSON") from None


def read_pack_info(file: Path, label: str) -> PackInfo:
    """The pack's manifest and pixi-pack metadata; raises :class:`PackError` when unusable."""
    found: dict[str, Any] = {}
    with _open(file, label) as tar:
        for member in _members(tar, label):
            if member.name in (MANIFEST, METADATA) and member.name not in found:
                found[member.name] = _read_small(tar, member, label)
    if METADATA in found and MANIFEST not in found and _complete(file):
        raise PackError(f"pack {label} is a pixi-pack without provisioner's manifest and lock",
                        hint="make it with 'provisioner pack', or unpack it with pixi-unpack")
    if METADATA not in found or MANIFEST not in found:
        missing = METADATA if METADATA not in found else MANIFEST
        raise PackError(f"pack {label} is truncated or not a pack: it has no {missing}",
                        hint="make the pack with 'provisioner pack', or copy it again")
    meta, manifest = found[METADATA], found[MANIFEST]
    if not isinstance(meta, dict) or meta.get("version") != PACK_FORMAT:
        raise PackError(f"pack {label}: unsupported pack format "
                        f"{meta.get('version') if isinstance(meta, dict) else meta!r}")
    return _checked_manifest(file, label, manifest, meta.get("platform"))


def _complete(file: Path) -> bool:
    """Whether the tar ends with its end-of-archive blocks (two zero blocks), i.e. is whole."""
    try:
        with file.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            if size < 1024 or size % 512:
                return False
            fh.seek(size - 1024)
            return fh.read(1024) == bytes(1024)
    except OSError:
        return False


def _checked_manifest(file: Path, label: str, manifest: Any, platform: object) -> PackInfo:
    def bad(why: str) -> PackError:
        return PackError(f"pack {label}: its manifest {why}")

    if not isinstance(manifest, dict) or manifest.get("format") != 1:
        raise bad("is not a format-1 manifest")
    key, files = manifest.get("key"), manifest.get("files")
    if not isinstance(key, str) or not isinstance(files, dict):
        raise bad("has no key or file list")
    key = validate_env_key(key)
    if manifest.get("platform") != platform or not isinstance(platform, str):
        raise bad(f"names the platform {manifest.get('platform')!r}, pixi-pack.json {platform!r}")
    lock_sha = manifest.get("lock_sha256")
    if not isinstance(lock_sha, str) or not _SHA256.fullmatch(lock_sha):
        raise bad("has no lock sha256")
    checked: dict[str, tuple[str, int]] = {}
    for name, entry in files.items():
        if not isinstance(entry, dict) or not _layout_name(name):
            raise bad(f"lists a path outside the pack layout: {str(name)[:200]!r}")
        sha, size = entry.get("sha256"), entry.get("bytes")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha) or not isinstance(size, int) \
                or isinstance(size, bool) or size < 0:
            raise bad(f"has no sha256 or size for {name}")
        checked[name] = (sha, size)
    for needed in (lock_member(key), spec_member(key)):
        if needed not in checked:
            raise bad(f"does not list {needed}")
    return PackInfo(file=file, label=label, key=key, platform=platform,
                    lock_sha256=lock_sha, files=checked)


def _layout_name(name: object) -> bool:
    """Paths the pack layout has: top files, channel/<subdir>/<file>, pypi/<f>, provisioner/<f>."""
    if not isinstance(name, str) or name.startswith("/") or any(c in name for c in _NAME_BAD):
        return False
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return False
    if len(parts) == 1:
        return name in (METADATA, ENVIRONMENT)
    return (parts[0] == CHANNEL and len(parts) == 3) or (
        parts[0] in (PYPI, OWN) and len(parts) == 2)


def _dirs_of(files: dict[str, tuple[str, int]]) -> set[str]:
    dirs: set[str] = set()
    for name in files:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return dirs


def unpack_pack(info: PackInfo, dest: Path, *, only: frozenset[str] | None = None) -> None:
    """Extract ``info``'s pack into the empty directory ``dest``, checking every member.

    With ``only``, just those files are written (every member is still checked).
    """
    needed = sum(size for name, (_sha, size) in info.files.items() if not only or name in only)
    free = free_disk_bytes(dest)
    if free < needed:
        raise EnvironmentProblemError(
            f"unpacking {info.label} needs {needed} bytes, {free} are free at {dest}",
            hint="free disk space in the provisioner home")
    dirs = _dirs_of(info.files)
    seen: set[str] = set()
    with _open(info.file, info.label) as tar:
        for member in _members(tar, info.label):
            name = member.name.rstrip("/") if member.isdir() else member.name
            if member.isdir() and name in dirs:
                if only is None:
                    (dest / name).mkdir(parents=True, exist_ok=True)
                continue
            if name == MANIFEST and member.isfile():
                continue  # read already by read_pack_info
            expected = info.files.get(name)
            if not member.isfile() or expected is None or name in seen:
                raise PackError(f"pack {info.label}: unexpected member {name[:200]!r} "
                                f"({'a duplicate' if name in seen else 'not in its manifest'})",
                                hint="the pack was altered; make it again with "
                                     "'provisioner pack'")
            if member.size != expected[1]:
                raise IntegrityError(f"pack {info.label}: {name} has {member.size} bytes, "
                                     f"its manifest says {expected[1]}",
                                     hint="the pack was altered; make it again")
            seen.add(name)
            if only is None or name in only:
                _extract(tar, member, dest / name, expected[0], info.label)
    missing = sorted(set(info.files) - seen)
    if missing:
        raise _damaged(info.label, f"{len(missing)} file(s) of its manifest are missing, "
                                   f"e.g. {missing[0]}")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, sha256: str,
             label: str) -> None:
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)

    def copy(out: BinaryIO) -> None:
        _stream(source, out, digest, member.size, label, member.name)
        if digest.hexdigest() != sha256:
            raise IntegrityError(
                f"pack {label}: {member.name} does not match the pack's manifest "
                f"(sha256 {digest.hexdigest()}, manifest {sha256})",
                hint="the pack was altered; make it again with 'provisioner pack'")

    fsops.atomic_write_with(target, copy, durable=False)  # scratch, removed after the build


def _stream(source: IO[bytes], out: BinaryIO, digest: Any, size: int, label: str,
            name: str) -> None:
    got = 0
    try:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            got += len(chunk)
    except (tarfile.TarError, EOFError) as exc:
        raise _damaged(label, f"{name}: {exc}") from None
    if got != size:
        raise _damaged(label, f"{name} is cut short ({got} of {size} bytes)")
