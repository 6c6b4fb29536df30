"""Content hashes and ``lock --check``: is every lockfile current with its spec?

This needs no solve, no network and no conda-lock import: it hashes the spec's
lock inputs and compares them with the ``content_hash`` in each lockfile's
metadata block.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.config import Config
from provisioner.errors import ProvisionerError, UserError
from provisioner.keys import validate_env_key
from provisioner.lock.lockfile import lockfile_path, pip_lock_path
from provisioner.lock.platforms import VirtualPackages, virtual_packages_for
from provisioner.lock.reader import read_lock_header
from provisioner.lock.spec import EnvSpec, list_spec_keys, load_spec

HASH_SCHEMA = 1
__all__ = ["CheckResult", "check_key", "check_locks", "content_hash", "lockfile_path",
           "pip_lock_path", "platform_virtual_packages"]


def platform_virtual_packages(spec: EnvSpec, platform: str) -> VirtualPackages:
    """The virtual packages that lock ``spec`` on ``platform``."""
    return virtual_packages_for(
        platform, spec.cuda, spec.virtual_package_overrides.get(platform)
    )


def content_hash(spec: EnvSpec, platform: str, pip_lock_sha256: str | None) -> str:
    """Hash of everything that should trigger a relock of ``spec`` on ``platform``."""
    payload = {
        "schema": HASH_SCHEMA,
        **spec.hash_inputs(platform),
        "virtual_packages": {
            name: list(value) for name, value in platform_virtual_packages(spec, platform).items()
        },
        "pip_lock_sha256": pip_lock_sha256,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class CheckResult:
    """Whether one key's lock is current, and why not."""

    key: str
    ok: bool
    reasons: tuple[str, ...] = ()
    lockfile: str = ""
    platforms: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "ok": self.ok,
            "reasons": list(self.reasons),
            "lockfile": self.lockfile,
            "platforms": list(self.platforms),
        }


def check_key(config: Config, key: str) -> CheckResult:
    """Check one key's lockfile against its spec."""
    lock_path = lockfile_path(config.locks_dir, key)
    rel = f"{config.locks_dir.name}/{lock_path.name}"
    try:
        spec = load_spec(config.specs_dir, key)
        header = read_lock_header(lock_path)
    except ProvisionerError as exc:
        return CheckResult(key, False, (exc.message,), rel)
    reasons: list[str] = []
    locked_platforms = header.get("platforms") or []
    hashes = header.get("content_hash") or {}
    if not isinstance(hashes, dict) or not isinstance(locked_platforms, list):
        return CheckResult(key, False, ("metadata block is malformed",), rel)
    for platform in spec.platforms:
        if platform not in locked_platforms or platform not in hashes:
            reasons.append(f"platform {platform} is not locked")
            continue
        pip_sha = None
        if spec.pip:
            pip_path = pip_lock_path(config.locks_dir, key, platform)
            if not pip_path.is_file():
                reasons.append(f"pip layer for {platform} is not locked ({pip_path.name} missing)")
                continue
            pip_sha = file_sha256(pip_path)
        if content_hash(spec, platform, pip_sha) != hashes[platform]:
            reasons.append(
                f"{platform}: spec or pip layer changed since the lock was made"
                " (content hash differs)"
            )
    extra = sorted(set(locked_platforms) - set(spec.platforms))
    if extra:
        reasons.append(f"lock has platforms the spec no longer lists: {', '.join(extra)}")
    return CheckResult(key, not reasons, tuple(reasons), rel, tuple(spec.platforms))


def check_locks(config: Config, keys: list[str] | None = None) -> list[CheckResult]:
    """Check the given keys (default: every spec in the project)."""
    chosen = [validate_env_key(k) for k in keys] if keys else list_spec_keys(config.specs_dir)
    if not chosen:
        # A check of nothing must not pass: CI run in the wrong directory would go green.
        raise UserError(
            f"no specs found in {config.specs_dir}",
            hint="run inside a project with environment-specs/, or pass --project DIR",
        )
    return [check_key(config, key) for key in chosen]
