"""Maintenance of a provisioner home: ``verify`` an env and collect garbage.

* :func:`verify_env` checks, without taking any lock, that a key's active
  generation was built from the current lock (fingerprint), holds the locked
  packages (``conda-meta`` records) and still has its files (quick: present;
  deep: sha256 as recorded, as ``conda doctor`` does).
* :func:`collect_garbage` removes interrupted builds in ``.staging/`` (only
  when their key's lock is free, never by age), everything in ``.trash/``, and
  old generations: per key it keeps the active generation, the ``[gc] keep``
  most recent other ones, and every leased one. Each key is handled under its
  file lock, taken without waiting; a busy key is skipped.

Both return data; nothing here prints.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from provisioner.build.env_checks import check_files, check_records
from provisioner.build.fingerprint import in_progress_path, read_fingerprint
from provisioner.build.home_checks import (
    check_home,
    check_key_dir,
    heal_pointer,
    is_real_directory,
)
from provisioner.build.key_lock import hold_key_lock, is_key_locked
from provisioner.build.layout import HomeLayout, generation_name, read_pointer
from provisioner.build.leases import exclusive_lease, remove_lease_file
from provisioner.build.plan import locked_hash
from provisioner.build.retention import judge_generations
from provisioner.build.trash import Collector, GcInUse, GcItem, GcSkip
from provisioner.config import Config
from provisioner.errors import LockTimeoutError, ProvisionerError, UserError
from provisioner.keys import validate_env_key
from provisioner.lock.check import lockfile_path
from provisioner.lock.platforms import host_platform
from provisioner.progress import Progress, ProgressSink

# How many missing or altered files a problem line names before summarising.
_EXAMPLES = 3
# ``<key>.<generation>.<random hex>``: staging dirs and trash entries of a key.
_KEYED_NAME_RE = re.compile(r"(?P<key>.+)\.(?P<gen>[0-9a-f]{12})\.(?P<token>[0-9a-f]+)")

# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyReport:
    """The health of one key's active env; ``ok`` when ``problems`` is empty."""

    key: str
    platform: str
    deep: bool
    generation: str | None
    prefix: Path | None
    lock_hash: str
    built_from: str | None = None
    problems: tuple[str, ...] = ()
    missing_files: tuple[str, ...] = ()
    altered_files: tuple[str, ...] = ()
    packages_checked: int = 0
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "key": self.key,
            "platform": self.platform,
            "deep": self.deep,
            "generation": self.generation,
            "prefix": str(self.prefix) if self.prefix is not None else None,
            "lock_hash": self.lock_hash,
            "built_from": self.built_from,
            "problems": list(self.problems),
            "missing_files": list(self.missing_files),
            "altered_files": list(self.altered_files),
            "counts": {
                "packages_checked": self.packages_checked,
                "files_checked": self.files_checked,
                "missing": len(self.missing_files),
                "altered": len(self.altered_files),
            },
        }


def _summarise(what: str, items: list[str]) -> str:
    shown = ", ".join(items[:_EXAMPLES])
    more = f" and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else ""
    return f"{len(items)} {what}: {shown}{more}"


