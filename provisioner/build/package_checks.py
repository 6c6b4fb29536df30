"""Packages are untrusted until checked: archive members and ``info/paths.json``.

rattler trusts ``paths.json`` (``../../x`` deleted a file outside the prefix; an
absolute path aborted the process), so every package is checked before linking:

* every archive member and ``paths.json`` entry is relative, normalised, free of
  ``..``, drive letters, backslashes, NUL and newlines, and names no file of
  provisioner's own (``conda-meta/``, ``.provisioner-*``);
* only regular files, directories, symlinks and in-archive hard links; every
  symlink target stays inside the prefix; no path of any package in the env
  reaches outside the prefix through a symlink of this or another package;
* ``paths.json`` matches the archive (types and sizes);
* link scripts are refused (rattler would not run them; the env would be broken);
* bytes and files stay under the limits; archives are streams that stop at a limit.

A summary is remembered by the archive's verified sha256: warm builds skip this.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tarfile
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from provisioner import fsops
from provisioner.build.archives import tar_streams
from provisioner.build.artifacts import VerifiedArtifact
from provisioner.config import PackageLimits
from provisioner.errors import UnsafePackageError

CHECKER_VERSION = 2  # 2: longest_path
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_LINK_SCRIPT_RE = re.compile(r"^(bin|Scripts)/\.[^/]+-(pre-link|post-link|pre-unlink)\.(sh|bat)$")
_RESERVED_TOP = ("conda-meta", ".provisioner-")
_MAX_HOPS = 40
_PATHS_JSON_MAX = 256 << 20
_HINT = "the package is malformed or hostile; remove it from the lock or fix the channel"


@dataclass
class PackageSummary:
    """What a checked package unpacks to."""

    unpacked_bytes: int = 0
    files: int = 0
    placeholder_bytes: int = 0
    paths_json_sha256: str = ""
    links: dict[str, str] = field(default_factory=dict)  # symlink path -> target
    dirs: list[str] = field(default_factory=list)  # parent dirs of every entry
    longest_path: str = ""  # the longest relative path it creates (Windows MAX_PATH planning)


@dataclass(frozen=True)
class CheckedPackage:
    """A verified archive and its checked summary."""

    artifact: VerifiedArtifact
    summary: PackageSummary


def path_problem(path: str) -> str | None:
    """Why ``path`` is no safe prefix-relative path, or ``None``."""
    if not path:
        return "empty path"
    if "\x00" in path or "\n" in path or "\r" in path:
        return "NUL or newline in path"
    if path.startswith("/") or _DRIVE_RE.match(path) or "\\" in path:
        return "absolute path, drive letter or backslash"
    parts = path.split("/")
    if ".." in parts:
        return "'..' component"
    if any(p in ("", ".") for p in parts):
        return "path is not normalised"
    if parts[0] == _RESERVED_TOP[0] or parts[0].startswith(_RESERVED_TOP[1]):
        return "names provisioner's or conda's own metadata"
    return None


def _refuse(pkg: str, path: str, why: str) -> UnsafePackageError:
    shown = path.encode("unicode_escape").decode("ascii")[:200]
    return UnsafePackageError(f"package {pkg} refused: {shown}: {why}", hint=_HINT)


def _member_kind(member: tarfile.TarInfo) -> str | None:
    if member.isfile():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "softlink"
    if member.islnk():
        return "hardlink"
    return None


_Members = dict[str, tuple[str, int, str]]  # path -> kind, size, link target


def _scan_archive(art: VerifiedArtifact, limits: PackageLimits
                  ) -> tuple[_Members, bytes | None, int]:
    """Members (path -> kind, size, link target), the paths.json bytes, unpacked bytes."""
    pkg = art.package.file_name
    archive_size = max(art.path.stat().st_size, 1)
    members: dict[str, tuple[str, int, str]] = {}
    paths_json: bytes | None = None
    total = 0
    stream_limit = limits.package_bytes + (64 << 20)  # tar headers and padding on top
    try:
        with tar_streams(art.path, stream_limit, pkg) as streams:
            for stream in streams:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for m in tar:
                        name = m.name
                        why = path_problem(name)
                        if why:
                            raise _refuse(pkg, name, why)
                        kind = _member_kind(m)
                        if kind is None:
                            raise _refuse(pkg, name, "not a file, directory or link")
                        if kind in ("softlink", "hardlink"):
                            _check_link(pkg, name, m.linkname, kind)
                        total += m.size if kind == "file" else 0
                        if len(members) + 1 > limits.package_files:
                            raise _refuse(pkg, name, f"more than {limits.package_files} files")
                        if total > limits.package_bytes:
                            raise _refuse(pkg, name, f"unpacks past {limits.package_bytes} bytes")
                        if total > limits.ratio_floor and total > limits.max_ratio * archive_size:
                            raise _refuse(pkg, name, f"unpacks to over {limits.max_ratio}x "
                                          "its archive size (a compression bomb)")
                        if name in members:
                            raise _refuse(pkg, name, "appears twice in the archive")
                        members[name] = (kind, m.size, m.linkname)
                        if name == "info/paths.json" and kind == "file":
                            if m.size > _PATHS_JSON_MAX:
                                raise _refuse(pkg, name, "paths.json is too large")
                            fh = tar.extractfile(m)
                            paths_json = fh.read() if fh else b""
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, UnsafePackageError):
            raise
        raise _refuse(pkg, "(archive)", f"unreadable archive: {exc}") from None
    return members, paths_json, total


def _check_link(pkg: str, name: str, target: str, kind: str) -> None:
    if kind == "hardlink":
        why = path_problem(target)
        if why:
            raise _refuse(pkg, f"{name} -> {target}", f"hard link target: {why}")
        return
    if not target or target.startswith("/") or _DRIVE_RE.match(target) or "\\" in target \
            or "\x00" in target:
        raise _refuse(pkg, f"{name} -> {target}", "symlink target is absolute or malformed")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if joined == ".." or joined.startswith("../") or joined.startswith("/"):
        raise _refuse(pkg, f"{name} -> {target}", "symlink points outside the prefix")


def _entries(pkg: str, paths_json: bytes | None, members: dict[str, tuple[str, int, str]]
             ) -> list[dict[str, Any]]:
    if paths_json is None:
        raise _refuse(pkg, "info/paths.json", "missing (provisioner needs it to check the package)")
    try:
        data = json.loads(paths_json)
        entries = data["paths"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError("paths is not a list of objects")
    except (ValueError, KeyError, TypeError) as exc:
        raise _refuse(pkg, "info/paths.json", f"malformed: {exc}") from None
    return entries


def _match(pkg: str, entries: list[dict[str, Any]],
           members: dict[str, tuple[str, int, str]], limits: PackageLimits) -> PackageSummary:
    summary = PackageSummary()
    seen: set[str] = set()
    dirs: set[str] = set()
    for e in entries:
        path = e.get("_path")
        if not isinstance(path, str):
            raise _refuse(pkg, repr(path), "paths.json entry without a string _path")
        why = path_problem(path)
        if why:
            raise _refuse(pkg, path, f"in paths.json: {why}")
        if path in seen:
            raise _refuse(pkg, path, "listed twice in paths.json")
        seen.add(path)
        if len(path) > len(summary.longest_path):
            summary.longest_path = path
        if _LINK_SCRIPT_RE.match(path) and limits.link_scripts != "skip":
            raise UnsafePackageError(
                f"package {pkg} refused: {path!r}: a link script, which provisioner does not run",
                hint="set link-scripts = \"skip\" under [build] in provisioner.toml to install "
                     "it without running the script")
        ptype = e.get("path_type", "hardlink")
        member = members.get(path)
        if ptype == "directory":
            if member is not None and member[0] != "dir":
                raise _refuse(pkg, path, "paths.json says directory, the archive does not")
            continue
        if member is None:
            raise _refuse(pkg, path, "in paths.json but not in the archive")
        kind, size, target = member
        if ptype == "softlink":
            if kind != "softlink":
                raise _refuse(pkg, path, "paths.json says symlink, the archive does not")
            summary.links[path] = target
        elif ptype == "hardlink":
            if kind not in ("file", "hardlink"):
                raise _refuse(pkg, path, f"paths.json says file, the archive has a {kind}")
            declared = e.get("size_in_bytes")
            if kind == "file" and declared is not None and declared != size:
                raise _refuse(pkg, path, f"paths.json says {declared} bytes, archive has {size}")
            if e.get("prefix_placeholder"):
                summary.placeholder_bytes += size
        else:
            raise _refuse(pkg, path, f"unknown path_type {ptype!r}")
        summary.files += 1
        dirs.add(posixpath.dirname(path))
    for name, (kind, _size, _t) in members.items():
        if kind != "dir" and not name.startswith("info/") and name not in seen:
            raise _refuse(pkg, name, "in the archive but not in paths.json")
    summary.dirs = sorted(d for d in dirs if d)
    return summary


def check_package(art: VerifiedArtifact, limits: PackageLimits) -> PackageSummary:
    """Check one archive (see the module docstring); raise ``UnsafePackageError``."""
    pkg = art.package.file_name
    members, paths_json, total = _scan_archive(art, limits)
    _check_archive_links(pkg, members)
    summary = _match(pkg, _entries(pkg, paths_json, members), members, limits)
    summary.unpacked_bytes = total
    summary.paths_json_sha256 = hashlib.sha256(paths_json or b"").hexdigest()
    return summary


def _resolve(path: str, links: dict[str, str], follow_last: bool) -> bool:
    """Whether ``path`` stays inside the prefix when symlinks in ``links`` are followed."""
    todo = path.split("/")
    out: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return False
            out.pop()
            continue
        out.append(part)
        target = links.get("/".join(out))
        if target is not None and (todo or follow_last):
            hops += 1
            if hops > _MAX_HOPS or target.startswith("/"):
                return False
            out.pop()
            todo = target.split("/") + todo
    return True


def _check_archive_links(pkg: str, members: _Members) -> None:
    """Extraction (into the cache) stays inside the entry, through this archive's symlinks."""
    links = {name: target for name, (kind, _s, target) in members.items() if kind == "softlink"}
    if not links:
        return
    for name, (kind, _size, target) in members.items():
        if not _resolve(posixpath.dirname(name), links, follow_last=True):
            raise _refuse(pkg, name, "reaches outside the package through a symlink")
        if kind == "softlink" and not _resolve(
                posixpath.join(posixpath.dirname(name), target), links, follow_last=True):
            raise _refuse(pkg, f"{name} -> {target}", "symlink resolves outside the package")
        if kind == "hardlink" and not _resolve(target, links, follow_last=True):
            raise _refuse(pkg, f"{name} -> {target}", "hard link through a symlink outside")


