"""A pack read back as untrusted input: every member checked against the manifest."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from provisioner.build.pack import MANIFEST, make_pack, write_tar
from provisioner.build.pack_read import PackError, read_pack_info, unpack_pack
from provisioner.config import load_config
from provisioner.errors import IntegrityError
from provisioner.lock.platforms import host_platform
from provisioner.sample.project import create_sample_project

CPU = "sample-cpu-transformers"


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pack-read")
    project = create_sample_project(base / "sp")
    return make_pack(load_config(project.path, home=base / "home", environ={}), CPU,
                     output=base / "cpu.tar").path


def unpacked_tree(pack: Path, tmp_path: Path) -> Path:
    """The pack's files in a folder, to alter and pack again with the real tar writer."""
    root = tmp_path / "tree"
    with tarfile.open(pack) as tar:
        tar.extractall(root, filter="data")
    return root


def repack(root: Path, out: Path) -> Path:
    with out.open("wb") as fh:
        write_tar(fh, root)
    return out


def rewrite_manifest(root: Path, change: dict[str, object]) -> None:
    path = root / MANIFEST
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))


def test_info_reads_the_manifest_and_unpack_checks_every_file(pack: Path, tmp_path: Path) -> None:
    info = read_pack_info(pack, "cpu.tar")
    assert (info.key, info.platform) == (CPU, host_platform())
    assert f"provisioner/{CPU}.conda-lock.yml" in info.files
    dest = tmp_path / "out"
    dest.mkdir()
    unpack_pack(info, dest)
    written = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert written == set(info.files)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_a_truncated_pack_is_refused(pack: Path, tmp_path: Path, keep: float) -> None:
    with tarfile.open(pack) as tar:  # the end of the last member's data; zero padding follows
        last = tar.getmembers()[-1]
        content_end = last.offset_data + last.size
    cut = tmp_path / "cut.tar"
    cut.write_bytes(pack.read_bytes()[: int(content_end * keep)])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(PackError, match="truncated") as caught:
        unpack_pack(read_pack_info(cut, "cut.tar"), dest)
    assert "\n" not in caught.value.message


def test_a_pack_missing_a_listed_file_is_refused(pack: Path, tmp_path: Path) -> None:
    root = unpacked_tree(pack, tmp_path)
    victim = next((root / "channel").glob("*/*.tar.bz2"))
    victim.unlink()
    damaged = repack(root, tmp_path / "p.tar")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(PackError, match=r"1 file\(s\) of its manifest are missing"):
        unpack_pack(read_pack_info(damaged, "p.tar"), dest)


def test_an_altered_archive_is_refused_against_the_manifest(pack: Path, tmp_path: Path) -> None:
    root = unpacked_tree(pack, tmp_path)
    victim = next((root / "channel").glob("*/python-*.tar.bz2"))
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes
    victim.write_bytes(bytes(data))
    altered = repack(root, tmp_path / "p.tar")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="does not match the pack's manifest"):
        unpack_pack(read_pack_info(altered, "p.tar"), dest)
    assert not (dest / victim.relative_to(root)).exists()  # never renamed into place


def test_members_outside_the_layout_or_the_manifest_are_refused(pack: Path,
                                                                tmp_path: Path) -> None:
    root = unpacked_tree(pack, tmp_path)
    extra_file = root / "channel" / "noarch" / "extra-1-0.tar.bz2"
    extra_file.write_bytes(b"not listed")
    extra = repack(root, tmp_path / "extra.tar")
    dest = tmp_path / "out"
    dest.mkdir()
    expected = re.escape("unexpected member 'channel/noarch/extra-1-0.tar.bz2'")
    with pytest.raises(PackError, match=expected):
        unpack_pack(read_pack_info(extra, "extra.tar"), dest)
    # So is a directory the manifest does not imply.
    extra_file.unlink()
    (root / "pypi").mkdir()
    with pytest.raises(PackError, match="unexpected member 'pypi'"):
        unpack_pack(read_pack_info(repack(root, tmp_path / "dir.tar"), "dir.tar"), dest)
    # A manifest that lists a path that climbs out is refused before anything is written.
    rewrite_manifest(root, {"files": {"../escape": {"sha256": "0" * 64, "bytes": 1}}})
    escape = repack(root, tmp_path / "escape.tar")
    with pytest.raises(PackError, match=re.escape("outside the pack layout: '../escape'")):
        read_pack_info(escape, "escape.tar")


def test_a_symlink_member_is_refused(pack: Path, tmp_path: Path) -> None:
    evil = tmp_path / "link.tar"
    evil.write_bytes(pack.read_bytes())
    with tarfile.open(evil, "a") as tar:
        info = tarfile.TarInfo("pypi/x.whl")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(PackError, match=re.escape("unexpected member 'pypi/x.whl'")):
        unpack_pack(read_pack_info(evil, "link.tar"), dest)
    assert not (dest / "pypi" / "x.whl").is_symlink()


def test_not_a_pack(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello" * 1000)
    with pytest.raises(PackError, match="not a pack"):
        read_pack_info(junk, "junk.tar")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"{}"
        info = tarfile.TarInfo("readme.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    other = tmp_path / "other.tar"
    other.write_bytes(buf.getvalue())
    no_meta = re.escape("truncated or not a pack: it has no pixi-pack.json")
    with pytest.raises(PackError, match=no_meta):
        read_pack_info(other, "other.tar")
    with pytest.raises(PackError, match="does not exist"):
        read_pack_info(tmp_path / "missing.tar", "missing.tar")


def test_a_manifest_whose_platform_disagrees_with_pixi_pack_json(pack: Path,
                                                                 tmp_path: Path) -> None:
    root = unpacked_tree(pack, tmp_path)
    rewrite_manifest(root, {"platform": "win-64" if host_platform() != "win-64" else "linux-64"})
    with pytest.raises(PackError, match="its manifest names the platform"):
        read_pack_info(repack(root, tmp_path / "p.tar"), "p.tar")


def test_a_plain_pixi_pack_is_named_as_such(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = json.dumps({"version": "1", "platform": host_platform()}).encode()
        info = tarfile.TarInfo("pixi-pack.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    plain = tmp_path / "environment.tar"
    plain.write_bytes(buf.getvalue())
    with pytest.raises(PackError, match="a pixi-pack without provisioner's manifest and lock"):
        read_pack_info(plain, "environment.tar")
    with pytest.raises(PackError, match="cannot read pack"):
        read_pack_info(tmp_path, "a directory")
