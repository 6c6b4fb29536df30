"""Regenerate provisioner's conda -> PyPI name table from prefix.dev's parselmouth.

    git clone --depth 1 https://github.com/prefix-dev/parselmouth /tmp/parselmouth
    python tools/refresh_pypi_names.py /tmp/parselmouth [--rev <commit>]

reads ``files/compressed_mapping.json`` (conda-forge: the file pixi fetches) and
``files/v0/pytorch/compressed_mapping.json`` at ``--rev`` of that clone (bare
clones work too), and rewrites ``provisioner/lock/data/conda-pypi-names.txt.gz``
with the commit, its date and each file's sha256 in the header. Then update
``provisioner/lock/data/PROVENANCE.md`` to match, and run ``tests/lock/test_pypi_names.py``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provisioner.fsops import atomic_write_bytes  # noqa: E402
from provisioner.lock.pypi_names import DATA_PATH, UPSTREAM_FILES, render_table  # noqa: E402

UPSTREAM = "https://github.com/prefix-dev/parselmouth"


def _git(clone: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(clone), *args], check=True,
                          capture_output=True, timeout=120).stdout


def refresh(clone: Path, rev: str, output: Path) -> str:
    """Write the table from ``clone`` at ``rev`` to ``output``; return the commit used."""
    commit, date = _git(clone, "log", "-1", "--format=%H %cI", rev).decode().split()
    sources = [(channel, _git(clone, "show", f"{commit}:{path}"))
               for channel, path in UPSTREAM_FILES.items()]
    provenance = [f"source: {UPSTREAM} (BSD-3-Clause, prefix.dev GmbH)",
                  f"commit: {commit} ({date})",
                  *(f"{channel}: {path}" for channel, path in UPSTREAM_FILES.items())]
    atomic_write_bytes(output, render_table(sources, provenance))
    return commit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clone", type=Path, help="a git clone of prefix-dev/parselmouth")
    parser.add_argument("--rev", default="HEAD", help="commit or branch to read (HEAD)")
    parser.add_argument("--output", type=Path, default=DATA_PATH)
    args = parser.parse_args(argv)
    commit = refresh(args.clone, args.rev, args.output)
    print(f"wrote {args.output} from parselmouth {commit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