def check_env_paths(checked: Sequence[CheckedPackage]) -> None:
    """No entry of any package reaches outside the prefix through any package's symlinks."""
    links: dict[str, str] = {}
    for c in checked:
        links.update(c.summary.links)
    if not links:
        return
    for c in checked:
        pkg = c.artifact.package.file_name
        for d in c.summary.dirs:
            if not _resolve(d, links, follow_last=True):
                raise _refuse(pkg, d, "reaches outside the prefix through a symlink")
        for path, target in c.summary.links.items():
            if not _resolve(posixpath.dirname(path), links, follow_last=True) or not _resolve(
                    posixpath.join(posixpath.dirname(path), target), links, follow_last=True):
                raise _refuse(pkg, f"{path} -> {target}", "symlink resolves outside the prefix")


class _Memo:
    """sha256 of a verified archive -> its summary, so warm builds skip decompression."""

    def __init__(self, path: Path, limits: PackageLimits) -> None:
        self.path, self.dirty = path, False
        self.tag = json.dumps([CHECKER_VERSION, asdict(limits)], sort_keys=True)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            ok = isinstance(data, dict) and data.get("tag") == self.tag
            self.entries: dict[str, Any] = data.get("packages", {}) if ok else {}
        except (OSError, ValueError):
            self.entries = {}

    def get(self, sha256: str) -> PackageSummary | None:
        raw = self.entries.get(sha256)
        try:
            return PackageSummary(**raw) if isinstance(raw, dict) else None
        except TypeError:
            return None

    def put(self, sha256: str, summary: PackageSummary) -> None:
        if sha256 not in self.entries:
            self.entries[sha256], self.dirty = asdict(summary), True

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fsops.atomic_write_text(self.path, json.dumps({"tag": self.tag,
                                                           "packages": self.entries}))


