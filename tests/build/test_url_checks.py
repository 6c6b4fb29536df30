"""Lock URLs stay inside the lock's channels and their mirrors (issue 9, item 3)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from provisioner.build.url_checks import confined_source
from provisioner.errors import LockfileError
from provisioner.lock.channels import ChannelSource, path_to_file_url
from provisioner.lock.lockfile import LockedPackage

CANON = "https://conda.anaconda.org/sample"


def _pkg(url: str) -> LockedPackage:
    return LockedPackage(name="torch", version="1.0", manager="conda", platform="linux-64",
                         url=url, sha256="0" * 64)


@pytest.fixture
def mirror(tmp_path: Path) -> tuple[Path, ChannelSource]:
    root = tmp_path / "mirror"
    (root / "noarch").mkdir(parents=True)
    (root / "noarch" / "torch-1.0-0.tar.bz2").write_bytes(b"x")
    return root, ChannelSource("sample", CANON, path_to_file_url(root))


def test_a_channel_url_maps_into_its_mirror(mirror: tuple[Path, ChannelSource]) -> None:
    root, src = mirror
    url = confined_source(_pkg(f"{CANON}/noarch/torch-1.0-0.tar.bz2"), [src])
    assert url == path_to_file_url(root) + "/noarch/torch-1.0-0.tar.bz2"


@pytest.mark.parametrize("url, why", [
    ("file:///etc/torch-1.0-0.tar.bz2", "not in any channel the lock names"),
    ("https://evil.example/sample/noarch/torch-1.0-0.tar.bz2", "not in any channel"),
    ("http://conda.anaconda.org/sample/noarch/torch-1.0-0.tar.bz2", "not in any channel"),
    (f"{CANON}/noarch/../../../etc/torch-1.0-0.tar.bz2", "'..' path segment"),
    (f"{CANON}/noarch/%2e%2e/torch-1.0-0.tar.bz2", "'..' path segment"),
    (f"{CANON}/noarch/torch-1.0-0.tar.bz2?x=1", "query or fragment"),
    (f"{CANON}/noarch/torch-1.0-0.tar.bz2#frag", "query or fragment"),
    (f"{CANON}/noarch/deeper/torch-1.0-0.tar.bz2", "not <subdir>/<file>"),
    (f"{CANON}/noarch/..%2F..%2Fx.tar.bz2", "not <subdir>/<file>"),
])
def test_urls_outside_the_channels_are_refused(mirror: tuple[Path, ChannelSource], url: str,
                                               why: str) -> None:
    _root, src = mirror
    with pytest.raises(LockfileError) as info:
        confined_source(_pkg(url), [src])
    assert why in info.value.message and "torch 1.0" in info.value.message
    assert info.value.exit_code == 2 and info.value.hint


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_a_symlink_in_the_mirror_cannot_lead_out(mirror: tuple[Path, ChannelSource],
                                                 tmp_path: Path) -> None:
    root, src = mirror
    outside = tmp_path / "outside.tar.bz2"
    outside.write_bytes(b"x")
    (root / "noarch" / "evil-1.0-0.tar.bz2").symlink_to(outside)
    with pytest.raises(LockfileError, match="resolves outside the mirror"):
        confined_source(_pkg(f"{CANON}/noarch/evil-1.0-0.tar.bz2"), [src])


def test_http_only_where_a_channel_is_configured_so() -> None:
    plain = ChannelSource("http://127.0.0.1:9/chan", "http://127.0.0.1:9/chan",
                          "http://127.0.0.1:9/chan")
    url = "http://127.0.0.1:9/chan/noarch/torch-1.0-0.tar.bz2"
    assert confined_source(_pkg(url), [plain]) == url
    mirrored = ChannelSource("sample", CANON, "http://127.0.0.1:9/mirror")
    assert confined_source(_pkg(f"{CANON}/noarch/torch-1.0-0.tar.bz2"), [mirrored]) == \
        "http://127.0.0.1:9/mirror/noarch/torch-1.0-0.tar.bz2"
    with pytest.raises(LockfileError):
        confined_source(_pkg("http://127.0.0.1:9/other/noarch/torch-1.0-0.tar.bz2"), [plain])
