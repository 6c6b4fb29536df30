"""Content hashes and ``lock --check``: is every lockfile current with its spec?

A lock carries two hashes per platform, and ``lock --check`` checks both
without a solve or the network:

* ``metadata.content_hash``: conda-lock's own hash of the spec, equal to what
  ``conda-lock lock -f environment-specs/<key>.yml --with-cuda <x-provisioner.cuda>``
  computes, so ``conda-lock --check-input-hash`` accepts the lock. It is
  computed with conda-lock's code (:mod:`provisioner.lock.conda_lock_io`).
* ``metadata.custom_metadata["x-provisioner.content-hash.<platform>"]``:
  provisioner's hash of everything it reads from the spec (dependencies,
  ``pip:``, channels, platforms, the virtual packages it solved with). conda-lock
  keeps ``custom_metadata`` as it is. This one needs no conda-lock import, so
  ``ensure`` uses it alone to warn about a spec edited since locking.

``custom_metadata`` also records, per platform, the virtual packages of the
solve (``x-provisioner.virtual-packages.<platform>``, e.g.
``__cuda=12.1,__glibc=2.28,...``): the CUDA driver a lock needs is read from there.

Importing conda-lock costs about a second, so ``x-provisioner.conda-lock-seal``
seals the spec's bytes, conda-lock's version and the ``content_hash`` values
together: while the seal holds, conda-lock's hash is known to be what
conda-lock computed from this very spec, and ``lock --check`` needs no import.

It also checks that the package section is whole (:mod:`provisioner.lock.body_check`):
a lock cut short keeps its metadata, and so its hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from provisioner.config import Config
from provisioner.errors import ProvisionerError, UserError
from provisioner.keys import validate_env_key
from provisioner.lock.body_check import lock_body_problems
from provisioner.lock.cuda_need import VIRTUAL_PACKAGES_FIELD
from provisioner.lock.eol import lf_bytes
from provisioner.lock.lockfile import lockfile_path
from provisioner.lock.platforms import VirtualPackages, virtual_packages_for
from provisioner.lock.reader import read_lock_header
from provisioner.lock.spec import EnvSpec, list_spec_keys, load_spec, spec_path

HASH_SCHEMA = 2
HASH_FIELD = "x-provisioner.content-hash.{platform}"
SEAL_FIELD = "x-provisioner.conda-lock-seal"
__all__ = [
    "CheckResult",
    "check_key",
    "check_locks",
    "content_hash",
    "lock_metadata",
    "lockfile_path",
    "platform_virtual_packages",
]


def platform_virtual_packages(spec: EnvSpec, platform: str) -> VirtualPackages:
    """The virtual packages that lock ``spec`` on ``platform``."""
    return virtual_packages_for(
        platform, spec.cuda, spec.virtual_package_overrides.get(platform)
    )


def content_hash(spec: EnvSpec, platform: str) -> str:
    """provisioner's hash of everything that should trigger a relock of ``spec`` on ``platform``."""
    payload = {
        "schema": HASH_SCHEMA,
        **spec.hash_inputs(platform),
        "virtual_packages": {
            name: list(value) for name, value in platform_virtual_packages(spec, platform).items()
        },
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def render_virtual_packages(vps: VirtualPackages) -> str:
    """``__cuda=12.1,__glibc=2.28,...`` (the build string only where it says something)."""
    return ",".join(f"{name}={version}" + (f"={build}" if build not in ("", "0") else "")
                    for name, (version, build) in sorted(vps.items()))


def conda_lock_seal(spec_bytes: bytes, hashes: dict[str, str]) -> str:
    """The seal of conda-lock's ``content_hash`` values over the spec they came from.

    The spec is sealed as LF text: a CRLF checkout of the same spec keeps the seal.
    """
    blob = json.dumps({"spec_sha256": hashlib.sha256(lf_bytes(spec_bytes)).hexdigest(),
                       "conda_lock": installed_version("conda-lock"), "content_hash": hashes},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def installed_version(dist: str) -> str:
    """``importlib.metadata.version(dist)``, read from the ``.dist-info`` directory's name
    where there is one: importing importlib.metadata costs ``lock`` about 25 ms."""
    prefix = dist.replace("-", "_").lower() + "-"
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.lower().startswith(prefix) and name.endswith(".dist-info"):
                return name[len(prefix):-len(".dist-info")]
    from importlib.metadata import version

    return version(dist)


def lock_metadata(spec: EnvSpec) -> dict[str, str]:
    """What provisioner records in ``metadata.custom_metadata`` for ``spec``."""
    result = {}
    for platform in spec.platforms:
        result[HASH_FIELD.format(platform=platform)] = content_hash(spec, platform)
        result[VIRTUAL_PACKAGES_FIELD.format(platform=platform)] = render_virtual_packages(
            platform_virtual_packages(spec, platform))
    return result


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


def check_key(config: Config, key: str, *, conda_lock_hash: bool = False) -> CheckResult:
    """Check one key's lockfile against its spec.

    provisioner's own hash is always checked; ``conda_lock_hash`` also checks
    conda-lock's ``content_hash`` (which imports conda-lock: ``lock --check``
    does, ``ensure`` does not).
    """
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
    custom = header.get("custom_metadata") or {}
    if not isinstance(hashes, dict) or not isinstance(locked_platforms, list) \
            or not isinstance(custom, dict):
        return CheckResult(key, False, ("metadata block is malformed",), rel)
    expected = lock_metadata(spec)
    current = []  # platforms whose provisioner hash holds: conda-lock's is checked next
    for platform in spec.platforms:
        if platform not in locked_platforms or platform not in hashes:
            reasons.append(f"platform {platform} is not locked")
            continue
        field_name = HASH_FIELD.format(platform=platform)
        if custom.get(field_name) != expected[field_name]:
            reasons.append(
                f"{platform}: spec changed since the lock was made"
                f" (content hash differs: custom_metadata {field_name})"
            )
        else:
            current.append(platform)
    if conda_lock_hash and current:
        reasons += _conda_lock_reasons(spec_path(config.specs_dir, key), spec.cuda, current,
                                       {str(k): str(v) for k, v in hashes.items()}, custom)
    extra = sorted(set(locked_platforms) - set(spec.platforms))
    if extra:
        reasons.append(f"lock has platforms the spec no longer lists: {', '.join(extra)}")
    reasons.extend(lock_body_problems(lock_path, spec))
    return CheckResult(key, not reasons, tuple(reasons), rel, tuple(spec.platforms))


def _conda_lock_reasons(source: Path, cuda: str | None, platforms: list[str],
                        hashes: dict[str, str], custom: dict[str, object]) -> list[str]:
    """Where conda-lock's ``content_hash`` is not what conda-lock computes from the spec."""
    if custom.get(SEAL_FIELD) == conda_lock_seal(source.read_bytes(), hashes):
        return []  # conda-lock computed these from this very spec (see the module doc)
    from provisioner.lock.conda_lock_io import conda_lock_content_hashes

    theirs = conda_lock_content_hashes(source, cuda)
    return [f"{platform}: spec changed since the lock was made (conda-lock's content_hash "
            "differs)" for platform in platforms if theirs.get(platform) != hashes[platform]]


def check_locks(config: Config, keys: list[str] | None = None) -> list[CheckResult]:
    """Check the given keys (default: every spec in the project)."""
    chosen = [validate_env_key(k) for k in keys] if keys else list_spec_keys(config.specs_dir)
    if not chosen:
        # A check of nothing must not pass: CI run in the wrong directory would go green.
        raise UserError(
            f"no specs found in {config.specs_dir}",
            hint="run inside a project with environment-specs/, or pass --project DIR",
        )
    return [check_key(config, key, conda_lock_hash=True) for key in chosen]
