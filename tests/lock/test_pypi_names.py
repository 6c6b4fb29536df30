"""conda -> PyPI names: the vendored parselmouth table, the fallback rule, and its refresh."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from provisioner.errors import LockfileError
from provisioner.lock.lockfile import LockedPackage
from provisioner.lock.pip_layer import conda_provided
from provisioner.lock.pypi_names import (
    DATA_PATH,
    NameTable,
    channel_of,
    load_table,
    parse_table,
    pypi_distributions,
    pypi_name,
)
from provisioner.lock.reader import read_lockfile

REPO = Path(__file__).resolve().parents[2]
PROVENANCE = DATA_PATH.with_name("PROVENANCE.md")
BNB_LOCK = REPO / "lockfiles" / "torch-cu121-transformers-bnb.conda-lock.yml"
PY = (("python", ">=3.11,<3.12.0a0"),)


def pkg(name: str, version: str = "1.0", *, channel: str = "conda-forge",
        deps: tuple[tuple[str, str], ...] = ()) -> LockedPackage:
    url = f"https://conda.anaconda.org/{channel}/linux-64/{name}-{version}-0.conda"
    return LockedPackage(name, version, "conda", "linux-64", url, "0" * 64, dependencies=deps)


@pytest.mark.parametrize(("name", "channel", "deps", "expected"), [
    # another name on PyPI
    ("python-xxhash", "conda-forge", PY, "xxhash"),
    ("msgpack-python", "conda-forge", PY, "msgpack"),
    ("brotli-python", "conda-forge", PY, "brotli"),
    ("python-tzdata", "conda-forge", (), "tzdata"),
    ("pytorch", "conda-forge", PY, "torch"),
    ("pytorch", "pytorch", PY, "torch"),
    ("torchtriton", "pytorch", PY, "triton"),
    ("typing_extensions", "conda-forge", PY, "typing-extensions"),
    ("huggingface_hub", "conda-forge", PY, "huggingface-hub"),
    # the same name
    ("pyyaml", "conda-forge", PY, "pyyaml"),
    ("numpy", "conda-forge", PY, "numpy"),
    # no PyPI twin, even where a PyPI project of that name exists
    ("xxhash", "conda-forge", (), None),
    ("tzdata", "conda-forge", (), None),
    ("brotli", "conda-forge", (), None),
    ("libcurl", "conda-forge", (), None),
    ("yaml", "conda-forge", (), None),
    ("typing-extensions", "conda-forge", (("typing_extensions", "4.16.0"),), None),
    ("pytorch-gpu", "conda-forge", (("pytorch", ""),), None),
    ("cuda-cudart", "nvidia", (), None),
    ("python", "conda-forge", (), None),
    ("__cuda", "conda-forge", (), None),
    # in neither table: conda-lock's rule (depends on python -> same name, else none)
    ("pytorch-cuda", "pytorch", (("cuda-cudart", ">=12.1,<12.2"),), None),
    ("pytorch-mutex", "pytorch", (), None),
    ("not-in-any-table-x", "provisioner-sample", PY, "not-in-any-table-x"),
    ("Not_In_Any_Table_Y", "provisioner-sample", PY, "not-in-any-table-y"),
    ("libnot-in-any-table", "provisioner-sample", (), None),
    # a channel without its own table uses conda-forge's names
    ("python-xxhash", "provisioner-sample", PY, "xxhash"),
    ("xxhash", "provisioner-sample", PY, None),
])
def test_pypi_name(name: str, channel: str, deps: tuple[tuple[str, str], ...],
                   expected: str | None) -> None:
    assert pypi_name(pkg(name, channel=channel, deps=deps)) == expected


def test_pip_entries_keep_their_own_name() -> None:
    entry = LockedPackage("BitsAndBytes", "0.43.3", "pip", "linux-64",
                          "https://pypi.invalid/b.whl", "0" * 64)
    assert pypi_name(entry) == "bitsandbytes"


def test_channel_of() -> None:
    assert channel_of(pkg("x", channel="pytorch")) == "pytorch"
    assert channel_of(LockedPackage("x", "1", "conda", "linux-64",
                                    "file:///srv/mirror/conda-forge/noarch/x-1-0.conda",
                                    None)) == "conda-forge"


def test_collisions_prefer_the_package_named_like_the_distribution() -> None:
    chosen = pypi_distributions([
        pkg("xxhash", "0.8.2"), pkg("python-xxhash", "3.4.1", deps=PY),
        pkg("dask-core", "2024.1.0", deps=PY), pkg("dask", "2024.1.1", deps=PY),
        pkg("python-tzdata", "2026.3"), pkg("tzdata", "2026c"),
    ])
    assert {k: (v.name, v.version) for k, v in chosen.items()} == {
        "xxhash": ("python-xxhash", "3.4.1"),
        "dask": ("dask", "2024.1.1"),
        "tzdata": ("python-tzdata", "2026.3"),
    }
    # the order of the input does not matter
    again = pypi_distributions([pkg("dask", "2024.1.1", deps=PY),
                                pkg("dask-core", "2024.1.0", deps=PY)])
    assert again["dask"].name == "dask"


def test_committed_lock_constrains_the_real_python_packages() -> None:
    """The issue's three mistakes on the committed bnb lock, and what is right instead."""
    provided = conda_provided(read_lockfile(BNB_LOCK).for_platform("linux-64", "conda"))
    assert provided["xxhash"] == "3.4.1"  # python-xxhash, not the C library's 0.8.2
    assert provided["brotli"] == "1.1.0"  # brotli-python
    assert provided["tzdata"] == "2026.3"  # python-tzdata, not the IANA data's 2026c
    assert provided["torch"] == "2.2.1" and provided["triton"] == "2.2.0"
    assert provided["typing-extensions"] == "4.16.0"
    assert provided["huggingface-hub"] == "0.20.2"
    for not_pypi in ("libcurl", "openssl", "python", "pytorch", "pytorch-cuda",
                     "cuda-cudart", "mkl", "yaml", "libarrow", "python-xxhash"):
        assert not_pypi not in provided


