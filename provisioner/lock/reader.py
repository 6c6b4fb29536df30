"""Read conda-lock files by their structure, without importing conda-lock.

A lock is YAML: its keys may come in any order (``package:`` before
``metadata:``), in block or flow style, and the bytes alone say nothing. This
module parses the whole document with libyaml (the C loader, when PyYAML has
it) and checks each entry against conda-lock's v1 schema into provisioner's
own :class:`~provisioner.lock.lockfile.LockData`. ``conda_lock`` itself (0.4 s
and about 270 modules to import) is only needed to *write* locks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from provisioner.errors import LockfileError
from provisioner.lock.lockfile import LockData, LockedPackage, validate_hashes

#: conda-lock writes v1 files (its v2 "prelim" model exists only in memory).
SUPPORTED_VERSIONS = (1,)
_MANAGERS = ("conda", "pip")
# A top-level key of a block mapping: a plain key at column 0.
_TOP_KEY_RE = re.compile(rb"([A-Za-z_][A-Za-z0-9_-]*):(?:[ \t]|\r?\n|$)")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LockfileError(
            f"lockfile {path.name} does not exist",
            hint="lock the key first (provisioner lock KEY), or check the key's spelling "
                 "against environment-specs/") from None
    except OSError:
        if not path.is_dir():  # Windows opens no directory: PermissionError, not IsADirectory
            raise
        raise LockfileError(f"lockfile {path.name} is a directory, not a file") from None


def _load(raw: bytes, name: str) -> dict[str, Any]:
    import yaml  # not at module level: the resolve hot path imports this module

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(raw, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise LockfileError(f"{name}: malformed YAML{where}") from None
    if not isinstance(data, dict):
        raise LockfileError(f"{name}: not a conda-lock file (the top level is not a mapping)")
    return data


def load_document(path: Path) -> dict[str, Any]:
    """The lock's YAML as a mapping, with one-line errors."""
    return _load(_read_bytes(path), path.name)


