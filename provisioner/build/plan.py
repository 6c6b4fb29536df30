"""Plan an ``ensure`` as plain data before anything is touched (uv's discipline).

The plan says which generation serves the key and what has to happen:

* ``reuse``   a ready env's fingerprint matches the lock;
* ``build``   no env exists for the key yet;
* ``rebuild`` the lock changed: a new generation is built beside the old one;
* ``repair``  the fingerprint is missing or corrupt, or a build was interrupted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from provisioner.build.fingerprint import in_progress_path, read_fingerprint
from provisioner.build.layout import HomeLayout, generation_name, python_path, read_pointer
from provisioner.config import Config
from provisioner.errors import LockfileError
from provisioner.keys import validate_env_key
from provisioner.lock.check import lockfile_path
from provisioner.lock.eol import read_lf_bytes
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lock_header

Action = Literal["reuse", "build", "rebuild", "repair"]


@dataclass(frozen=True)
class EnsurePlan:
    """What ``ensure`` will do for one key, decided before any write."""

    key: str
    platform: str
    action: Action
    reason: str
    generation: str
    prefix: Path
    python: Path
    lock_hash: str
    lockfile: Path
    active_generation: str | None
    stale_staging: tuple[Path, ...] = ()
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "platform": self.platform,
            "action": self.action,
            "reason": self.reason,
            "generation": self.generation,
            "prefix": str(self.prefix),
            "python": str(self.python),
            "lock_hash": self.lock_hash,
            "lockfile": str(self.lockfile),
            "active_generation": self.active_generation,
            "stale_staging": [str(p) for p in self.stale_staging],
            # Known once the lock is read (a dry run or a build), else null: same keys always.
            "packages_to_link": None, "archive_bytes": None, "archives_known": None,
            **self.details,
        }


def locked_hash(config: Config, key: str, platform: str) -> str:
    """Identity of what the lock pins for ``platform``: its content hash and its packages.

    The content hash alone only covers the spec: ``lock --update`` (or a relock
    that keeps preferred versions) changes the packages under the same content
    hash, and an env built from the old packages must not be reused for it. The
    file's bytes are hashed whole, without parsing its packages, to keep reuse
    fast: any edit of the lock builds a new generation. They are hashed as LF
    text, so a CRLF checkout of the same lock reuses the same generation.
    """
    path = lockfile_path(config.locks_dir, key)
    hashes = read_lock_header(path).get("content_hash")
    if not isinstance(hashes, dict) or platform not in hashes:
        raise LockfileError(
            f"{path.name} has no lock for this platform ({platform})",
            hint=f"add {platform} to the spec's platforms and run 'provisioner lock {key}'",
        )
    digest = hashlib.sha256(f"{platform}\n{hashes[platform]}\n".encode())
    try:
        digest.update(read_lf_bytes(path))
    except OSError as exc:
        raise LockfileError(f"cannot read {path.name}: {exc.strerror}") from None
    return digest.hexdigest()


def env_is_ready(prefix: Path, lock_hash: str, platform: str) -> bool:
    """Whether ``prefix`` holds a complete env built from ``lock_hash``."""
    fp = read_fingerprint(prefix)
    return (
        fp is not None
        and not prefix.is_symlink()
        and fp.lock_hash == lock_hash
        and not in_progress_path(prefix).exists()
        and python_path(prefix, platform).exists()
    )


def stale_staging_dirs(layout: HomeLayout, key: str) -> list[Path]:
    """Staging dirs of ``key``; only meaningful while holding the key's lock."""
    if not layout.staging.is_dir():
        return []
    prefix = layout.staging_prefix(key)
    # Staging names are <key>.<generation>.<token>; keys may hold dots themselves, so
    # "a.b.<gen>.<token>" belongs to key "a.b", not to key "a" (whose lock does not cover it).
    return sorted(
        p for p in layout.staging.iterdir()
        if p.name.startswith(prefix) and p.name.rsplit(".", 2)[0] == key
    )


def make_plan(config: Config, key: str, *, platform: str | None = None) -> EnsurePlan:
    """Decide what ``ensure`` must do for ``key`` on ``platform`` (default: this host)."""
    validate_env_key(key)
    plat = platform or host_platform()
    layout = HomeLayout(config.home)
    lock_hash = locked_hash(config, key, plat)
    gen = generation_name(lock_hash)
    prefix = layout.generation_dir(key, gen)
    active = read_pointer(layout, key)
    stale = tuple(stale_staging_dirs(layout, key))

    def plan(action: Action, reason: str) -> EnsurePlan:
        return EnsurePlan(
            key=key, platform=plat, action=action, reason=reason, generation=gen,
            prefix=prefix, python=python_path(prefix, plat), lock_hash=lock_hash,
            lockfile=lockfile_path(config.locks_dir, key), active_generation=active,
            stale_staging=stale,
        )

    if prefix.exists():
        if env_is_ready(prefix, lock_hash, plat):
            if active != gen:
                return plan("reuse", f"generation {gen} is ready; it becomes the active one")
            return plan("reuse", "a ready env matches the lock")
        if in_progress_path(prefix).exists():
            return plan("repair", "an earlier build of this generation was interrupted")
        return plan("repair", "the env's fingerprint is missing, corrupt or does not match")
    if active is not None and layout.generation_dir(key, active).exists():
        return plan("rebuild", f"the lock changed (active generation {active}, lock {gen})")
    if stale:
        return plan("repair", "an earlier build was interrupted")
    return plan("build", "no env for this key yet")
