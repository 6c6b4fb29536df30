"""Compare the CUDA driver a lock needs with what the host's driver supports.

The pytorch channel's CUDA packages carry no ``__cuda`` dependency, so a solve
never stops a cu12.1 env from being built on a machine whose driver only does
11.8. This check does, before anything is installed. What a lock needs, and
by which rule, is :mod:`provisioner.lock.cuda_need`'s; the comparison is
rattler's ``VersionSpec``. Detection uses rattler's virtual packages, which
honour ``CONDA_OVERRIDE_CUDA``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from provisioner.errors import UserError
from provisioner.lock.cuda_need import CudaNeed, cuda_need, driver_satisfies
from provisioner.lock.lockfile import LockData


@dataclass(frozen=True)
class CudaCheck:
    """The outcome of the host check: ``ok`` is False only on a real mismatch."""

    required: str | None
    host: str | None
    ok: bool
    message: str
    rule: str | None = None  # which rule of provisioner.lock.cuda_need gave ``required``

    def to_dict(self) -> dict[str, object]:
        return {"required": self.required, "host": self.host, "ok": self.ok,
                "message": self.message, "rule": self.rule}


def host_cuda_version() -> str | None:
    """The CUDA version the host driver supports (``__cuda``), or ``None``."""
    import rattler

    try:
        detected = rattler.VirtualPackage.detect(rattler.VirtualPackageOverrides.from_env())
    except Exception as exc:  # rattler's DetectVirtualPackageError: a bad override
        raise UserError(
            f"cannot detect the host's virtual packages: {str(exc).splitlines()[0][:200]}",
            hint="check CONDA_OVERRIDE_CUDA (a version like 12.1) and the other "
                 "CONDA_OVERRIDE_* variables",
        ) from None
    for vp in detected:
        generic = vp.into_generic()
        if generic.name.normalized == "__cuda":
            return str(generic.version)
    return None


def required_cuda(lock: LockData, platform: str) -> CudaNeed:
    """The CUDA driver the lock needs on ``platform``, and the rule that says so."""
    return cuda_need(lock, platform)


def compare_cuda(required: CudaNeed | str | None, host: str | None) -> CudaCheck:
    """Decide whether a host with ``host`` CUDA can run an env that needs ``required``.

    A bare version (``"12.1"``) means that version or newer: drivers run older runtimes.
    """
    need = required if isinstance(required, CudaNeed) else CudaNeed(
        required, "given" if required else "none", None)
    spec, rule = need.spec, need.rule if need.spec else None
    why = f" ({need.source})" if need.source else ""
    if spec is None:
        return CudaCheck(None, host, True, "the env needs no CUDA driver", rule)
    if host is None:
        return CudaCheck(spec, None, False,
                         f"the env needs a CUDA {spec} driver{why}, and none was detected", rule)
    verdict = driver_satisfies(host, spec)
    if verdict is None:  # an unreadable requirement does not block a build
        return CudaCheck(spec, host, True, f"cannot read the CUDA requirement {spec!r}", rule)
    if verdict:
        return CudaCheck(spec, host, True, f"host CUDA {host} satisfies {spec}{why}", rule)
    return CudaCheck(spec, host, False,
                     f"the env needs CUDA {spec}{why}, the host driver supports {host}", rule)


def mismatch_hint(candidates: Sequence[str] = ()) -> str:
    """What a user can do about a mismatch."""
    override = os.environ.get("CONDA_OVERRIDE_CUDA")
    parts = ["set CONDA_OVERRIDE_CUDA=<version> to build for another driver"
             if override is None else f"CONDA_OVERRIDE_CUDA is {override!r}"]
    if candidates:
        parts.append("or pick another key: " + ", ".join(candidates))
    parts.append("or pass --allow-cuda-mismatch to build anyway")
    return "; ".join(parts)