def _metadata(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    version = data.get("version")
    if "metadata" not in data or "package" not in data:
        raise LockfileError(f"{name}: no 'metadata' and 'package' keys; not a conda-lock file")
    if version not in SUPPORTED_VERSIONS:
        raise LockfileError(f"{name}: lockfile version {version!r} is not 1")
    metadata = data["metadata"]
    if not isinstance(metadata, dict):
        raise LockfileError(f"{name}: 'metadata' is not a mapping")
    return metadata


def read_lock_header(path: Path) -> dict[str, Any]:
    """The ``metadata`` mapping of a conda-lock file (any key order or style).

    ``lock --check`` and the reuse path need only this, on locks with
    thousands of entries, so a block-style document is cut at its top-level
    keys and the ``package`` section is not parsed; anything else (flow style,
    unexpected keys) is parsed whole.
    """
    raw = _read_bytes(path)
    sections = _top_level_sections(raw)
    if sections is not None and "package" in sections:
        sections["package"] = b"package: []\n"
        try:
            return _metadata(_load(b"".join(sections.values()), path.name), path.name)
        except LockfileError:
            pass  # not what the cut assumed: the whole parse below decides
    return _metadata(_load(raw, path.name), path.name)


def _top_level_sections(raw: bytes) -> dict[str, bytes] | None:
    """A block-style document cut into its top-level keys, or None if it is not one."""
    sections: dict[str, bytes] = {}
    current: str | None = None
    chunks: list[bytes] = []
    for line in raw.splitlines(keepends=True):
        match = _TOP_KEY_RE.match(line)
        if match:
            if current is not None:
                sections[current] = b"".join(chunks)
            current = match.group(1).decode("ascii")
            if current in sections:
                return None
            chunks = []
        elif current is None and line.strip() and not line.startswith(b"#"):
            return None  # content before the first key: not a plain block mapping
        chunks.append(line)
    if current is not None:
        sections[current] = b"".join(chunks)
    return sections if set(sections) <= {"version", "metadata", "package"} else None


def _text(value: object, what: str, where: str) -> str:
    # Integers are what YAML makes of an unquoted version such as ``version: 2``.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise LockfileError(f"{where}: '{what}' must be a string, not {value!r}")
    return str(value)


def _dependencies(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise LockfileError(f"{where}: 'dependencies' must be a mapping")
    return tuple(sorted(
        (str(k), "" if v is None else _text(v, f"dependencies.{k}", where))
        for k, v in value.items()
    ))


def _categories(entry: Mapping[str, Any], where: str) -> tuple[str, ...]:
    if "categories" in entry:
        cats = entry["categories"]
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise LockfileError(f"{where}: 'categories' must be a list of strings")
        return tuple(sorted(set(cats))) or ("main",)
    return (_text(entry.get("category", "main"), "category", where),)


def parse_package(entry: object, name: str, index: int) -> LockedPackage:
    """One ``package:`` entry, checked against conda-lock's v1 schema."""
    where = f"{name}: package #{index + 1}"
    if not isinstance(entry, dict):
        raise LockfileError(f"{where} is not a mapping")
    for required in ("name", "version", "manager", "platform", "url", "hash"):
        if entry.get(required) is None:
            raise LockfileError(f"{where} has no '{required}'")
    pkg_name = _text(entry["name"], "name", where)
    where = f"{name}: package {pkg_name}"
    manager = _text(entry["manager"], "manager", where)
    if manager not in _MANAGERS:
        raise LockfileError(f"{where}: unknown manager {manager!r} (expected conda or pip)")
    hashes = entry["hash"]
    if not isinstance(hashes, dict):
        raise LockfileError(f"{where}: 'hash' must be a mapping")
    sha256, md5 = hashes.get("sha256"), hashes.get("md5")
    return LockedPackage(
        name=pkg_name,
        version=_text(entry["version"], "version", where),
        manager=manager,
        platform=_text(entry["platform"], "platform", where),
        url=_text(entry["url"], "url", where),
        sha256=None if sha256 is None else _text(sha256, "hash.sha256", where),
        md5=None if md5 is None else _text(md5, "hash.md5", where),
        dependencies=_dependencies(entry.get("dependencies"), where),
        categories=_categories(entry, where),
    )


def _channels(metadata: Mapping[str, Any], name: str) -> tuple[str, ...]:
    channels = metadata.get("channels") or []
    if not isinstance(channels, list):
        raise LockfileError(f"{name}: metadata.channels must be a list")
    result = []
    for ch in channels:
        url = ch.get("url") if isinstance(ch, dict) else ch
        result.append(_text(url, "metadata.channels.url", name))
    return tuple(result)


def _str_mapping(value: object, what: str, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LockfileError(f"{name}: {what} must be a mapping")
    return {str(k): _text(v, f"{what}.{k}", name) for k, v in value.items()}


def lock_from_document(data: Mapping[str, Any], name: str, *,
                       check_hashes: bool = True) -> LockData:
    """:class:`LockData` from a parsed conda-lock document."""
    metadata = _metadata(data, name)
    raw_packages = data["package"]
    if not isinstance(raw_packages, list):
        raise LockfileError(f"{name}: 'package' must be a list")
    packages = []
    for i, entry in enumerate(raw_packages):
        pkg = parse_package(entry, name, i)
        if check_hashes:
            validate_hashes(pkg, name)
        packages.append(pkg)
    platforms = metadata.get("platforms") or []
    sources = metadata.get("sources") or []
    if not isinstance(platforms, list) or not isinstance(sources, list):
        raise LockfileError(f"{name}: metadata.platforms and metadata.sources must be lists")
    return LockData(
        platforms=tuple(_text(p, "metadata.platforms", name) for p in platforms),
        channels=_channels(metadata, name),
        content_hash=_str_mapping(metadata.get("content_hash"), "metadata.content_hash", name),
        packages=tuple(packages),
        sources=tuple(_text(s, "metadata.sources", name) for s in sources),
        extra=_str_mapping(metadata.get("custom_metadata"), "metadata.custom_metadata", name),
    )


def read_lockfile(path: Path, *, check_hashes: bool = True) -> LockData:
    """Read a conda-lock v1 file into :class:`LockData`."""
    return lock_from_document(load_document(path), path.name, check_hashes=check_hashes)