def remembered_summaries(cache_dir: Path, limits: PackageLimits) -> dict[str, PackageSummary]:
    """Summaries of packages checked before under ``limits``, by archive sha256."""
    memo = _Memo(cache_dir / "checked-packages.json", limits)
    found = {sha: memo.get(sha) for sha in memo.entries}
    return {sha: summary for sha, summary in found.items() if summary is not None}


def check_packages(artifacts: Sequence[VerifiedArtifact], limits: PackageLimits,
                   cache_dir: Path) -> list[CheckedPackage]:
    """Check every package and the env they make together; raise on the first problem.

    Unchecked archives are read in parallel threads (bz2, zlib and zstd release the GIL).
    """
    memo = _Memo(cache_dir / "checked-packages.json", limits)
    known = {a.package.sha256: memo.get(a.package.sha256) for a in artifacts if a.package.sha256}
    todo = [a for a in artifacts if known.get(a.package.sha256 or "") is None]
    checked: list[CheckedPackage] = []
    total_bytes = total_files = 0
    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            futures = {id(a): pool.submit(check_package, a, limits) for a in todo}
            try:
                for art in artifacts:
                    summary = known.get(art.package.sha256 or "") or futures[id(art)].result()
                    if art.package.sha256:
                        memo.put(art.package.sha256, summary)
                    total_bytes += summary.unpacked_bytes
                    total_files += summary.files
                    if total_bytes > limits.env_bytes or total_files > limits.env_files:
                        raise UnsafePackageError(
                            f"the env unpacks past its limit ({limits.env_bytes} bytes, "
                            f"{limits.env_files} files) at {art.package.file_name}",
                            hint="raise env-bytes / env-files under [build] in provisioner.toml")
                    checked.append(CheckedPackage(art, summary))
            finally:
                pool.shutdown(cancel_futures=True)
    finally:
        memo.save()
    check_env_paths(checked)
    return checked
