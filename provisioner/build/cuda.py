"""Compare the CUDA version a lock needs with what the host's driver supports.

The pytorch channel's CUDA packages carry no ``__cuda`` dependency, so a solve
never stops a cu12.1 env from being built on a machine whose driver only does
11.8. This check does, before anything is installed. Detection uses rattler's
virtual packages, which honour ``CONDA_OVERRIDE_CUDA``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from provisioner.lock.lockfile import LockData


@dataclass(frozen=True)
class CudaCheck:
    """The outcome of the host check: ``ok`` is False only on a real mismatch."""

    required: str | None
    host: str | None
    ok: bool
    message: str

    def to_dict(self) -> dict[str, object]:
        return {"required": self.required, "host": self.host, "ok": self.ok,
                "message": self.message}


def host_cuda_version() -> str | None:
    """The CUDA version the host driver supports (``__cuda``), or ``None``."""
    import rattler

    for vp in rattler.VirtualPackage.detect(rattler.VirtualPackageOverrides.from_env()):
        generic = vp.into_generic()
        if generic.name.normalized == "__cuda":
            return str(generic.version)
    return None


def required_cuda(lock: LockData, platform: str) -> str | None:
    """The CUDA driver the lock needs on ``platform`` (a version or a specifier)."""
    from provisioner.lock.show import summarize_lock

    summary = summarize_lock(lock, platform=platform)
    return summary.per_platform[0].cuda_driver_required if summary.per_platform else None


def _satisfies(host: str, required: str) -> bool:
    try:
        host_version = Version(host)
    except InvalidVersion:
        return False
    if required[:1].isdigit():
        # A CUDA line ("12.1") needs a driver at least that new: drivers run older runtimes.
        try:
            return host_version >= Version(required)
        except InvalidVersion:
            return False
    try:
        return host_version in SpecifierSet(required.replace(" ", ""))
    except InvalidSpecifier:
        return True


def compare_cuda(required: str | None, host: str | None) -> CudaCheck:
    """Decide whether a host with ``host`` CUDA can run an env that needs ``required``."""
    if required is None:
        return CudaCheck(None, host, True, "the env needs no CUDA driver")
    if host is None:
        return CudaCheck(required, None, False,
                         f"the env needs a CUDA {required} driver, and none was detected")
    if _satisfies(host, required):
        return CudaCheck(required, host, True, f"host CUDA {host} satisfies {required}")
    return CudaCheck(required, host, False,
                     f"the env needs CUDA {required}, the host driver supports {host}")


def mismatch_hint(candidates: Sequence[str] = ()) -> str:
    """What a user can do about a mismatch."""
    override = os.environ.get("CONDA_OVERRIDE_CUDA")
    parts = ["set CONDA_OVERRIDE_CUDA=<version> to build for another driver"
             if override is None else f"CONDA_OVERRIDE_CUDA is {override!r}"]
    if candidates:
        parts.append("or pick another key: " + ", ".join(candidates))
    parts.append("or pass --allow-cuda-mismatch to build anyway")
    return "; ".join(parts)
