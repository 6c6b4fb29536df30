"""``provisioner lock``: solve each spec per platform and write conda-lock v1 files.

The work is planned and solved completely in memory first; files are written
only when every platform of a key solved (and its pip layer locked), so a
failure leaves the lock on disk untouched.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner import fsops
from provisioner.config import Config
from provisioner.errors import LockfileError, SpecError, UserError
from provisioner.keys import validate_env_key
from provisioner.lock.channels import ChannelSource, canonical_channel_url, resolve_channels
from provisioner.lock.check import (
    SEAL_FIELD,
    conda_lock_seal,
    lock_metadata,
    lockfile_path,
    platform_virtual_packages,
)
from provisioner.lock.eol import lf_bytes, read_lf_bytes
from provisioner.lock.lockfile import LockData, LockedPackage
from provisioner.lock.refresh import ChangedArchive, changed_archives
from provisioner.lock.spec import EnvSpec, list_spec_keys, load_spec, spec_path
from provisioner.progress import Phase, Progress, ProgressSink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LockOutcome:
    """What ``lock`` did for one key."""

    key: str
    lockfile: Path
    changed: bool
    counts: dict[str, int]  # platform -> number of conda packages
    pip_counts: dict[str, int]  # platform -> number of manager: pip entries
    old: LockData | None
    new: LockData
    refreshed: tuple[ChangedArchive, ...] = ()  # archives relocked: other bytes, same name

    def to_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "lockfile": str(self.lockfile),
            "changed": self.changed,
            "refreshed": [c.to_dict() for c in self.refreshed],
            "conda_packages": self.counts,
            "pip_packages": self.pip_counts,
        }


def _preferred_records(
    packages: Sequence[LockedPackage], sources: list[ChannelSource]
) -> list[Any]:
    """Locked packages as rattler records, so the solver prefers their versions."""
    from provisioner.lock.solve import locked_to_record

    records = []
    for pkg in packages:
        channel = next((c for c in sources if pkg.url.startswith(c.canonical + "/")), None)
        if channel is not None:
            records.append(locked_to_record(pkg, channel.to_source(pkg.url), channel.source))
    return records


def _read_existing(path: Path) -> LockData | None:
    from provisioner.lock.reader import read_lockfile

    if not path.is_file():
        return None
    try:
        return read_lockfile(path)
    except LockfileError as exc:
        log.warning("ignoring unreadable existing lock %s: %s", path.name, exc.message)
        return None


def _solve_key(
    spec: EnvSpec,
    config: Config,
    old: LockData | None,
    update: Sequence[str],
    update_all: bool,
    skip_pip: bool,
    refreshed: list[ChangedArchive] | None = None,
    solving: Phase | None = None,
) -> LockData:
    from provisioner.lock.solve import exact_constraint, new_gateway, solve_platform

    sources = resolve_channels(spec.channels, config)
    gateway = new_gateway()  # the refresh check and the solve read each channel once
    packages: list[LockedPackage] = []
    for platform in spec.platforms:
        locked_before = old.for_platform(platform, "conda") if old else []
        constraints: list[str] = []
        preferred: list[Any] = []
        if update:
            constraints = [exact_constraint(p) for p in locked_before if p.name not in update]
        elif not update_all:
            changed = changed_archives(locked_before, sources, platform, gateway)
            if refreshed is not None:
                refreshed += changed
            stale = {c.file_name for c in changed}
            # Held at their version and build, but solved from the channel's record.
            constraints = [exact_constraint(p) for p in locked_before if p.file_name in stale]
            preferred = _preferred_records(
                [p for p in locked_before if p.file_name not in stale], sources)
        log.info("solving %s for %s", spec.key, platform)
        solved = solve_platform(
            key=spec.key,
            channels=sources,
            specs=channel_specs(spec.dependencies_for(platform), sources),
            platform=platform,
            virtual_packages=platform_virtual_packages(spec, platform),
            constraints=constraints,
            preferred=preferred,
            gateway=gateway,
        )
        packages.extend(solved)
        if spec.pip_for(platform):
            packages.extend(_pip_entries(spec, config, old, platform, solved, skip_pip))
        if solving is not None:
            solving.advance()
    source = spec_path(config.specs_dir, spec.key)
    hashes = _content_hashes(spec, source, old)
    return LockData(
        platforms=spec.platforms,
        channels=spec.channels,
        content_hash=hashes,
        packages=tuple(packages),
        sources=(f"{config.specs_dir.name}/{spec.key}.yml",),
        extra={**lock_metadata(spec), SEAL_FIELD: conda_lock_seal(source.read_bytes(), hashes)},
    )


def _content_hashes(spec: EnvSpec, source: Path, old: LockData | None) -> dict[str, str]:
    """conda-lock's ``content_hash`` per platform, by conda-lock (an import of about half a
    second), unless the old lock's seal says conda-lock computed them from this very spec."""
    if old is not None and old.extra.get(SEAL_FIELD) == conda_lock_seal(source.read_bytes(),
                                                                        old.content_hash):
        return dict(old.content_hash)
    from provisioner.lock.conda_lock_io import conda_lock_content_hashes

    return conda_lock_content_hashes(source, spec.cuda)


