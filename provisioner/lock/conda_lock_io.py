"""The one module that imports conda-lock, to write locks with its own models.

conda-lock's import probes for conda executables and costs about 0.7 s, so it
is imported inside the functions here, never at module level, and only by
``provisioner lock`` and ``lock --check``. Reading a lock never needs it:
:mod:`provisioner.lock.reader` reads locks by structure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provisioner.lock.lockfile import LockData


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
            custom_metadata=dict(sorted(data.extra.items())) or None,
        ),
    )
    write_conda_lock_file(lock, path, metadata_choices=None)


#: An empty PyPI -> conda name mapping. conda-lock's environment.yml parser loads (by default:
#: downloads) one as soon as a spec has a ``pip:`` section, only to name the ``pip`` package it
#: adds in conda's terms; pip requirements themselves are not translated. Every name then maps
#: to itself, which is right for ``pip``, so the content hash is the one conda-lock computes.
MAPPING_PATH = Path(__file__).with_name("no_pypi_mapping.json")


def conda_lock_content_hashes(spec_file: Path, cuda: str | None) -> dict[str, str]:
    """conda-lock's ``content_hash`` per platform, computed by conda-lock itself.

    This is what ``conda-lock lock -f <spec_file> --with-cuda <cuda>`` writes
    (``--with-cuda`` left out: conda-lock's default ``__cuda``), offline.
    """
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.src_parser import make_lock_spec
    from conda_lock.virtual_package import default_virtual_package_repodata

    spec = make_lock_spec(src_files=[spec_file], mapping_url=str(MAPPING_PATH))
    repodata = default_virtual_package_repodata(cuda_version=cuda or "default")
    return dict(compute_content_hashes(spec, repodata))