def verify_env(config: Config, key: str, *, deep: bool = False,
               progress: ProgressSink | None = None) -> VerifyReport:
    """Check ``key``'s active generation against its current lock; takes no lock.

    The fingerprint must name the lock's content hash for this host's platform,
    every locked conda package must be recorded in ``conda-meta/`` with the
    locked version and sha256, and every recorded file must exist (with
    ``deep``, also match its recorded sha256). A key without an env gives a
    report with the problem ``not built``. A missing or malformed lockfile, or
    an invalid key, raises a :class:`~provisioner.errors.UserError`.
    """
    from provisioner.lock.reader import read_lockfile

    validate_env_key(key)
    platform = host_platform()
    layout = HomeLayout(config.home)
    lock_hash = locked_hash(config, key, platform)
    generation = read_pointer(layout, key)
    prefix = layout.generation_dir(key, generation) if generation else None
    base = VerifyReport(key=key, platform=platform, deep=deep, generation=generation,
                        prefix=prefix, lock_hash=lock_hash)
    if prefix is None:
        return replace(base, problems=("not built",))
    if not prefix.is_dir():
        return replace(base, problems=(
            f"not built: the active generation {generation} does not exist",))

    problems: list[str] = []
    fp = read_fingerprint(prefix)
    if in_progress_path(prefix).exists():
        problems.append("the env's build was interrupted (in-progress marker present)")
    if fp is None:
        problems.append("the env's fingerprint is missing or corrupt")
    else:
        if fp.lock_hash != lock_hash:
            problems.append(
                f"fingerprint mismatch: the env was built from lock {generation_name(fp.lock_hash)}"
                f", the current lock is {generation_name(lock_hash)}"
            )
        if fp.key != key or fp.platform != platform:
            problems.append(
                f"fingerprint names {fp.key} on {fp.platform}, expected {key} on {platform}"
            )

    lock = read_lockfile(lockfile_path(config.locks_dir, key))
    records = check_records(prefix, lock.for_platform(platform, "conda"))
    problems.extend(records.problems)

    with Progress(progress, key).running("verify", unit="packages") as checking:
        files = check_files(prefix, deep=deep, on_total=checking.set_total,
                            on_package=checking.advance)
    missing = [str(m) for m in _as_list(files.details.get("missing"))]
    altered = [str(a) for a in _as_list(files.details.get("altered"))]
    if missing:
        problems.append(_summarise("recorded file(s) missing", missing))
    if altered:
        problems.append(_summarise("file(s) altered (sha256 differs)", altered))

    return replace(
        base, built_from=fp.lock_hash if fp else None, problems=tuple(problems),
        missing_files=tuple(missing), altered_files=tuple(altered),
        packages_checked=records.checked, files_checked=files.checked,
    )


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, (list, tuple)) else []


