"""Channel roots are strict: every channel resolves under the root, or the command names it.

And ``file://`` URLs convert to local paths and back under Windows (UNC, drives) and POSIX rules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from provisioner.config import load_config
from provisioner.errors import SpecError, UserError
from provisioner.lock.channels import (
    file_url_to_path,
    file_url_to_pure_path,
    path_to_file_url,
    resolve_channels,
)

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
        env={"PATH": "", "HOME": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
             # Windows: a python child cannot start without SYSTEMROOT
             **{k: v for k, v in os.environ.items() if k.upper() == "SYSTEMROOT"}},
    )
    assert result.returncode == 2, result.stdout
    assert "channel 'nvidia' has no directory under the channel root" in result.stderr
    assert {p.name: p.read_bytes() for p in (project / "lockfiles").iterdir()} == before


WINDOWS_CASES = [
    (r"\\server\share\mirror\conda-forge", "file://server/share/mirror/conda-forge"),
    (r"\\server\share", "file://server/share"),
    (r"\\srv.example\pkgs$\my channel", "file://srv.example/pkgs%24/my%20channel"),
    (r"C:\mirror\conda-forge", "file:///C:/mirror/conda-forge"),
    (r"D:\a b\#c", "file:///D:/a%20b/%23c"),
]


@pytest.mark.parametrize(("path", "url"), WINDOWS_CASES)
def test_windows_paths_round_trip(path: str, url: str) -> None:
    assert path_to_file_url(PureWindowsPath(path)) == url
    back = file_url_to_pure_path(url, windows=True)
    assert isinstance(back, PureWindowsPath)
    assert back == PureWindowsPath(path)
    assert str(back).rstrip("\\") == path  # a share's root is spelled \\server\share\


def test_a_unc_url_keeps_its_server_on_windows() -> None:
    # The old conversion read only the URL's path: \share\... on the current drive.
    back = file_url_to_pure_path("file://server/share/x/noarch/a.conda", windows=True)
    assert back.drive == r"\\server\share"
    assert back.anchor == "\\\\server\\share\\"
    assert str(back) == r"\\server\share\x\noarch\a.conda"


@pytest.mark.parametrize("url", ["file:////server/share/x", "file://SERVER/share/x"])
def test_other_unc_spellings(url: str) -> None:
    back = file_url_to_pure_path(url, windows=True)
    assert back.drive.lower() == r"\\server\share"
    assert back.name == "x"


@pytest.mark.parametrize(("url", "path"), [
    ("file:///C|/x", r"C:\x"),  # the old spelling of a drive
    ("file:///C:", "C:\\"),
    ("file://localhost/C:/x", r"C:\x"),
])
def test_drive_spellings(url: str, path: str) -> None:
    back = file_url_to_pure_path(url, windows=True)
    assert str(back) == path
    assert back.is_absolute()


@pytest.mark.parametrize(("path", "url"), [
    ("/srv/mirror/conda-forge", "file:///srv/mirror/conda-forge"),
    ("/a b/#c%", "file:///a%20b/%23c%25"),
])
def test_posix_paths_round_trip(path: str, url: str) -> None:
    assert path_to_file_url(PurePosixPath(path)) == url
    assert file_url_to_pure_path(url, windows=False) == PurePosixPath(path)
    assert file_url_to_pure_path(url.replace("file://", "file://localhost"),
                                 windows=False) == PurePosixPath(path)


def test_a_url_naming_another_host_is_no_posix_path() -> None:
    with pytest.raises(UserError, match="names the host 'server'") as info:
        file_url_to_pure_path("file://server/share/x", windows=False)
    assert info.value.hint


def test_local_round_trip_on_this_machine(tmp_path: Path) -> None:
    target = tmp_path / "mirror dir" / "conda-forge"
    target.mkdir(parents=True)
    url = path_to_file_url(target)
    assert not url.endswith("/")
    assert file_url_to_path(url) == target
    assert file_url_to_path(url + "/noarch/x.conda") == target / "noarch" / "x.conda"


def test_mirrors_on_any_static_storage_rewrite_only_where_archives_come_from(
        tmp_path: Path) -> None:
    """[channels] maps a name (or its canonical URL) to file://, https:// or s3:// storage."""
    from provisioner.build.url_checks import confined_source
    from provisioner.lock.lockfile import LockedPackage

    local = tmp_path / "mirror" / "conda-forge"
    local.mkdir(parents=True)
    (tmp_path / "provisioner.toml").write_text(
        "[channels]\n"
        f'conda-forge = "{local.as_posix()}"\n'
        'pytorch = "https://mirror.example.invalid/static/pytorch/"\n'
        '"https://conda.anaconda.org/nvidia" = "s3://bucket/mirror/nvidia"\n', encoding="utf-8")
    config = load_config(tmp_path, environ={})
    sources = resolve_channels(("conda-forge", "pytorch", "nvidia"), config)
    assert [s.source for s in sources] == [path_to_file_url(local),
                                          "https://mirror.example.invalid/static/pytorch",
                                          "s3://bucket/mirror/nvidia"]
    for src, file_name in zip(sources, ("a-1-0.conda", "b-1-0.tar.bz2", "c-1-0.conda"),
                              strict=True):
        pkg = LockedPackage(name="x", version="1", manager="conda", platform="linux-64",
                            url=f"{src.canonical}/linux-64/{file_name}", sha256="0" * 64)
        assert confined_source(pkg, sources) == f"{src.source}/linux-64/{file_name}"
        assert src.canonical.startswith("https://conda.anaconda.org/")  # what locks record
