"""The one module that imports conda-lock.

conda-lock's import probes for conda executables and costs about 0.7 s, so it
is imported inside the functions here, never at module level, and only by
commands that read or write whole lockfiles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provisioner.errors import LockfileError
from provisioner.lock.lockfile import LockData, LockedPackage, validate_hashes


def read_lockfile(path: Path, *, check_hashes: bool = True) -> LockData:
    """Parse any conda-lock v1 (or v2prelim) file with conda-lock's own parser."""
    if not path.is_file():
        raise LockfileError(f"lockfile {path} does not exist")
    try:
        lock = _parse(path)
    except Exception as exc:  # conda-lock raises pydantic, yaml and value errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LockfileError(f"{path.name}: not a readable conda-lock file: {first}") from None
    packages = []
    for dep in lock.package:
        pkg = LockedPackage(
            name=dep.name,
            version=str(dep.version),
            manager=dep.manager,
            platform=dep.platform,
            url=str(dep.url),
            sha256=dep.hash.sha256,
            md5=dep.hash.md5,
            dependencies=tuple(sorted((str(k), str(v)) for k, v in dep.dependencies.items())),
            categories=tuple(sorted(dep.categories)),
        )
        if check_hashes:
            validate_hashes(pkg, path.name)
        packages.append(pkg)
    meta = lock.metadata
    return LockData(
        platforms=tuple(meta.platforms),
        channels=tuple(ch.url for ch in meta.channels),
        content_hash=dict(meta.content_hash),
        packages=tuple(packages),
        sources=tuple(meta.sources),
    )


def _parse(path: Path) -> Any:
    """conda-lock's own models, fed by libyaml when available.

    ``parse_conda_lock_file`` uses the pure-Python YAML loader, which is most of
    the time of a warm build on a large lock; the models and the v1 -> v2 upgrade
    are conda-lock's either way.
    """
    import yaml
    from conda_lock.lockfile import parse_conda_lock_file

    loader = getattr(yaml, "CSafeLoader", None)
    try:
        from conda_lock.lockfile import lockfile_v1_to_v2
        from conda_lock.lockfile.v1.models import Lockfile as LockfileV1
        from conda_lock.lockfile.v2prelim.models import Lockfile
    except ImportError:  # conda-lock moved its internals: take the slow, public path
        loader = None
    if loader is None:
        return parse_conda_lock_file(path)
    content = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    if not isinstance(content, dict):
        raise ValueError("not a mapping")
    version = content.pop("version", None)
    if version == 1:
        return lockfile_v1_to_v2(LockfileV1.model_validate(content))
    if version == 2:
        return Lockfile.model_validate(content)
    raise ValueError(f"unsupported lockfile version {version!r}")


def write_lockfile(path: Path, data: LockData) -> None:
    """Write ``data`` to ``path`` with conda-lock's own v1 writer.

    The caller is responsible for atomicity: write to a temporary path in the
    same directory and rename it.
    """
    from conda_lock.lockfile import write_conda_lock_file
    from conda_lock.lockfile.v2prelim.models import (
        HashModel,
        LockedDependency,
        Lockfile,
        LockMeta,
    )
    from conda_lock.models.channel import Channel

    deps: list[Any] = [
        LockedDependency(
            name=p.name,
            version=p.version,
            manager=p.manager,
            platform=p.platform,
            dependencies=dict(p.dependencies),
            url=p.url,
            hash=HashModel(md5=p.md5, sha256=p.sha256),
            categories=set(p.categories),
        )
        for p in data.packages
    ]
    lock = Lockfile(
        package=deps,
        metadata=LockMeta(
            content_hash=dict(sorted(data.content_hash.items())),
            channels=[Channel.from_string(c) for c in data.channels],
            platforms=list(data.platforms),
            sources=list(data.sources),
        ),
    )
    write_conda_lock_file(lock, path, metadata_choices=None)
