"""Conda platforms and the virtual packages assumed when locking for them.

Locking must not depend on the machine that runs it, so each platform gets a
fixed set of virtual packages. The defaults match the oldest systems that the
pytorch and conda-forge channels still build for:

============== ==========================================================
platform       virtual packages
============== ==========================================================
linux-64       __unix 0, __linux 5.10, __glibc 2.28, __archspec 1=x86_64
linux-aarch64  __unix 0, __linux 5.10, __glibc 2.28, __archspec 1=aarch64
osx-64         __unix 0, __osx 11.0, __archspec 1=x86_64
osx-arm64      __unix 0, __osx 11.0, __archspec 1=arm64
win-64         __win 0, __archspec 1=x86_64
============== ==========================================================

``__cuda`` comes from the spec's ``x-provisioner.cuda`` (never from the host),
and a spec may override any version through ``x-provisioner.virtual-packages``.
"""

from __future__ import annotations

import platform as _platform
import sys
from collections.abc import Mapping

from provisioner.errors import SpecError

#: name -> (version, build string)
VirtualPackages = dict[str, tuple[str, str]]

_DEFAULTS: dict[str, VirtualPackages] = {
    "linux-64": {
        "__unix": ("0", "0"), "__linux": ("5.10", "0"), "__glibc": ("2.28", "0"),
        "__archspec": ("1", "x86_64"),
    },
    "linux-aarch64": {
        "__unix": ("0", "0"), "__linux": ("5.10", "0"), "__glibc": ("2.28", "0"),
        "__archspec": ("1", "aarch64"),
    },
    "osx-64": {"__unix": ("0", "0"), "__osx": ("11.0", "0"), "__archspec": ("1", "x86_64")},
    "osx-arm64": {"__unix": ("0", "0"), "__osx": ("11.0", "0"), "__archspec": ("1", "arm64")},
    "win-64": {"__win": ("0", "0"), "__archspec": ("1", "x86_64")},
}
SUPPORTED_PLATFORMS = tuple(_DEFAULTS)


def validate_platform(name: str) -> str:
    """Return ``name`` if provisioner can lock for it."""
    if name not in _DEFAULTS:
        raise SpecError(
            f"unknown platform '{name}'",
            hint=f"supported platforms: {', '.join(SUPPORTED_PLATFORMS)}",
        )
    return name


def virtual_packages_for(
    platform: str, cuda: str | None, overrides: Mapping[str, str] | None = None
) -> VirtualPackages:
    """The virtual packages used to lock ``platform``, as plain data."""
    result = dict(_DEFAULTS[validate_platform(platform)])
    if cuda and not platform.startswith("osx"):
        result["__cuda"] = (cuda, "0")
    for name, version in (overrides or {}).items():
        build = result.get(name, ("", "0"))[1]
        result[name] = (version, build)
    return dict(sorted(result.items()))


def host_platform() -> str:
    """The conda platform of the running interpreter."""
    machine = _platform.machine().lower()
    arm = machine in ("arm64", "aarch64")
    if sys.platform == "win32":
        return "win-64"
    if sys.platform == "darwin":
        return "osx-arm64" if arm else "osx-64"
    return "linux-aarch64" if arm else "linux-64"


def is_windows_platform(platform: str) -> bool:
    """Whether envs for ``platform`` use the Windows prefix layout."""
    return platform.startswith("win")