# --------------------------------------------------------------------------- gc


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` removed, kept and skipped."""

    home: Path
    dry_run: bool
    removed: tuple[GcItem, ...] = ()
    kept: tuple[Path, ...] = ()
    skipped: tuple[GcSkip, ...] = ()
    why_kept: tuple[GcSkip, ...] = ()
    in_use: tuple[GcInUse, ...] = ()  # held open by another process: the next gc retries

    @property
    def bytes_freed(self) -> int:
        return sum(item.bytes for item in self.removed)

    def to_dict(self) -> dict[str, object]:
        return {
            "home": str(self.home),
            "dry_run": self.dry_run,
            "bytes_freed": self.bytes_freed,
            "removed": [item.to_dict() for item in self.removed],
            "kept": [str(p) for p in self.kept],
            "why_kept": [k.to_dict() for k in self.why_kept],
            "skipped": [s.to_dict() for s in self.skipped],
            "in_use": [i.to_dict() for i in self.in_use],
        }


@dataclass
class _KeyWork:
    """Everything of one key that gc looks at."""

    staging: list[Path] = field(default_factory=list)
    trash: list[Path] = field(default_factory=list)
    has_envs: bool = False


def _list(directory: Path) -> list[Path]:
    """Entries of a real directory; a link or file in its place is never listed."""
    if not is_real_directory(directory):
        return []
    try:
        return sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _keyed(path: Path) -> str | None:
    """The key named by a staging dir or trash entry, or ``None``."""
    match = _KEYED_NAME_RE.fullmatch(path.name)
    if match is None:
        return None
    try:
        return validate_env_key(match["key"])
    except ProvisionerError:
        return None


@contextlib.contextmanager
def _key_lock(layout: HomeLayout, key: str, dry_run: bool) -> Iterator[bool]:
    """Yield whether ``key`` is free; hold its lock meanwhile (probe only in a dry run)."""
    if dry_run:
        yield not is_key_locked(layout.lock_file(key))
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(hold_key_lock(key, layout.lock_file(key), timeout=0))
            free = True
        except LockTimeoutError:
            free = False
        yield free


def _collect_key(layout: HomeLayout, key: str, work: _KeyWork, out: Collector,
                 keep: int) -> None:
    with _key_lock(layout, key, out.dry_run) as free:
        if not free:
            for path in [*work.staging, *work.trash]:
                out.skipped.append(GcSkip(path, "its key is locked by a running build", key))
            if work.has_envs:
                out.skipped.append(GcSkip(layout.key_dir(key),
                                          "key is locked by a running build; generations kept",
                                          key))
            return
        for path in work.staging:
            out.remove("staging", path, key)
        for path in work.trash:
            out.remove("trash", path, key)
        if not work.has_envs:
            return
        if not out.dry_run:
            check_key_dir(layout, key)
            heal_pointer(layout, key)
        for verdict in judge_generations(layout, key, keep):
            gen = verdict.path
            if verdict.keep:
                out.kept.append(GcSkip(gen, verdict.reason, key))
                continue
            with exclusive_lease(layout, key, gen.name, probe_only=out.dry_run) as free:
                if not free:
                    out.kept.append(GcSkip(gen, "leased: a running process uses it "
                                                "(provisioner run, or a host app's lease)", key))
                elif out.remove("generation", gen, key) and not out.dry_run:
                    remove_lease_file(layout, key, gen.name)


def collect_garbage(config: Config, *, dry_run: bool = False, keep: int | None = None,
                    cache: bool = False) -> GcReport:
    """Free disk space under the home; with ``dry_run``, only report what would go.

    Removes stale staging dirs (their key's lock is free, so no build owns
    them), every entry of ``.trash/``, and per key every generation except the
    active one and the ``keep`` most recent other ones (by the fingerprint's
    ``created_at``, or the dir's mtime without one). Each key is handled while
    holding its lock (taken without waiting, so a busy key is skipped); a dry
    run only probes the locks. Sizes are measured before removal, hard links
    counted once per tree. Deletion goes through :mod:`provisioner.build.trash`:
    a generation or staging dir is renamed into ``.trash/`` first, then deleted
    marker last; files another process holds open are reported in ``in_use``
    (and one log line) and left, marked, for the next ``gc``.

    ``keep`` (default: ``[gc] keep`` of the config) previous generations per
    key are kept for rollback, and a leased generation is never removed
    (:mod:`provisioner.build.retention`, :mod:`provisioner.build.leases`); the
    report says why each generation was kept. A link or file where the home's
    own directories should be is moved aside or refused first
    (:mod:`provisioner.build.home_checks`), never walked. Partial extractions in the
    package cache go too; with ``cache``, whatever no generation left uses
    (:mod:`provisioner.build.cache_gc`).
    """
    layout = HomeLayout(config.home)
    keep = config.gc_keep if keep is None else keep
    if keep < 0:
        raise UserError(f"gc keep must be 0 or more, not {keep}")
    if not dry_run:
        check_home(layout)
    out = Collector(layout, dry_run=dry_run)
    work: dict[str, _KeyWork] = {}

    for path in _list(layout.staging):
        key = _keyed(path)
        if key is None:
            out.skipped.append(GcSkip(path, "not a staging dir that provisioner names"))
        else:
            work.setdefault(key, _KeyWork()).staging.append(path)
    for path in _list(layout.trash):
        key = _keyed(path)
        if key is None:
            out.remove("trash", path, None)
        else:
            work.setdefault(key, _KeyWork()).trash.append(path)
    for path in _list(layout.envs):
        if not is_real_directory(path):
            continue
        try:
            key = validate_env_key(path.name)
        except ProvisionerError:
            out.skipped.append(GcSkip(path, "not an env key directory"))
            continue
        work.setdefault(key, _KeyWork()).has_envs = True

    for key in sorted(work):
        _collect_key(layout, key, work[key], out, keep)
    from provisioner.build.cache_gc import collect_cache

    collect_cache(layout, out, unused=cache)
    out.log_in_use()
    return GcReport(
        home=config.home, dry_run=dry_run, removed=tuple(out.removed),
        kept=tuple(k.path for k in out.kept), skipped=tuple(out.skipped),
        why_kept=tuple(out.kept), in_use=tuple(out.in_use),
    )
