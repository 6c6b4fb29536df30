"""``lock --check`` fails on a lockfile whose package section is cut short or damaged."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from provisioner.config import Config, load_config
from provisioner.errors import EXIT_CHECK_FAILED
from provisioner.lock.check import check_key, lockfile_path

KEYS = ("sample-cpu-transformers", "sample-cu121-transformers", "sample-cu121-transformers-bnb")


@pytest.fixture
def own(shared_project: Path, tmp_path: Path) -> Config:
    project = tmp_path / "project"
    shutil.copytree(shared_project, project)
    return load_config(project, home=tmp_path / "home", environ={})


def test_the_sample_locks_are_whole(own: Config) -> None:
    for key in KEYS:
        result = check_key(own, key)
        assert result.ok, result.reasons


@pytest.mark.parametrize("key", KEYS)
def test_every_truncation_of_the_package_section_fails(own: Config, key: str) -> None:
    path = lockfile_path(own.locks_dir, key)
    whole = path.read_bytes()
    start = whole.index(b"\npackage:") + len(b"\npackage:")
    passed = []
    # Every 13th byte, and every byte of the last entry; all but the final newline.
    cuts = sorted({*range(start, len(whole) - 1, 13), *range(len(whole) - 200, len(whole) - 1)})
    for cut in cuts:
        path.write_bytes(whole[:cut])
        if check_key(own, key).ok:
            passed.append(cut)
    path.write_bytes(whole)
    assert passed == [], f"truncations at bytes {passed[:5]} of {len(whole)} passed the check"


@pytest.mark.parametrize("damage", [
    (b"sha256: ", b"sha256: 00"),  # a hash too long
    (b"url: https://", b"url: "),  # fine
])
def test_a_damaged_entry_fails(own: Config, damage: tuple[bytes, bytes]) -> None:
    key = KEYS[0]
    path = lockfile_path(own.locks_dir, key)
    old, new = damage
    path.write_bytes(path.read_bytes().replace(old, new, 1))
    result = check_key(own, key)
    if damage[0] == b"sha256: ":
        assert not result.ok and "malformed sha256" in " ".join(result.reasons)
    else:
        assert result.ok, result.reasons


def test_cli_lock_check_exits_1_on_a_truncated_lock(own: Config) -> None:
    path = lockfile_path(own.locks_dir, KEYS[0])
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 9 // 10])
    done = subprocess.run([sys.executable, "-m", "provisioner", "lock", "--check", "--project",
                           str(own.project)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == EXIT_CHECK_FAILED, done.stdout + done.stderr
    assert "cut short" in done.stdout + done.stderr
