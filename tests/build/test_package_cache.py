"""The package cache is checked and repaired before linking (issue 9, item 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from winsupport import IS_WINDOWS

from provisioner.build import package_cache
from provisioner.build.artifacts import VerifiedArtifact
from provisioner.build.ensure import ensure
from provisioner.build.layout import HomeLayout
from provisioner.build.package_cache import (
    DiskFullError,
    cache_lock,
    check_free_space,
    clean_partial_entries,
)
from provisioner.build.package_checks import CheckedPackage, PackageSummary
from provisioner.config import Config
from provisioner.lock.lockfile import LockedPackage

CPU = "sample-cpu-transformers"
CU121 = "sample-cu121-transformers"
# in the sample python package on every platform
SITE = ("Lib/site-packages" if IS_WINDOWS else "lib/python{xy}/site-packages"
        ) + "/_sample_python_marker.py"


@pytest.fixture(autouse=True)
def _cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")


def test_a_truncated_cache_file_is_re_extracted_not_copied(config: Config,
                                                           host_python_xy: str) -> None:
    ensure(config, CPU)
    cache = HomeLayout(config.home).package_cache
    entry = next(p for p in cache.iterdir() if p.name.startswith("python-") and p.is_dir())
    damaged = entry / SITE.format(xy=host_python_xy)
    good = damaged.read_bytes()
    damaged.unlink()  # a new inode: the CPU env's hardlink keeps the good bytes
    damaged.write_bytes(good[: len(good) // 2])

    result = ensure(config, CU121)  # shares the python package with CPU
    built = result.prefix / SITE.format(xy=host_python_xy)
    assert built.read_bytes() == good
    assert damaged.read_bytes() == good, "the cache entry was extracted again"


def test_a_cache_entry_with_a_foreign_paths_json_is_dropped(config: Config) -> None:
    ensure(config, CPU)
    cache = HomeLayout(config.home).package_cache
    entry = next(p for p in cache.iterdir() if p.name.startswith("transformers-") and p.is_dir())
    pj = entry / "info" / "paths.json"
    data = json.loads(pj.read_text())
    data["paths"] = []  # says nothing about its files: nothing would be checked
    pj.unlink()
    pj.write_text(json.dumps(data))
    ensure(config, CU121)
    assert json.loads(pj.read_text())["paths"], "the entry was extracted again"


def _checked(tmp_path: Path, unpacked: int, placeholder: int = 0) -> CheckedPackage:
    pkg = LockedPackage(name="big", version="1", manager="conda", platform="linux-64",
                        url="https://conda.anaconda.org/x/linux-64/big-1-0.tar.bz2",
                        sha256="0" * 64)
    return CheckedPackage(VerifiedArtifact(pkg, tmp_path / "big-1-0.tar.bz2"),
                          PackageSummary(unpacked_bytes=unpacked, files=1,
                                         placeholder_bytes=placeholder))


def test_free_space_is_checked_against_what_the_build_writes(tmp_path: Path) -> None:
    cache = tmp_path / "home" / "pkgs"
    cache.mkdir(parents=True)
    pkgs = [_checked(tmp_path, 7_900_000_000)]
    with pytest.raises(DiskFullError) as info:
        check_free_space(pkgs, cache, copy=False, free=2_100_000_000)
    assert info.value.message == f"the build needs 8.0 GB, 2.1 GB free at {cache.parent}"
    assert info.value.exit_code == 2 and info.value.hint
    (cache / "big-1-0").mkdir()  # already extracted: only the placeholder copies count
    check_free_space(pkgs, cache, copy=False, free=2_100_000_000)
    with pytest.raises(DiskFullError):
        check_free_space(pkgs, cache, copy=True, free=2_100_000_000)


def test_partial_entries_go_only_when_no_build_holds_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "pkgs"
    partial = cache / ".torch-2.2.1-0Ab3dE"
    (partial / "lib").mkdir(parents=True)
    (cache / "torch-2.2.1-0").mkdir()
    (cache / ".cache.lock").write_bytes(b"")
    with cache_lock(cache, exclusive=False):
        assert clean_partial_entries(cache) == []
        assert partial.is_dir()
    if IS_WINDOWS:  # no flock there: nothing claims the exclusive right to clean (cache_lock)
        assert clean_partial_entries(cache) == [] and partial.is_dir()
        return
    assert clean_partial_entries(cache) == [partial]
    assert sorted(p.name for p in cache.iterdir()) == [
        ".cache.lock", package_cache.LOCK_NAME, "torch-2.2.1-0"]


def test_bytes_needed_counts_uncached_packages(tmp_path: Path) -> None:
    cache = tmp_path / "pkgs"
    cache.mkdir()
    pkgs = [_checked(tmp_path, 1000, placeholder=10)]
    base = package_cache.bytes_needed([], cache, copy=False)
    assert package_cache.bytes_needed(pkgs, cache, copy=False) == base + 1010
