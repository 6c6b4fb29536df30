"""Channel roots are strict: every channel resolves under the root, or the command names it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from provisioner.config import load_config
from provisioner.errors import SpecError
from provisioner.lock.channels import path_to_file_url, resolve_channels

REPO = Path(__file__).resolve().parents[2]
PROVISIONER = Path(sysconfig.get_path("scripts")) / (
    "provisioner.exe" if sys.platform == "win32" else "provisioner"
)


def test_every_channel_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("pytorch", "conda-forge"):
        (root / name).mkdir(parents=True)
    config = load_config(tmp_path, channel_root=root, environ={})
    sources = resolve_channels(("pytorch", "conda-forge"), config)
    assert [s.source for s in sources] == [path_to_file_url(root / "pytorch"),
                                          path_to_file_url(root / "conda-forge")]
    assert [s.canonical for s in sources] == ["https://conda.anaconda.org/pytorch",
                                             "https://conda.anaconda.org/conda-forge"]


@pytest.mark.parametrize(("channel", "message"), [
    ("nvidia", "channel 'nvidia' has no directory under the channel root"),
    ("https://example.invalid/private", "is a URL, and a channel root serves named channels"),
])
def test_a_channel_missing_under_the_root_fails_naming_it(
        tmp_path: Path, channel: str, message: str) -> None:
    root = tmp_path / "root"
    (root / "pytorch").mkdir(parents=True)
    config = load_config(tmp_path, channel_root=root, environ={})
    with pytest.raises(SpecError) as info:
        resolve_channels(("pytorch", channel), config)
    assert message in info.value.message
    assert info.value.hint and "nothing falls back to the network" in info.value.hint


def test_a_mirror_or_a_file_url_needs_no_directory_under_the_root(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (tmp_path / "provisioner.toml").write_text(
        f'[channels]\nnvidia = "{mirror.as_posix()}"\n', encoding="utf-8")
    local = path_to_file_url(tmp_path / "elsewhere")
    config = load_config(tmp_path, channel_root=tmp_path / "empty-root", environ={})
    sources = resolve_channels(("nvidia", local), config)
    assert [s.source for s in sources] == [path_to_file_url(mirror), local]


def test_lock_with_a_root_lacking_a_channel_fails_offline(tmp_path: Path) -> None:
    """The committed specs against a root without nvidia: one error line, nothing written."""
    root = tmp_path / "root"
    for name in ("pytorch", "conda-forge"):
        shutil.copytree(REPO / "tests" / "data" / "conda-mirror" / name, root / name)
    project = tmp_path / "p"
    shutil.copytree(REPO / "environment-specs", project / "environment-specs")
    shutil.copytree(REPO / "lockfiles", project / "lockfiles")
    before = {p.name: p.read_bytes() for p in (project / "lockfiles").iterdir()}
    result = subprocess.run(
        [str(PROVISIONER), "lock", "--skip-pip", "--channel-root", str(root)],
        cwd=project, capture_output=True, text=True, timeout=300,
        env={"PATH": "", "HOME": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9"},
    )
    assert result.returncode == 2, result.stdout
    assert "channel 'nvidia' has no directory under the channel root" in result.stderr
    assert {p.name: p.read_bytes() for p in (project / "lockfiles").iterdir()} == before
