"""The import-check memo: a package set that passed the import check here is not re-imported.

Importing a real GPU stack (torch, transformers) in staging is most of a warm
``ensure``. As tox 4 decides reuse from a fingerprint, the staging import check
is skipped when the *same* package set passed it on this machine before. The
memo's key is a sha256 over:

* the sha256 of every locked conda archive and pip wheel (names included),
* the platform, the spec's ``imports`` (in order), the host's name,
* the backend that linked the files (name and version),
* the checker: provisioner's version and the import probe's source.

The env's python is one of the locked packages, so its ABI is in the key too.

What a hit still requires: the records check (every locked package installed
with its locked sha256, run for every build) and every recorded file present
with its recorded size (:func:`~provisioner.build.env_checks.check_files` with
``sizes``). The package cache check (``package_cache.prepare``) has already
dropped entries whose ``paths.json`` or file sizes differ from the verified
archive. A dropped (damaged) entry, ``verify --repair`` of one of its packages,
or a memo file that is not ours (not a plain file, unknown format) forgets the
memo; ``[build] import-check = "always"`` or ``ensure --recheck`` bypasses it.

The memo is written only after the build succeeded (promoted, python starts),
so a kill or a failed check never records anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform as _platform
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from provisioner import fsops
from provisioner.build import env_checks
from provisioner.build.fingerprint import tool_version
from provisioner.errors import ImportCheckError
from provisioner.lock.lockfile import LockedPackage

log = logging.getLogger(__name__)

#: the file name carries the format version, so a newer format never overwrites this one
MEMO_NAME = "checked-imports.v1.json"
FORMAT = "provisioner-import-memo"
FORMAT_VERSION = 1
MAX_ENTRIES = 256
MODES = ("memo", "always")
MEMO_HIT_MESSAGE = "imports: verified before for this package set (memo)"


def memo_path(cache_dir: Path) -> Path:
    """Where the memo lives: next to the package cache it is keyed by."""
    return cache_dir / MEMO_NAME


def _read(cache_dir: Path) -> dict[str, dict[str, object]]:
    """The memo's entries; empty for a missing, foreign or unreadable file."""
    path = memo_path(cache_dir)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # a link or a dir is not ours
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if (not isinstance(data, dict) or data.get("format") != FORMAT
            or data.get("version") != FORMAT_VERSION or not isinstance(data.get("entries"), dict)):
        return {}
    return {k: v for k, v in data["entries"].items()
            if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("packages"), list)}


def _write(cache_dir: Path, entries: dict[str, dict[str, object]]) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    fsops.atomic_write_text(memo_path(cache_dir), json.dumps(
        {"format": FORMAT, "version": FORMAT_VERSION, "entries": entries}, sort_keys=True))


def _checker_version() -> str:
    # A changed probe checks something else: earlier passes no longer count.
    probe = hashlib.sha256(env_checks.IMPORT_PROBE.encode()).hexdigest()[:16]
    return f"{tool_version()}+{probe}"


@dataclass(frozen=True)
class ImportCheck:
    """One build's import check: run it, or skip it on a memo hit; record a pass."""

    cache_dir: Path
    imports: tuple[str, ...]
    mode: str
    digest: str | None  # None: some package has no sha256, so nothing can be keyed
    shas: tuple[str, ...]

    def run(self, python: Path, target: Path, site: Path, label: str) -> bool:
        """Check ``target``'s imports unless memoized; raise ImportCheckError on failure.

        Returns whether the import subprocess ran (and so whether to :meth:`record`).
        """
        if not self.imports:
            return False
        if self.mode == "memo" and self.digest is not None and self.digest in _read(
                self.cache_dir):
            files = env_checks.check_files(target, sizes=True)
            if files.ok:
                log.info(MEMO_HIT_MESSAGE)
                return False
            log.info("imports: the package set passed before, but %s; checking again",
                     files.problems[0])
        report = env_checks.check_imports(python, self.imports, extra_path=site)
        if report.details.get("timed_out"):
            raise ImportCheckError(
                f"{label}: the import check timed out ({', '.join(self.imports)}); "
                "nothing was promoted", hint="a module's import hangs; fix it, or raise "
                f"{env_checks.IMPORT_TIMEOUT_ENV} (seconds)")
        if not report.ok:
            raise ImportCheckError(
                f"{label}: the built env fails its import check: " + "; ".join(report.problems),
                hint="nothing was promoted; fix the spec's packages or its x-provisioner "
                     "imports, then relock")
        return True

    def record(self, key: str) -> None:
        """Remember that this package set passed (call only once the build succeeded)."""
        if self.digest is None or not self.imports:
            return
        entries = _read(self.cache_dir)
        entries[self.digest] = {"packages": list(self.shas), "key": key, "imports":
                                list(self.imports), "at": datetime.now(timezone.utc).isoformat(
                                    timespec="seconds")}
        if len(entries) > MAX_ENTRIES:  # oldest first out
            for old in sorted(entries, key=lambda d: str(entries[d].get("at")))[
                    :len(entries) - MAX_ENTRIES]:
                del entries[old]
        try:
            _write(self.cache_dir, entries)
        except OSError as exc:  # the env is ready; a lost memo only costs a check next time
            log.warning("could not record the import check in %s: %s",
                        memo_path(self.cache_dir), exc)


def import_check(cache_dir: Path, *, packages: Sequence[LockedPackage], platform: str,
                 imports: Sequence[str], backend: str, mode: str = "memo") -> ImportCheck:
    """The import check of a build of ``packages`` (conda and pip) with ``backend``."""
    shas = tuple(sorted(p.sha256 for p in packages if p.sha256))
    digest = None
    if packages and all(p.sha256 for p in packages):
        material = {
            "packages": sorted(f"{p.manager}:{p.name}:{p.sha256}" for p in packages),
            "platform": platform, "imports": list(imports), "host": _platform.node(),
            "backend": backend, "checker": _checker_version(),
        }
        digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return ImportCheck(cache_dir, tuple(imports), mode, digest, shas)


def _shas_of(entry: dict[str, object]) -> set[str]:
    packages = entry.get("packages")
    return {str(s) for s in packages} if isinstance(packages, list) else set()


def forget_packages(cache_dir: Path, shas: Iterable[str]) -> int:
    """Drop every memo entry that includes one of these archives; returns how many."""
    gone = set(shas)
    entries = _read(cache_dir)
    keep = {d: e for d, e in entries.items() if not gone.intersection(_shas_of(e))}
    if len(keep) == len(entries):
        return 0
    _write(cache_dir, keep)
    log.info("import memo: forgot %d package set(s)", len(entries) - len(keep))
    return len(entries) - len(keep)
