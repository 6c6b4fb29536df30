"""Copy promotion keeps the link structure: hardlinks to the package cache and symlinks."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from provisioner import fscopy
from provisioner.build.ensure import ensure
from provisioner.build.layout import HomeLayout
from provisioner.config import load_config
from provisioner.fscopy import copy_tree_into
from provisioner.sample.project import SampleProject, create_sample_project

CPU = "sample-cpu-transformers"
CU = "sample-cu121-transformers"


def _tree(root: Path) -> tuple[Path, Path]:
    cache = root / "cache"
    cache.mkdir()
    (cache / "shared.py").write_text("print('cache')\n")
    src = root / "stage"
    (src / "lib").mkdir(parents=True)
    os.link(cache / "shared.py", src / "lib" / "shared.py")  # as rattler links from its cache
    (src / "patched.txt").write_text("written for this env\n")
    os.link(src / "patched.txt", src / "lib" / "patched-again.txt")
    (src / "solo.txt").write_text("one link\n")
    if sys.platform != "win32":
        (src / "bin").mkdir()
        (src / "bin" / "python3").symlink_to("python3.11")
        (src / "bin" / "python3.11").write_text("#!/bin/sh\n")
    return cache, src


def test_copy_keeps_hardlinks_to_the_cache_and_symlinks(tmp_path: Path) -> None:
    cache, src = _tree(tmp_path)
    dst = tmp_path / "env"
    copy_tree_into(src, dst)
    assert os.stat(dst / "lib" / "shared.py").st_ino == os.stat(cache / "shared.py").st_ino
    # A file with a single link is copied; one linked twice in the tree stays linked.
    assert os.stat(dst / "solo.txt").st_ino != os.stat(src / "solo.txt").st_ino
    assert os.stat(dst / "patched.txt").st_ino == os.stat(dst / "lib" / "patched-again.txt").st_ino
    if sys.platform != "win32":
        assert os.readlink(dst / "bin" / "python3") == "python3.11"
    assert (dst / "lib" / "shared.py").read_text() == "print('cache')\n"


def test_copy_across_filesystems_copies_but_keeps_links_inside_the_tree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, src = _tree(tmp_path)
    real_link = os.link

    def cross_device(a: str, b: str, *args: object, **kwargs: object) -> None:
        if os.path.commonpath([os.path.abspath(a), str(src)]) == str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link")  # the cache is elsewhere
        real_link(a, b)

    monkeypatch.setattr(os, "link", cross_device)
    dst = tmp_path / "env"
    copy_tree_into(src, dst)
    assert os.stat(dst / "lib" / "shared.py").st_ino != os.stat(cache / "shared.py").st_ino
    assert os.stat(dst / "patched.txt").st_ino == os.stat(dst / "lib" / "patched-again.txt").st_ino
    assert (dst / "lib" / "shared.py").read_text() == "print('cache')\n"


# --- real envs: a copied env costs what a renamed one costs -----------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("fscopy") / "sp")


def _inodes(root: Path) -> set[tuple[int, int]]:
    found = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                found.add((st.st_dev, st.st_ino))
    return found


# rattler tags every prefix it creates as a cache directory (CACHEDIR.TAG).
_PER_ENV = ("conda-meta/", ".provisioner-", "CACHEDIR.TAG")


def _own_files(prefix: Path, cache: Path) -> dict[str, int]:
    """Regular files of ``prefix`` that share no inode with the package cache: path -> size."""
    cached = _inodes(cache)
    own = {}
    for dirpath, _dirs, files in os.walk(prefix):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in cached:
                own[os.path.relpath(path, prefix).replace(os.sep, "/")] = st.st_size
    return own


def _written_for_env(prefix: Path) -> set[str]:
    """What an install writes for one env: records, prefix-patched files, provisioner's files."""
    paths = set()
    for record in (prefix / "conda-meta").glob("*.json"):
        data = json.loads(record.read_text(encoding="utf-8"))
        for entry in data.get("paths_data", {}).get("paths", []):
            if entry.get("prefix_placeholder"):
                paths.add(entry["_path"])
    return paths


def test_copy_promotion_shares_the_cache_and_adds_only_its_own_bytes(
        project: SampleProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")
    for name in ("PROVISIONER_BACKEND", "PROVISIONER_FORCE_COPY", "PROVISIONER_HOME"):
        monkeypatch.delenv(name, raising=False)
    # Same-length homes, so the prefix-patched files have the same sizes in both.
    renamed = load_config(project.path, home=tmp_path / "h-rename", environ={})
    copied = load_config(project.path, home=tmp_path / "h-copies",
                         environ={"PROVISIONER_FORCE_COPY": "1"})
    assert copied.force_copy and not renamed.force_copy
    by_rename = ensure(renamed, CPU)
    by_copy = ensure(copied, CPU)
    cache = HomeLayout(copied.home).package_cache

    own = _own_files(by_copy.prefix, cache)
    own_renamed = _own_files(by_rename.prefix, HomeLayout(renamed.home).package_cache)
    assert sorted(own) == sorted(own_renamed)
    assert sum(own.values()) == sum(own_renamed.values())
    # Everything else is the cache's inode: what the env owns is only what it was written.
    for rel in own:
        assert rel.startswith(_PER_ENV) or rel in _written_for_env(by_copy.prefix), rel
    files = sum(len(f) for _d, _s, f in os.walk(by_copy.prefix))
    assert files - len(own) >= 10  # the packages' files: the cache's inodes, not copies

    # A second env by copy in the same home adds its own bytes, nothing of what it shares.
    envs = HomeLayout(copied.home).envs
    before = _inodes(envs)
    second = ensure(copied, CU)
    added = _inodes(envs) - before
    cached_now = _inodes(cache)
    own_second = _own_files(second.prefix, cache)
    pointer = os.lstat(HomeLayout(copied.home).pointer(CU))
    assert {i for i in added if i not in cached_now} == {
        (os.lstat(second.prefix / rel).st_dev, os.lstat(second.prefix / rel).st_ino)
        for rel in own_second
    } | {(pointer.st_dev, pointer.st_ino)}
    for rel in own_second:
        assert rel.startswith(_PER_ENV) or rel in _written_for_env(second.prefix), rel


def test_link_or_copy_links_or_copies_and_replaces(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"archive")
    fscopy.link_or_copy(src, tmp_path / "a" / "linked")
    assert (tmp_path / "a" / "linked").stat().st_ino == src.stat().st_ino
    copied = tmp_path / "copied"
    copied.write_bytes(b"stale")
    fscopy.link_or_copy(src, copied, link=False)
    assert copied.read_bytes() == b"archive" and copied.stat().st_ino != src.stat().st_ino
    assert sorted(os.listdir(tmp_path)) == ["a", "copied", "src"]  # no temp file left
