"""Which CUDA driver a lock needs, and which rule says so.

The driver a lock needs is what it was *solved for*, not the version of the
CUDA packages in it: with CUDA minor-version compatibility a conda-forge lock
solved for ``__cuda 12.0`` can hold ``cuda-version 12.9`` (conda-forge's
``cuda-version`` recipe constrains ``__cuda >={major}``, "major version is
lower bound"). The rules, first match wins:

1. ``recorded``: the ``__cuda`` provisioner locked with, recorded in the lock's
   ``custom_metadata`` (``x-provisioner.virtual-packages.<platform>``);
2. ``dependency``: the strongest explicit ``__cuda`` dependency of a package
   (third-party locks; conda-forge CUDA builds carry one), by lower bound;
3. ``major``: the CUDA *major* of ``pytorch-cuda`` or ``cuda-version`` (the
   pytorch channel's CUDA packages carry no ``__cuda`` dependency);
4. ``pytorch-build``: the CUDA major of a PyPI torch build (``+cu121``, or the
   ``nvidia-cuda-runtime-cu12`` wheel it pulls);
5. a bare ``__cuda`` dependency (no version): any driver.

A package that merely ships CUDA runtime files (``cuda-cudart``) needs no
driver; nor does the ``cuda-version`` it pulls next to a CPU pytorch build.
Every spec is a conda version spec, evaluated by rattler's ``VersionSpec``
(``packaging`` gets ``12.*`` and ``>=12|>=13`` wrong).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from provisioner.lock.lockfile import LockData, LockedPackage

#: custom_metadata field with the virtual packages of a platform's solve (see lock.check)
VIRTUAL_PACKAGES_FIELD = "x-provisioner.virtual-packages.{platform}"
_LOWER_RE = re.compile(r"^(?:>=|==|=|~=)?\s*v?(\d+(?:\.\d+)*)(?:\.\*|\*)?$")
_GREATER_RE = re.compile(r"^>\s*(\d+(?:\.\d+)*)$")
_PYPI_CUDA_RE = re.compile(r"cu(\d{2})(\d)(?!\d)")


@dataclass(frozen=True)
class CudaNeed:
    """The driver a platform of a lock needs: a conda version spec for ``__cuda``."""

    spec: str | None  # ">=12.1", ">=12", "*" (any driver), None (no driver needed)
    rule: str  # recorded | dependency | major | pytorch-build | none
    source: str | None  # in words: where the spec comes from

    def to_dict(self) -> dict[str, object]:
        return {"spec": self.spec, "rule": self.rule, "source": self.source}


def recorded_cuda(extra: Mapping[str, str], platform: str) -> str | None:
    """The ``__cuda`` version recorded in a lock's custom_metadata for ``platform``."""
    text = extra.get(VIRTUAL_PACKAGES_FIELD.format(platform=platform), "")
    for item in text.split(","):
        name, _sep, rest = item.partition("=")
        if name.strip() == "__cuda" and rest.partition("=")[0].strip():
            return rest.partition("=")[0].strip()
    return None


def cuda_need(lock: LockData, platform: str) -> CudaNeed:
    """What ``platform`` of ``lock`` needs from the host's driver."""
    return cuda_need_of(lock.for_platform(platform), recorded_cuda(lock.extra, platform))


def cuda_need_of(packages: Iterable[LockedPackage], recorded: str | None = None) -> CudaNeed:
    """The rules of the module doc applied to one platform's packages."""
    if recorded:
        return CudaNeed(f">={recorded}", "recorded", f"__cuda {recorded} recorded when locking")
    pkgs = list(packages)
    strongest = _strongest_dependency(pkgs)
    if strongest is not None and strongest.spec != "*":
        return strongest
    conda = {p.name: p for p in pkgs if p.manager == "conda"}
    # A CPU pytorch that pulls CUDA runtime files (cuda-cudart, and with it cuda-version,
    # through torchaudio on conda-forge aarch64) runs without a driver.
    cpu_torch = "pytorch" in conda and "cpu" in conda["pytorch"].build
    for name in ("pytorch-cuda", "cuda-version"):
        if name in conda and not (name == "cuda-version" and cpu_torch):
            line = conda[name].version.split(".")[0]
            return CudaNeed(f">={line}", "major",
                            f"CUDA major of {name} {conda[name].version}")
    pip = {p.name.lower().replace("_", "-"): p for p in pkgs if p.manager == "pip"}
    torch = pip.get("torch")
    if torch is not None:
        tag = _PYPI_CUDA_RE.search(torch.version.partition("+")[2])
        runtime = pip.get("nvidia-cuda-runtime-cu12") or pip.get("nvidia-cuda-runtime-cu11")
        major: str | None = str(int(tag[1])) if tag else None
        if major is None and runtime is not None:
            major = runtime.version.split(".")[0]
        if major is not None:
            return CudaNeed(f">={major}", "pytorch-build",
                            f"CUDA major of the PyPI torch build {torch.version}")
    return strongest or CudaNeed(None, "none", None)


def _lower_bound(spec: str) -> tuple[int, ...] | None:
    """The smallest version an (AND-ed) conda spec allows, where it has one."""
    best: tuple[int, ...] | None = None
    for part in spec.replace(" ", "").split(","):
        match = _LOWER_RE.match(part) or _GREATER_RE.match(part)
        if match:
            bound = tuple(int(x) for x in match[1].split("."))
            best = bound if best is None or bound > best else best
    return best


def _strongest_dependency(packages: list[LockedPackage]) -> CudaNeed | None:
    found: list[tuple[tuple[int, ...], str, str]] = []
    for pkg in packages:
        for dep, spec in pkg.dependencies:
            if dep == "__cuda":
                clean = spec.strip() or "*"
                found.append((_lower_bound(clean) or (), clean, pkg.name))
    if not found:
        return None
    _bound, spec, name = max(found, key=lambda f: (f[0], f[1] != "*", f[2]))
    return CudaNeed(spec, "dependency", f"__cuda {spec} dependency of {name}")


def driver_satisfies(host: str, spec: str) -> bool | None:
    """Whether a driver reporting ``__cuda host`` satisfies ``spec``; None if unreadable."""
    import rattler

    # A plain version ("12.1") means that or newer: drivers run older runtimes.
    text = f">={spec}" if re.fullmatch(r"\d+(?:\.\d+)*", spec) else spec
    try:
        return bool(rattler.VersionSpec(text).matches(rattler.Version(host)))
    except Exception:  # rattler raises its own parse errors
        try:
            rattler.VersionSpec(text)
        except Exception:
            return None  # the requirement is unreadable
        return False  # the host version is
