"""Which PyPI distribution a conda package installs, from prefix.dev's parselmouth mapping.

The pip layer treats what conda installs as installed (:mod:`provisioner.lock.pip_layer`),
so it must know the PyPI name of each conda package, and know which conda
packages have none: the C library ``xxhash`` (0.8.2) is not PyPI's ``xxhash``
(conda's ``python-xxhash`` 3.4.1 is); conda's ``tzdata`` is the IANA data, not
PyPI's ``tzdata`` (conda's ``python-tzdata`` is).

The table is vendored in ``data/conda-pypi-names.txt.gz`` (provenance and the
refresh command in ``data/PROVENANCE.md``). parselmouth builds it from the
``*.dist-info`` directories inside the channels' real archives, the same data
pixi uses; a ``-`` entry means parselmouth saw the package and it ships no
Python distribution. The rule for a conda package, in order:

1. the table of its channel (``conda-forge`` or ``pytorch``), if it names it;
2. else conda-forge's table (the names every conda channel shares), if it names it;
3. else conda-lock's rule: a package that depends on ``python`` installs the
   PyPI distribution of its own name; any other has no PyPI twin.

Virtual packages (``__cuda``) and ``python`` itself never have one. When two
conda packages name the same PyPI distribution, the one whose own name is that
PyPI name wins, then the first by name, so the choice is deterministic.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from packaging.utils import canonicalize_name

from provisioner.errors import LockfileError
from provisioner.lock.lockfile import LockedPackage

DATA_PATH = Path(__file__).with_name("data") / "conda-pypi-names.txt.gz"
DEFAULT_CHANNEL = "conda-forge"
#: parselmouth's files, per channel: the conda-forge file is the one pixi fetches.
UPSTREAM_FILES = {
    "conda-forge": "files/compressed_mapping.json",
    "pytorch": "files/v0/pytorch/compressed_mapping.json",
}
NO_TWIN = "-"
_NEVER = {"python"}

#: conda name -> PyPI name, or None for "no PyPI twin"
ChannelTable = Mapping[str, str | None]


@dataclass(frozen=True)
class NameTable:
    """conda -> PyPI names per channel, with the header lines that say where they came from."""

    channels: Mapping[str, ChannelTable]
    header: tuple[str, ...] = ()

    def lookup(self, channel: str, conda_name: str) -> tuple[bool, str | None]:
        """``(known, pypi_name)`` from ``channel``'s table, then conda-forge's."""
        for name in dict.fromkeys([channel, DEFAULT_CHANNEL]):
            table = self.channels.get(name)
            if table is not None and conda_name in table:
                return True, table[conda_name]
        return False, None


def channel_of(pkg: LockedPackage) -> str:
    """The channel name in a package URL (``.../<channel>/<subdir>/<file>``)."""
    parts = pkg.url.rstrip("/").split("/")
    return parts[-3] if len(parts) >= 3 else ""


def pypi_name(pkg: LockedPackage, table: NameTable | None = None) -> str | None:
    """The (normalized) PyPI distribution ``pkg`` installs, or None if it installs none."""
    if pkg.manager == "pip":
        return canonicalize_name(pkg.name)
    if pkg.name.startswith("__") or pkg.name in _NEVER:
        return None
    known, name = (table or load_table()).lookup(channel_of(pkg), pkg.name)
    if known:
        return None if name is None else canonicalize_name(name)
    if any(dep == "python" for dep, _spec in pkg.dependencies):
        return canonicalize_name(pkg.name)
    return None


def pypi_distributions(
    conda_packages: Iterable[LockedPackage], table: NameTable | None = None
) -> dict[str, LockedPackage]:
    """PyPI name -> the conda package that installs it (collisions: see the module doc)."""
    table = table or load_table()
    chosen: dict[str, LockedPackage] = {}
    for pkg in sorted(conda_packages, key=lambda p: p.name):
        name = pypi_name(pkg, table)
        if name is None:
            continue
        current = chosen.get(name)
        if current is None or (canonicalize_name(pkg.name) == name
                               and canonicalize_name(current.name) != name):
            chosen[name] = pkg
    return chosen


# --- the vendored file ----------------------------------------------------------------------


def parse_table(text: str) -> NameTable:
    """Read the vendored text format (``[channel]`` sections, one conda name a line)."""
    channels: dict[str, dict[str, str | None]] = {}
    header: list[str] = []
    current: dict[str, str | None] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            if current is None and line:
                header.append(line)
            continue
        if line.startswith("["):
            channel = line[1:].partition("]")[0]
            current = channels.setdefault(channel, {})
            header.append(line)
            continue
        fields = line.split()
        if current is None or len(fields) > 2:
            raise LockfileError(f"{DATA_PATH.name} line {number}: cannot read {raw!r}")
        conda = fields[0]
        target = fields[1] if len(fields) == 2 else canonicalize_name(conda)
        current[conda] = None if target == NO_TWIN else target
    return NameTable(channels, tuple(header))


@lru_cache(maxsize=1)
def load_table(path: Path = DATA_PATH) -> NameTable:
    """The vendored table (read once per process)."""
    try:
        return parse_table(gzip.decompress(path.read_bytes()).decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise LockfileError(
            f"cannot read the conda -> PyPI name table {path}: {exc}",
            hint="reinstall provisioner; the table ships with it",
        ) from exc


def _single_name(conda: str, value: object) -> str | None:
    """One PyPI name from a parselmouth value: a name, a list of names, or null."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"parselmouth entry {conda!r}: {value!r} is not a name, list or null")
    normalized = [canonicalize_name(n) for n in names]
    # The v0 per-channel files list every name seen across builds; the conda name wins.
    return canonicalize_name(conda) if canonicalize_name(conda) in normalized else normalized[0]


def render_table(sources: Sequence[tuple[str, bytes]], provenance: Sequence[str]) -> bytes:
    """The vendored file's bytes from parselmouth's JSON files, ``[(channel, json bytes)]``.

    Deterministic (sorted, gzip without a timestamp), so a refresh from the same
    upstream commit reproduces the file byte for byte.
    """
    lines = [
        "# conda package name -> PyPI distribution name, for provisioner's pip layer.",
        "# '<conda>' alone: same name on PyPI; '<conda> <pypi>': another name; "
        f"'<conda> {NO_TWIN}': no PyPI twin.",
        *(f"# {p}" for p in provenance),
    ]
    for channel, blob in sources:
        data = json.loads(blob)
        if not isinstance(data, dict):
            raise ValueError(f"{channel}: expected a JSON object of conda names")
        lines.append(f"[{channel}] sha256={hashlib.sha256(blob).hexdigest()} "
                     f"entries={len(data)}")
        for conda in sorted(data):
            name = _single_name(conda, data[conda])
            if name is None:
                lines.append(f"{conda} {NO_TWIN}")
            elif name == canonicalize_name(conda):
                lines.append(conda)
            else:
                lines.append(f"{conda} {name}")
    return gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), 9, mtime=0)
