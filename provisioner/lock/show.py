"""Summaries of lock files, ours or anyone else's (conda-lock, pixi.lock, @EXPLICIT).

``provisioner show-lock`` answers the questions one asks of a lockfile before
installing it on a GPU host: how many packages for which platform and manager,
which python, pytorch, transformers and bitsandbytes, which CUDA line the
pytorch build targets, and which CUDA driver the lock needs. Everything is
derived from :class:`~provisioner.lock.lockfile.LockData`, so this module never
imports conda-lock.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from provisioner.config import Config
from provisioner.errors import UserError
from provisioner.lock.cuda_need import cuda_need_of, recorded_cuda
from provisioner.lock.lockfile import LockData, LockedPackage

# The pytorch channel writes the CUDA line dotted (py3.11_cuda12.1_cudnn8.9.2_0);
# conda-forge builds (cuda120_py312...) and PyPI local versions (2.1.0+cu121) pack it.
_CUDA_DOTTED_RE = re.compile(r"cuda(\d+)\.(\d+)")
_CUDA_PACKED_RE = re.compile(r"cu(?:da)?(\d{2})(\d{1,2})(?!\d)")
_MAJOR_MINOR_RE = re.compile(r"(\d+)\.(\d+)")

_MANAGER_ORDER = {"conda": 0, "pip": 1}


@dataclass(frozen=True)
class PlatformSummary:
    """What one platform of a lockfile holds.

    Package fields are ``None`` when the platform does not lock that package.
    A pip-installed package's version carries a ``" (pip)"`` marker; a
    package locked by both managers lists both, separated by ``"; "``.
    """

    platform: str
    counts: dict[str, int]  # manager -> number of packages, conda first
    total: int
    python: str | None
    pytorch: str | None  # "2.2.1 (py3.11_cuda12.1_cudnn8.9.2_0)": version plus build
    pytorch_cuda: str | None  # CUDA line of the pytorch build, None for a CPU build
    transformers: str | None
    bitsandbytes: str | None
    cuda_driver_required: str | None  # a conda spec for __cuda such as ">=12" (lock.cuda_need)
    cuda_driver_source: str | None  # the rule that gave it, in words

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy."""
        return {
            "platform": self.platform,
            "counts": dict(self.counts),
            "total": self.total,
            "python": self.python,
            "pytorch": self.pytorch,
            "pytorch_cuda": self.pytorch_cuda,
            "transformers": self.transformers,
            "bitsandbytes": self.bitsandbytes,
            "cuda_driver_required": self.cuda_driver_required,
            "cuda_driver_source": self.cuda_driver_source,
        }


@dataclass(frozen=True)
class LockSummary:
    """A whole lockfile in brief.

    ``platforms`` lists every platform of the lock, even when ``per_platform``
    was narrowed to one; ``total`` counts the packages of ``per_platform``.
    """

    path: str
    platforms: tuple[str, ...]
    channels: tuple[str, ...]
    total: int
    per_platform: tuple[PlatformSummary, ...]

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy (lists instead of tuples)."""
        return {
            "path": self.path,
            "platforms": list(self.platforms),
            "channels": list(self.channels),
            "total": self.total,
            "per_platform": [p.to_dict() for p in self.per_platform],
        }


def summarize_lock(
    data: LockData, *, path: str = "", platform: str | None = None
) -> LockSummary:
    """Summarise ``data``, for every platform or only for ``platform``.

    Raises :class:`~provisioner.errors.UserError` naming the available
    platforms when ``platform`` is not in the lock.
    """
    by_platform: dict[str, list[LockedPackage]] = {p: [] for p in data.platforms}
    for pkg in data.packages:
        by_platform.setdefault(pkg.platform, []).append(pkg)
    # Platforms that only the packages name (a hand-edited lock) come after the declared ones.
    every = tuple(data.platforms) + tuple(sorted(set(by_platform) - set(data.platforms)))
    order = list(every)
    if platform is not None:
        if platform not in by_platform:
            available = ", ".join(every) or "none"
            where = f" in {path}" if path else ""
            raise UserError(
                f"platform '{platform}' is not{where}; the lock has: {available}",
                hint="pass one of those with --platform, or leave it out to see all",
            )
        order = [platform]
    per_platform = tuple(
        _summarize_platform(p, by_platform[p], recorded_cuda(data.extra, p)) for p in order)
    return LockSummary(
        path=path,
        platforms=every,
        channels=data.channels,
        total=sum(p.total for p in per_platform),
        per_platform=per_platform,
    )


def show_lock(config: Config, target: str, *, platform: str | None = None) -> LockSummary:
    """Summarise ``target``: a lockfile path, or the key of one of the project's locks."""
    from provisioner.keys import validate_env_key
    from provisioner.lock.check import lockfile_path
    from provisioner.lock.formats import read_any_lock
    from provisioner.lock.reader import read_lockfile

    path = Path(target)
    if path.is_file() or (not path.exists() and "#" in path.name):
        return summarize_lock(read_any_lock(path), path=str(target), platform=platform)
    key = validate_env_key(target)
    data = read_lockfile(lockfile_path(config.locks_dir, key))
    return summarize_lock(data, path=key, platform=platform)