def _canonical(data: LockData) -> tuple[object, ...]:
    """What a lockfile says, independent of the order conda-lock writes packages in."""
    packages = sorted((p.platform, p.manager, p.name, p.version, p.url, p.sha256 or "",
                       p.md5 or "", tuple(sorted(p.dependencies)), tuple(sorted(p.categories)))
                      for p in data.packages)
    return (data.platforms, data.channels, sorted(data.content_hash.items()), packages,
            data.sources, sorted(data.extra.items()))


def channel_specs(specs: Sequence[str], sources: Sequence[ChannelSource]) -> list[str]:
    """``channel::package`` specs pointed at where that channel is read from (a mirror too)."""
    result = []
    for dep in specs:
        channel, sep, rest = dep.partition("::")
        if sep and channel.strip():
            canonical = canonical_channel_url(channel.strip())
            match = next((c for c in sources if canonical in (c.canonical, c.source)), None)
            if match is None:
                raise SpecError(
                    f"dependency {dep!r} names channel '{channel}', which is not in the spec's "
                    "channels",
                    hint=f"add {channel} to channels:",
                )
            dep = f"{match.source}::{rest.strip()}"
        result.append(dep)
    return result


def _pip_entries(spec: EnvSpec, config: Config, old: LockData | None, platform: str,
                 solved: list[LockedPackage], skip_pip: bool) -> list[LockedPackage]:
    """The ``manager: pip`` entries of ``platform``: locked with uv, or kept (``--skip-pip``)."""
    if skip_pip:
        kept = old.for_platform(platform, "pip") if old else []
        if not kept:
            raise LockfileError(
                f"{spec.key}: --skip-pip needs an existing lock with pip entries for {platform}",
                hint="lock once with the package index reachable",
            )
        return kept
    from provisioner.lock.pip_layer import lock_pip_layer

    log.info("locking the pip layer of %s for %s with uv", spec.key, platform)
    return lock_pip_layer(
        key=spec.key,
        requirements=spec.pip_for(platform),
        platform=platform,
        virtual_packages=platform_virtual_packages(spec, platform),
        conda_packages=solved,
        settings=config.pip,
    )


def _render(data: LockData, name: str) -> bytes:
    """conda-lock's writer only writes to a path, and names that path in its header.

    So it writes ``name`` into a scratch directory and the bytes are returned.
    """
    from provisioner.lock.conda_lock_io import write_lockfile

    with tempfile.TemporaryDirectory(prefix="provisioner-render-") as scratch:
        target = Path(scratch) / name
        write_lockfile(target, data)
        return target.read_bytes()


def lock_envs(
    config: Config,
    keys: Sequence[str] | None = None,
    *,
    update: Sequence[str] = (),
    update_all: bool = False,
    skip_pip: bool = False,
    progress: ProgressSink | None = None,
) -> list[LockOutcome]:
    """Lock ``keys`` (default: every spec); return what changed per key.

    ``update`` relocks only the named packages, holding every other package at
    its locked version; ``update_all`` lets every package move. Without either,
    versions already in the lock are preferred where the spec still allows them.
    ``progress`` receives a ``solve`` phase per key (platforms solved).
    """
    if update and update_all:
        raise UserError("--update and --update-all cannot be combined")
    chosen = [validate_env_key(k) for k in keys] if keys else list_spec_keys(config.specs_dir)
    if not chosen:
        raise UserError(
            f"no specs found in {config.specs_dir}",
            hint="run inside a project with environment-specs/, or pass --project DIR",
        )
    specs = [load_spec(config.specs_dir, key) for key in chosen]
    # Solve every key before writing any file: a failure anywhere leaves all locks untouched.
    solved = []
    for spec in specs:
        lock_path = lockfile_path(config.locks_dir, spec.key)
        old = _read_existing(lock_path)
        if update:
            _check_update(spec.key, old, update)
        refreshed: list[ChangedArchive] = []
        with Progress(progress, spec.key).running(
                "solve", total=len(spec.platforms), unit="platforms") as solving:
            data = _solve_key(spec, config, old, update, update_all, skip_pip, refreshed,
                              solving)
        # conda-lock's writer (and its import) only for a lock whose content changes.
        same = old is not None and _canonical(old) == _canonical(data)
        solved.append((spec, lock_path, old, data,
                       None if same else _render(data, lock_path.name), refreshed))
    outcomes = []
    for spec, lock_path, old, data, rendered, refreshed in solved:
        config.locks_dir.mkdir(parents=True, exist_ok=True)
        # Compared as LF text: a CRLF checkout of the same lock is not rewritten.
        changed = False
        if rendered is not None and (not lock_path.is_file()
                                     or read_lf_bytes(lock_path) != lf_bytes(rendered)):
            fsops.atomic_write_bytes(lock_path, rendered)
            changed = True
        outcomes.append(
            LockOutcome(
                key=spec.key,
                lockfile=lock_path,
                changed=changed,
                counts={p: len(data.for_platform(p, "conda")) for p in data.platforms},
                pip_counts={p: len(data.for_platform(p, "pip")) for p in data.platforms
                            if spec.pip_for(p)},
                old=old,
                new=data,
                refreshed=tuple(refreshed),
            )
        )
    return outcomes


def _check_update(key: str, old: LockData | None, update: Sequence[str]) -> None:
    if old is None:
        raise LockfileError(
            f"--update needs an existing lock for {key}",
            hint=f"run 'provisioner lock {key}' first",
        )
    unknown = sorted(set(update) - {p.name for p in old.packages})
    if unknown:
        raise UserError(f"{key}: cannot update {', '.join(unknown)}: not in the lock")
