"""Archives are verified against the lock's sha256, from a local mirror or over HTTP."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from provisioner.build import artifacts
from provisioner.build.artifacts import locate_sizes, sha256_file, verify_artifacts
from provisioner.build.ensure import ensure
from provisioner.config import Config, load_config
from provisioner.errors import BuildError, IntegrityError, LockfileError
from provisioner.lock.channels import ChannelSource, resolve_channels
from provisioner.lock.lockfile import LockData, LockedPackage
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lockfile
from provisioner.sample.project import SampleProject, create_sample_project
from provisioner.sample.stack import SAMPLE_CHANNEL

CPU = "sample-cpu-transformers"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("artifacts") / "sp")


@pytest.fixture(scope="module")
def lock(project: SampleProject) -> LockData:
    return read_lockfile(project.path / "lockfiles" / f"{CPU}.conda-lock.yml")


@pytest.fixture(scope="module")
def packages(lock: LockData) -> list[LockedPackage]:
    return lock.for_platform(host_platform(), "conda")


def local_config(root: Path, tmp_path: Path) -> Config:
    return load_config(root, home=tmp_path / "home", environ={})


def sources_for(config: Config, lock: LockData) -> list[ChannelSource]:
    return resolve_channels(lock.channels, config)


def memo(cache: Path) -> dict[str, list[Any]]:
    path = cache / "verified-sha256.json"
    data: dict[str, list[Any]] = json.loads(path.read_text()) if path.exists() else {}
    return data


def copy_channel(project: SampleProject, tmp_path: Path) -> Path:
    """A project whose channel the test may alter."""
    dest = tmp_path / "sp"
    shutil.copytree(project.path, dest)
    return dest


# --- local mirror --------------------------------------------------------------------------------


def test_local_archives_are_verified_in_place(project: SampleProject, tmp_path: Path,
                                              lock: LockData,
                                              packages: list[LockedPackage]) -> None:
    config = local_config(project.path, tmp_path)
    cache = tmp_path / "cache"
    result = verify_artifacts(packages, sources_for(config, lock), cache)
    assert [a.package for a in result] == packages
    channel = project.path / "channel"
    for art in result:
        assert art.path == channel / art.package.subdir / art.package.file_name
        assert art.url == art.path.as_uri()
        assert sha256_file(art.path) == art.package.sha256
    remembered = memo(cache)
    assert set(remembered) == {str(a.path) for a in result}
    for art in result:
        size, mtime_ns, ino, ctime_ns, digest = remembered[str(art.path)]
        st = art.path.stat()
        assert (size, mtime_ns, ino, ctime_ns, digest) == (
            st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, art.package.sha256)
    assert not (cache / "downloads").exists()


def test_unchanged_archives_are_not_hashed_again(project: SampleProject, tmp_path: Path,
                                                 lock: LockData, packages: list[LockedPackage],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_channel(project, tmp_path)
    config = local_config(root, tmp_path)
    cache = tmp_path / "cache"
    verify_artifacts(packages, sources_for(config, lock), cache)
    hashed: list[Path] = []
    real = artifacts.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(artifacts, "sha256_file", counting)
    verify_artifacts(packages, sources_for(config, lock), cache)
    assert hashed == []
    touched = root / "channel" / packages[0].subdir / packages[0].file_name
    os.utime(touched, ns=(1, 1))
    verify_artifacts(packages, sources_for(config, lock), cache)
    assert hashed == [touched]


def test_same_size_same_mtime_swap_is_hashed_again(project: SampleProject, tmp_path: Path,
                                                   lock: LockData,
                                                   packages: list[LockedPackage]) -> None:
    """The memo keys on inode and ctime too: size and mtime are the user's to set."""
    root = copy_channel(project, tmp_path)
    config = local_config(root, tmp_path)
    cache = tmp_path / "cache"
    verify_artifacts(packages, sources_for(config, lock), cache)
    pkg = next(p for p in packages if p.name == "pytorch")
    archive = root / "channel" / pkg.subdir / pkg.file_name
    st = archive.stat()
    data = bytearray(archive.read_bytes())
    data[-1] ^= 0xFF  # other bytes, same size
    archive.write_bytes(bytes(data))  # in place: same inode
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (archive.stat().st_size, archive.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(IntegrityError, match="sha256 mismatch for pytorch"):
        verify_artifacts(packages, sources_for(config, lock), cache)


def test_tampered_archive_is_refused_and_forgotten(project: SampleProject, tmp_path: Path,
                                                   lock: LockData,
                                                   packages: list[LockedPackage]) -> None:
    root = copy_channel(project, tmp_path)
    config = local_config(root, tmp_path)
    cache = tmp_path / "cache"
    verify_artifacts(packages, sources_for(config, lock), cache)  # memo now holds good hashes
    pkg = next(p for p in packages if p.name == "pytorch")
    archive = root / "channel" / pkg.subdir / pkg.file_name
    original = archive.read_bytes()
    archive.write_bytes(original + b"\0appended")
    bad = sha256_file(archive)

    for _attempt in range(2):
        with pytest.raises(IntegrityError) as err:
            verify_artifacts(packages, sources_for(config, lock), cache)
        message = str(err.value)
        assert f"pytorch {pkg.version}" in message and pkg.file_name in message
        assert f"lock has {pkg.sha256}" in message and f"archive has {bad}" in message
        assert str(archive) not in memo(cache)
        assert bad not in json.dumps(memo(cache))
    assert archive.exists(), "a local mirror file is never deleted"

    archive.write_bytes(original)
    assert len(verify_artifacts(packages, sources_for(config, lock), cache)) == len(packages)
    assert memo(cache)[str(archive)][-1] == pkg.sha256


def test_missing_archive_and_missing_hash(project: SampleProject, tmp_path: Path,
                                          lock: LockData,
                                          packages: list[LockedPackage]) -> None:
    root = copy_channel(project, tmp_path)
    config = local_config(root, tmp_path)
    pkg = packages[-1]
    (root / "channel" / pkg.subdir / pkg.file_name).unlink()
    with pytest.raises(BuildError, match="missing from the channel mirror") as err:
        verify_artifacts(packages, sources_for(config, lock), tmp_path / "cache")
    assert pkg.file_name in str(err.value)

    md5_only = dataclasses.replace(packages[0], sha256=None)
    with pytest.raises(LockfileError, match="no sha256"):
        verify_artifacts([md5_only], sources_for(config, lock), tmp_path / "cache")


def test_locate_sizes(project: SampleProject, tmp_path: Path, lock: LockData,
                      packages: list[LockedPackage]) -> None:
    root = copy_channel(project, tmp_path)
    config = local_config(root, tmp_path)
    channel = root / "channel"
    sizes = [(channel / p.subdir / p.file_name).stat().st_size for p in packages]
    assert locate_sizes(config, lock, packages) == {"archive_bytes": sum(sizes),
                                                    "archives_known": len(packages)}
    (channel / packages[0].subdir / packages[0].file_name).unlink()
    assert locate_sizes(config, lock, packages) == {"archive_bytes": None,
                                                    "archives_known": len(packages) - 1}


# --- HTTP channel --------------------------------------------------------------------------------


class _Server:
    def __init__(self, directory: Path) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                outer.requests.append(self.path)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                         partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def served(project: SampleProject, tmp_path: Path) -> Iterator[tuple[_Server, Path]]:
    """An HTTP copy of the sample channel (the test may alter the served files)."""
    served_dir = tmp_path / "served"
    shutil.copytree(project.path / "channel", served_dir)
    server = _Server(served_dir)
    yield server, served_dir
    server.close()


def http_config(project: SampleProject, tmp_path: Path, url: str) -> Config:
    config = local_config(project.path, tmp_path)
    return dataclasses.replace(config, channel_mirrors={SAMPLE_CHANNEL: url})


def test_remote_archives_are_downloaded_once(project: SampleProject, tmp_path: Path,
                                             lock: LockData, packages: list[LockedPackage],
                                             served: tuple[_Server, Path]) -> None:
    server, _dir = served
    config = http_config(project, tmp_path, server.url)
    cache = tmp_path / "cache"
    result = verify_artifacts(packages, sources_for(config, lock), cache)
    assert {a.path for a in result} == {cache / "downloads" / p.file_name for p in packages}
    assert all(sha256_file(a.path) == a.package.sha256 for a in result)
    assert len(server.requests) == len(packages)
    verify_artifacts(packages, sources_for(config, lock), cache)
    assert len(server.requests) == len(packages), "verified downloads are reused"
    assert locate_sizes(config, lock, packages)["archive_bytes"] is None
    assert not list((cache / "downloads").glob("*.partial"))


def test_tampered_download_is_deleted(project: SampleProject, tmp_path: Path, lock: LockData,
                                      packages: list[LockedPackage],
                                      served: tuple[_Server, Path]) -> None:
    server, served_dir = served
    pkg = next(p for p in packages if p.name == "transformers")
    remote = served_dir / pkg.subdir / pkg.file_name
    remote.write_bytes(remote.read_bytes() + b"evil")
    config = http_config(project, tmp_path, server.url)
    cache = tmp_path / "cache"
    for _attempt in range(2):
        with pytest.raises(IntegrityError, match="transformers"):
            verify_artifacts(packages, sources_for(config, lock), cache)
        assert not (cache / "downloads" / pkg.file_name).exists()
        assert str(cache / "downloads" / pkg.file_name) not in memo(cache)
    assert server.requests.count(f"/{pkg.subdir}/{pkg.file_name}") == 2


def test_failed_download_leaves_no_partial_file(project: SampleProject, tmp_path: Path,
                                                lock: LockData, packages: list[LockedPackage],
                                                served: tuple[_Server, Path]) -> None:
    server, served_dir = served
    pkg = packages[0]
    (served_dir / pkg.subdir / pkg.file_name).unlink()
    config = http_config(project, tmp_path, server.url)
    cache = tmp_path / "cache"
    with pytest.raises(BuildError, match=f"could not download .*{pkg.file_name}") as err:
        verify_artifacts(packages, sources_for(config, lock), cache)
    assert err.value.hint is not None and "mirror" in err.value.hint
    downloads = cache / "downloads"
    left = list(downloads.iterdir()) if downloads.exists() else []
    assert [p.name for p in left if p.name.startswith(".") or p.name.endswith(".partial")] == []
    # Downloads run 4 at a time: archives that finished before the failure may stay, but
    # only whole, verified ones.
    expected = {p.file_name: p.sha256 for p in packages}
    assert {p.name: sha256_file(p) for p in left} == {p.name: expected[p.name] for p in left}
    assert pkg.file_name not in {p.name for p in left}


def test_ensure_from_an_http_channel(project: SampleProject, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     served: tuple[_Server, Path]) -> None:
    server, _dir = served
    monkeypatch.delenv("PROVISIONER_BACKEND", raising=False)
    config = http_config(project, tmp_path, server.url)
    result = ensure(config, CPU)
    assert result.action == "build"
    cache = config.home / "pkgs"
    assert list((cache / "downloads").iterdir()) == [], "one copy: build.downloads"
    for pkg in read_lockfile(result.plan.lockfile).for_platform(host_platform(), "conda"):
        assert (cache / pkg.file_name.removesuffix(".conda").removesuffix(".tar.bz2")).is_dir()
    assert result.python.is_file()
