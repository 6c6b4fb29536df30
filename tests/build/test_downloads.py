"""One copy on disk: downloaded archives go once the package cache holds them verified.

Builds run against an HTTP copy of the sample channel on 127.0.0.1 that records
every request, so each test can tell what was downloaded again and what was not.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from provisioner import fsops
from provisioner.build.downloads import drop_downloaded_archives
from provisioner.build.ensure import ensure
from provisioner.build.package_cache import cache_lock
from provisioner.build.repair import repair_env
from provisioner.config import Config, load_config
from provisioner.lock.lockfile import LockedPackage
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lockfile
from provisioner.sample.project import SampleProject, create_sample_project
from provisioner.sample.stack import SAMPLE_CHANNEL

CPU = "sample-cpu-transformers"
IS_WINDOWS = sys.platform == "win32"


class Recorder:
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

    def archives(self) -> list[str]:
        return sorted(p.rsplit("/", 1)[-1] for p in self.requests
                      if p.endswith((".conda", ".tar.bz2")))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("one-copy") / "sp")


@pytest.fixture
def server(project: SampleProject, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("PROVISIONER_BACKEND", raising=False)
    shutil.copytree(project.path / "channel", tmp_path / "served")
    srv = Recorder(tmp_path / "served")
    yield srv
    srv.close()


@pytest.fixture
def config(project: SampleProject, tmp_path: Path, server: Recorder) -> Config:
    config = load_config(project.path, home=tmp_path / "home", environ={})
    return dataclasses.replace(config, channel_mirrors={SAMPLE_CHANNEL: server.url})


def locked(project: SampleProject) -> list[LockedPackage]:
    lock = read_lockfile(project.path / "lockfiles" / f"{CPU}.conda-lock.yml")
    return lock.for_platform(host_platform(), "conda")


def stem(pkg: LockedPackage) -> str:
    return pkg.file_name.removesuffix(".conda").removesuffix(".tar.bz2")


def rebuild(config: Config) -> Path:
    fsops.safe_rmtree(config.home / "envs" / CPU, require_marker=False)
    result = ensure(config, CPU)
    assert result.action == "build"
    done = subprocess.run([str(result.python), "-c", "import transformers"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return result.prefix


def test_archives_go_once_the_cache_holds_them(project: SampleProject, config: Config,
                                               server: Recorder) -> None:
    packages = locked(project)
    ensure(config, CPU)
    cache = config.home / "pkgs"
    assert server.archives() == sorted(p.file_name for p in packages)
    assert list((cache / "downloads").iterdir()) == [], "one copy: the extracted entry"
    assert all((cache / stem(p)).is_dir() for p in packages)

    rebuild(config)
    assert server.archives() == sorted(p.file_name for p in packages), "nothing downloaded"


def test_a_removed_or_damaged_entry_is_downloaded_again(project: SampleProject, config: Config,
                                                        server: Recorder) -> None:
    packages = locked(project)
    ensure(config, CPU)
    cache = config.home / "pkgs"
    gone = next(p for p in packages if p.name == "numpy")
    shutil.rmtree(cache / stem(gone))  # what gc --cache does to an unused entry
    damaged = next(p for p in packages if p.name == "transformers")
    victim = next(f for f in (cache / stem(damaged)).rglob("*.py") if f.stat().st_size > 0)
    victim.write_bytes(b"")  # a truncated cache file: its size no longer matches paths.json

    rebuild(config)
    assert server.archives() == sorted(
        [p.file_name for p in packages] + [gone.file_name, damaged.file_name])
    assert list((cache / "downloads").iterdir()) == []


def test_repair_downloads_the_archive_again(project: SampleProject, config: Config,
                                            server: Recorder, host_python_xy: str) -> None:
    prefix = ensure(config, CPU).prefix
    # The sample's Windows python has no sitecustomize.py; its python._pth is a cache link too.
    shared = (prefix / "python._pth" if IS_WINDOWS
              else prefix / f"lib/python{host_python_xy}/site-packages/sitecustomize.py")
    good = shared.read_bytes()
    with shared.open("r+b") as fh:  # a hardlink into the cache: the entry is damaged too
        fh.truncate(10)
    before = server.archives()
    after = repair_env(config, CPU)
    assert after.ok, after.problems
    assert shared.read_bytes() == good
    python = next(p for p in locked(project) if p.name == "python")
    assert server.archives() == sorted([*before, python.file_name])


def test_local_mirror_archives_are_never_removed(project: SampleProject, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROVISIONER_BACKEND", raising=False)
    channel = tmp_path / "channel"
    shutil.copytree(project.path / "channel", channel)
    config = dataclasses.replace(load_config(project.path, home=tmp_path / "home", environ={}),
                                 channel_mirrors={SAMPLE_CHANNEL: str(channel)})
    before = sorted(p.relative_to(channel) for p in channel.rglob("*") if p.is_file())
    assert ensure(config, CPU).action == "build"
    assert sorted(p.relative_to(channel) for p in channel.rglob("*") if p.is_file()) == before


def test_archives_stay_while_another_build_holds_the_cache(project: SampleProject,
                                                           config: Config,
                                                           server: Recorder) -> None:
    from provisioner.build.artifacts import verify_artifacts
    from provisioner.lock.channels import resolve_channels

    ensure(config, CPU)
    cache = config.home / "pkgs"
    lock = read_lockfile(project.path / "lockfiles" / f"{CPU}.conda-lock.yml")
    packages = locked(project)
    arts = verify_artifacts(packages, resolve_channels(lock.channels, config), cache)
    assert sorted(p.name for p in (cache / "downloads").iterdir()) == sorted(
        p.file_name for p in packages)
    with cache_lock(cache, exclusive=False):
        assert drop_downloaded_archives(arts, cache, config.package_limits) == 0
    size = sum(p.stat().st_size for p in (cache / "downloads").iterdir())
    assert len(list((cache / "downloads").iterdir())) == len(packages)
    assert drop_downloaded_archives(arts, cache, config.package_limits) == size
    assert list((cache / "downloads").iterdir()) == []