def render_summary_text(summary: LockSummary) -> list[str]:
    """Plain text lines of ``summary`` for a terminal, one block per platform."""
    lines = []
    if summary.path:
        lines.append(summary.path)
    lines.append(f"channels:  {', '.join(summary.channels) or '-'}")
    lines.append(f"platforms: {', '.join(summary.platforms) or '-'}")
    for ps in summary.per_platform:
        counts = ", ".join(f"{manager} {n}" for manager, n in ps.counts.items())
        lines.append("")
        lines.append(f"{ps.platform}: {ps.total} packages ({counts or 'none'})")
        driver = ps.cuda_driver_required
        if driver is not None and ps.cuda_driver_source:
            driver = f"{driver} (from {ps.cuda_driver_source})"
        rows = (
            ("python", ps.python),
            ("pytorch", ps.pytorch),
            ("pytorch CUDA", ps.pytorch_cuda),
            ("CUDA driver", driver),
            ("transformers", ps.transformers),
            ("bitsandbytes", ps.bitsandbytes),
        )
        lines.extend(f"  {label:<13} {value or '-'}" for label, value in rows)
    if len(summary.per_platform) > 1:
        lines.append("")
        lines.append(f"total: {summary.total} packages")
    return lines


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _summarize_platform(platform: str, packages: list[LockedPackage],
                        recorded: str | None = None) -> PlatformSummary:
    named: dict[str, list[LockedPackage]] = {}
    for pkg in packages:
        named.setdefault(_norm(pkg.name), []).append(pkg)
    for same in named.values():
        same.sort(key=lambda p: _MANAGER_ORDER.get(p.manager, len(_MANAGER_ORDER)))

    counter = Counter(p.manager for p in packages)
    counts = {
        m: counter[m]
        for m in sorted(counter, key=lambda m: (_MANAGER_ORDER.get(m, len(_MANAGER_ORDER)), m))
    }
    # conda calls it pytorch, PyPI torch; a lock may (wrongly) hold both.
    torch_pkgs = named.get("pytorch", []) + named.get("torch", [])
    pytorch_cuda = _pytorch_cuda(torch_pkgs, named)
    need = cuda_need_of(packages, recorded)
    python = named.get("python")
    return PlatformSummary(
        platform=platform,
        counts=counts,
        total=len(packages),
        python=python[0].version if python else None,
        pytorch=_describe(torch_pkgs, with_build=True),
        pytorch_cuda=pytorch_cuda,
        transformers=_describe(named.get("transformers", [])),
        bitsandbytes=_describe(named.get("bitsandbytes", [])),
        cuda_driver_required=need.spec,
        cuda_driver_source=need.source,
    )


def _describe(pkgs: Iterable[LockedPackage], *, with_build: bool = False) -> str | None:
    parts = []
    for pkg in pkgs:
        if pkg.manager == "conda":
            build = pkg.build if with_build else ""
            parts.append(f"{pkg.version} ({build})" if build else pkg.version)
        else:
            parts.append(f"{pkg.version} ({pkg.manager})")
    return "; ".join(parts) or None


def _cuda_line(text: str) -> str | None:
    """``"12.1"`` from a build string or version that names a CUDA line."""
    dotted = _CUDA_DOTTED_RE.search(text)
    if dotted:
        return f"{int(dotted[1])}.{int(dotted[2])}"
    packed = _CUDA_PACKED_RE.search(text)
    if packed:
        return f"{int(packed[1])}.{int(packed[2])}"
    return None


def _major_minor(version: str) -> str:
    m = _MAJOR_MINOR_RE.match(version)
    return f"{m[1]}.{m[2]}" if m else version


def _pytorch_cuda(
    torch_pkgs: list[LockedPackage], named: dict[str, list[LockedPackage]]
) -> str | None:
    if not torch_pkgs:
        return None
    torch = torch_pkgs[0]
    if torch.manager == "conda":
        if any(dep == "pytorch-cuda" for dep, _spec in torch.dependencies):
            locked = [p for p in named.get("pytorch-cuda", []) if p.manager == "conda"]
            if locked:
                return _major_minor(locked[0].version)
        return _cuda_line(torch.build)
    line = _cuda_line(torch.version.partition("+")[2])
    if line is not None or "+" in torch.version:
        return line
    # PyPI's Linux torch wheels carry no CUDA tag; they pull the CUDA runtime as a wheel.
    for runtime in ("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu11"):
        if runtime in named:
            return _major_minor(named[runtime][0].version)
    return None