# --- the vendored file ----------------------------------------------------------------------


def _provenance_commit() -> str:
    match = re.search(r"\| commit \| `([0-9a-f]{40})`", PROVENANCE.read_text(encoding="utf-8"))
    assert match, "PROVENANCE.md names the upstream commit"
    return match.group(1)


def test_vendored_table_matches_its_provenance() -> None:
    table = load_table()
    header = "\n".join(table.header)
    assert f"commit: {_provenance_commit()}" in header
    assert "BSD-3-Clause" in header and "prefix-dev/parselmouth" in header
    provenance = PROVENANCE.read_text(encoding="utf-8")
    for channel, entries in (("conda-forge", 33909), ("pytorch", 57)):
        [line] = [h for h in table.header if h.startswith(f"[{channel}]")]
        sha = re.search(r"sha256=([0-9a-f]{64})", line)
        assert sha and sha.group(1) in provenance
        assert f"entries={entries}" in line
        assert len(table.channels[channel]) == entries
    # The counts PROVENANCE.md gives for conda-forge
    cf = table.channels["conda-forge"]
    assert sum(1 for v in cf.values() if v is None) == 13254
    assert len(DATA_PATH.read_bytes()) < 200_000  # the repo stays small


def test_table_format_and_errors(tmp_path: Path) -> None:
    table = parse_table("# head\n[c]\nfoo_bar\nx y\nz -\n\n[d]\nfoo_bar -\n")
    assert table.channels == {"c": {"foo_bar": "foo-bar", "x": "y", "z": None},
                              "d": {"foo_bar": None}}
    assert table.lookup("d", "foo_bar") == (True, None)
    assert NameTable({}).lookup("c", "x") == (False, None)
    with pytest.raises(LockfileError, match="line 2"):
        parse_table("[c]\na b c\n")
    with pytest.raises(LockfileError, match="line 1"):
        parse_table("orphan\n")
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(gzip.compress(b"[c]\nx\n")[:-6])
    with pytest.raises(LockfileError, match="cannot read the conda -> PyPI name table") as info:
        load_table(broken)
    assert info.value.hint


# --- refresh from an upstream clone ---------------------------------------------------------

UPSTREAM_CF = {"python-xxhash": "xxhash", "xxhash": None, "pyyaml": "pyyaml",
               "huggingface_hub": "huggingface-hub", "Weird_Name": "Other.Name"}
UPSTREAM_PT = {"pytorch": ["torch"], "torchserve": ["torchserve", "torchserve-staging"],
               "two": ["b-name", "a-name"], "pytorch-cuda": None}


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@invalid", "GIT_AUTHOR_DATE": "2026-01-02T03:04:05Z",
           "GIT_COMMITTER_DATE": "2026-01-02T03:04:05Z", "HOME": str(repo.parent),
           "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=env, timeout=60).stdout.strip()


def _refresh(clone: Path, out: Path, *rev: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "refresh_pypi_names.py"), str(clone),
         "--output", str(out), *rev], capture_output=True, text=True, timeout=120)


def test_refresh_tool_rebuilds_the_table_from_an_upstream_clone(tmp_path: Path) -> None:
    clone = tmp_path / "parselmouth"
    (clone / "files" / "v0" / "pytorch").mkdir(parents=True)
    (clone / "files" / "compressed_mapping.json").write_text(json.dumps(UPSTREAM_CF))
    (clone / "files" / "v0" / "pytorch" / "compressed_mapping.json").write_text(
        json.dumps(UPSTREAM_PT))
    _git(clone, "init", "-q")
    _git(clone, "add", "-A")
    _git(clone, "commit", "-q", "-m", "mapping")
    commit = _git(clone, "rev-parse", "HEAD")
    out = tmp_path / "table.txt.gz"

    result = _refresh(clone, out)
    assert result.returncode == 0, result.stderr
    assert commit in result.stdout
    table = load_table.__wrapped__(out)
    assert table.channels == {
        "conda-forge": {"python-xxhash": "xxhash", "xxhash": None, "pyyaml": "pyyaml",
                        "huggingface_hub": "huggingface-hub", "Weird_Name": "other-name"},
        "pytorch": {"pytorch": "torch", "torchserve": "torchserve", "two": "b-name",
                    "pytorch-cuda": None},
    }
    assert f"# commit: {commit} (2026-01-02T03:04:05+00:00)" in table.header

    # Deterministic: the same upstream commit gives the same bytes.
    again = tmp_path / "again.txt.gz"
    assert _refresh(clone, again, "--rev", commit).returncode == 0
    assert again.read_bytes() == out.read_bytes()

    # A malformed upstream entry is refused, and the old table stays.
    (clone / "files" / "compressed_mapping.json").write_text(json.dumps({"x": 3}))
    _git(clone, "commit", "-q", "-am", "broken")
    before = out.read_bytes()
    failed = _refresh(clone, out)
    assert failed.returncode != 0 and "is not a name, list or null" in failed.stderr
    assert out.read_bytes() == before
