"""``provisioner doctor``: the host facts that decide whether envs can be built and run."""

from __future__ import annotations

import os
import platform as pyplatform
import sys
from dataclasses import dataclass
from pathlib import Path

from provisioner import __version__, fsops, processes
from provisioner.build.path_budget import (  # noqa: F401  (re-exported: doctor reports it)
    LONG_PATHS_KEY,
    LONG_PATHS_VALUE,
    long_paths_enabled,
)
from provisioner.config import Config
from provisioner.models.inventory import PlainRecord
from provisioner.models.legacy import discover_legacy
from provisioner.models.migrate import human_bytes

LOW_DISK_BYTES = 10 * 1024**3


@dataclass(frozen=True)
class DoctorReport(PlainRecord):
    """Facts about this host that decide whether envs can be built and run."""

    platform: str
    os: str
    python: str
    python_executable: str
    provisioner_version: str
    cuda_driver: str | None
    conda_override_cuda: str | None
    backends: dict[str, dict[str, object]]
    configured_backend: str | None
    home: Path
    home_free_bytes: int | None
    project: Path
    legacy_root: Path | None
    legacy_envs: int
    long_paths_enabled: bool | None
    warnings: tuple[str, ...]


def _backends() -> dict[str, dict[str, object]]:
    from importlib.metadata import PackageNotFoundError, version

    from provisioner.build.backends import BACKENDS

    try:
        found: dict[str, dict[str, object]] = {
            "rattler": {"available": True, "version": version("py-rattler")}}
    except PackageNotFoundError:
        found = {"rattler": {"available": False, "version": None}}
    for name in (n for n in BACKENDS if n != "rattler"):
        exe = os.environ.get(f"PROVISIONER_{name.upper()}_EXE") or processes.which(name)
        found[name] = {"available": exe is not None, "path": exe}
    return found


def doctor(config: Config) -> DoctorReport:
    """Platform, python, CUDA driver, backends, disk, paths and (on Windows) long paths."""
    from provisioner.build.cuda import host_cuda_version
    from provisioner.lock.platforms import host_platform

    warnings = []
    cuda: str | None = None
    free: int | None = None
    try:
        cuda = host_cuda_version()
    except Exception as exc:  # rattler's detection is best effort here
        warnings.append(f"CUDA detection failed: {exc}")
    if cuda is None:
        warnings.append("no CUDA driver detected; CUDA envs need CONDA_OVERRIDE_CUDA to build")
    try:
        free = fsops.free_disk_bytes(config.home)
    except OSError as exc:
        warnings.append(f"cannot measure free disk under {config.home}: {exc}")
    if free is not None and free < LOW_DISK_BYTES:
        warnings.append(f"only {human_bytes(free)} free under {config.home}")
    long_paths = long_paths_enabled()
    if long_paths is False:
        warnings.append("Windows LongPathsEnabled is 0; deep conda prefixes may fail")
    return DoctorReport(
        host_platform(), pyplatform.platform(), pyplatform.python_version(), sys.executable,
        __version__, cuda, os.environ.get("CONDA_OVERRIDE_CUDA"), _backends(), config.backend,
        config.home, free, config.project, config.legacy_root,
        len(discover_legacy(config.legacy_root, config.legacy_models)), long_paths,
        tuple(warnings))


def render_doctor_text(report: DoctorReport) -> list[str]:
    """The doctor report as ``name: value`` lines (sizes in human units)."""
    lines = []
    for name, value in report.to_dict().items():
        if name == "backends" and isinstance(value, dict):
            value = ", ".join(f"{n} ({'yes' if b['available'] else 'no'})"
                              for n, b in value.items())
        elif name == "warnings":
            continue
        shown = human_bytes(report.home_free_bytes) if name == "home_free_bytes" else value
        lines.append(f"{name + ':':21}{'-' if shown is None else shown}")
    return lines + [f"warning: {w}" for w in report.warnings]
