"""``verify --deep --repair``: restore an env's missing or altered files.

Each damaged file is restored from the package it came from: from its cache entry
when the cached copy still has the sha256 that ``paths.json`` records, else from
the package archive itself (verified against the lock's sha256 first). A file
with a text prefix placeholder gets the env's own prefix written in, and must
then match the sha256 recorded for the installed file; a binary-placeholder file
cannot be restored this way (``ensure`` after removing the env rebuilds it). Each
file is replaced atomically (a new inode: a hardlink shared with the cache is
never written through). The key's lock is held throughout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

from provisioner import fsops
from provisioner.build.import_memo import forget_packages
from provisioner.build.key_lock import hold_key_lock
from provisioner.build.layout import HomeLayout, read_pointer
from provisioner.build.maintenance import VerifyReport, verify_env
from provisioner.config import Config
from provisioner.paths import os_path

log = logging.getLogger(__name__)


def _records(prefix: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in (Path(os_path(prefix)) / "conda-meta").glob("*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            out[data["name"]] = data
    return out


def _candidates(path: str) -> list[str]:
    """Where a prefix path sits inside its package (noarch python moves site-packages)."""
    parts = path.split("/")
    found = [path]
    if len(parts) > 3 and parts[0] == "lib" and parts[2] == "site-packages":
        found.append("/".join(parts[2:]))
    return found


def _from_cache(entry: Path, names: list[str], sha256: str) -> bytes | None:
    for name in names:
        try:
            data = Path(os_path(entry / name)).read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
    return None


def _from_archive(config: Config, key: str, record: dict[str, Any], names: list[str],
                  sha256: str) -> bytes | None:
    from provisioner.build.archives import tar_streams
    from provisioner.build.artifacts import verify_artifacts
    from provisioner.lock.channels import resolve_channels
    from provisioner.lock.check import lockfile_path
    from provisioner.lock.platforms import host_platform
    from provisioner.lock.reader import read_lockfile

    lock = read_lockfile(lockfile_path(config.locks_dir, key))
    pkgs = [p for p in lock.for_platform(host_platform(), "conda") if p.name == record["name"]]
    if not pkgs:
        return None
    art = verify_artifacts(pkgs, resolve_channels(lock.channels, config),
                           HomeLayout(config.home).package_cache,
                           fetch_timeout=config.fetch_timeout, config=config)[0]
    limit = config.package_limits.package_bytes
    with tar_streams(art.path, limit, art.package.file_name) as streams:
        for stream in streams:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if member.name in names and member.isfile():
                        fh = tar.extractfile(member)
                        data = fh.read() if fh else b""
                        if hashlib.sha256(data).hexdigest() == sha256:
                            return data
    return None


def _restore(config: Config, key: str, prefix: Path, record: dict[str, Any],
             entry: dict[str, Any]) -> str | None:
    """Restore one file; return why it could not be, or ``None``."""
    path = entry["_path"]
    names = _candidates(path)
    cache = HomeLayout(config.home).package_cache
    stem = str(record.get("fn", "")).removesuffix(".conda").removesuffix(".tar.bz2")
    data = _from_cache(cache / stem, names, entry.get("sha256", "")) if stem else None
    if data is None:
        data = _from_archive(config, key, record, names, entry.get("sha256", ""))
    if data is None:
        return "neither the cache nor the package archive holds it"
    placeholder = entry.get("prefix_placeholder")
    if placeholder:
        if entry.get("file_mode") != "text":
            return "it has a binary prefix placeholder; rebuild the env"
        data = data.replace(placeholder.encode(), str(prefix).encode())
    expected = entry.get("sha256_in_prefix") or entry.get("sha256")
    if hashlib.sha256(data).hexdigest() != expected:
        return "the restored bytes do not match the recorded sha256"
    target = prefix / path
    long = Path(os_path(target))  # extended-length on Windows: env paths pass 260 characters
    mode = None
    try:
        mode = os.stat(long, follow_symlinks=False).st_mode & 0o7777
    except OSError:
        long.parent.mkdir(parents=True, exist_ok=True)
    fsops.atomic_write_bytes(target, data)
    if mode is not None:
        os.chmod(long, mode)
    return None


def repair_env(config: Config, key: str) -> VerifyReport:
    """Deep-verify ``key``'s active env, restore what is missing or altered, verify again."""
    layout = HomeLayout(config.home)
    with hold_key_lock(key, layout.lock_file(key)):
        report = verify_env(config, key, deep=True)
        damaged = {*report.missing_files, *report.altered_files}
        generation = read_pointer(layout, key)
        if not damaged or generation is None:
            return report
        prefix = layout.generation_dir(key, generation)
        records = _records(prefix)
        # Damaged files: whatever import check those packages passed before is void.
        names = {item.partition(": ")[0] for item in damaged} & set(records)
        forget_packages(layout.package_cache, [str(records[n].get("sha256")) for n in names])
        for item in sorted(damaged):
            name, _sep, path = item.partition(": ")
            record = records.get(name)
            entries = (record or {}).get("paths_data", {}).get("paths", [])
            entry = next((e for e in entries if e.get("_path") == path), None)
            if record is None or entry is None or entry.get("path_type") == "softlink":
                log.warning("cannot repair %s: no record of it", item)
                continue
            why = _restore(config, key, prefix, record, entry)
            if why:
                log.warning("cannot repair %s: %s", item, why)
            else:
                log.info("repaired %s", item)
        return verify_env(config, key, deep=True)
