"""Remote archives over a real HTTP channel on 127.0.0.1 that misbehaves on purpose.

The server runs in a thread of the test, serves a copy of the sample channel and
injects one fault per request from a queue per path: 500, 404, a reset mid-body, a
body cut short, a stall longer than the client's timeout, wrong bytes. It answers
``Range`` requests with ``206`` (SimpleHTTPRequestHandler does not).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from provisioner.build.artifacts import sha256_file, verify_artifacts
from provisioner.build.ensure import ensure
from provisioner.config import Config, load_config
from provisioner.errors import EXIT_USER_ERROR, FetchError, IntegrityError, SpecError
from provisioner.lock.channels import ChannelSource, resolve_channels
from provisioner.lock.lockfile import LockData, LockedPackage
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lockfile
from provisioner.sample.project import SampleProject, create_sample_project
from provisioner.sample.stack import SAMPLE_CHANNEL

CPU = "sample-cpu-transformers"
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class FaultServer:
    """An HTTP channel server with a queue of faults per request path."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path as sent, Range header)
        self.release = threading.Event()
        self.barrier: threading.Barrier | None = None
        self.on_stall: Any = None
        self.client_hung_up: bool | None = None
        self.stall_done = threading.Event()
        self.stalled = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.handle(self)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the faults break connections on purpose

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def count(self, pkg: LockedPackage) -> int:
        return sum(1 for path, _ in self.requests
                   if urlsplit(path).path == f"/{pkg.subdir}/{pkg.file_name}")

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = urlsplit(h.path).path
        self.requests.append((h.path, h.headers.get("Range")))
        if self.barrier is not None:
            self.barrier.wait(10)  # passes only when enough requests are in flight together
        queue = self.faults.get(path, [])
        fault = queue.pop(0) if queue else ""
        if fault == "404-after-stall":
            self.stalled.wait(10)
            fault = "404"
        if fault in ("500", "404"):
            h.send_error(int(fault))
            return
        if fault == "slow":
            self.release.wait(10)
            return
        file = self.directory / path.lstrip("/")
        if not file.is_file():
            h.send_error(404)
            return
        body = file.read_bytes()
        if fault == "wrong":
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        start = 0
        wanted = h.headers.get("Range", "")
        if wanted.startswith("bytes=") and wanted.endswith("-"):
            start = int(wanted[6:-1])
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(body) - start))
        h.end_headers()
        half = start + (len(body) - start) // 2
        if fault in ("reset", "short", "stall"):
            h.wfile.write(body[start:half])
            h.wfile.flush()
            if fault == "stall":
                self.stalled.set()
                if self.on_stall is not None:
                    self.on_stall()
                h.connection.settimeout(60)
                try:
                    self.client_hung_up = h.connection.recv(1) == b""
                except TimeoutError:
                    self.client_hung_up = False
                except OSError:  # a reset: hung up too
                    self.client_hung_up = True
                self.stall_done.set()
            elif fault == "reset":  # SO_LINGER 0: close() sends RST
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        h.wfile.write(body[start:])

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("fetch") / "sp")


@pytest.fixture(scope="module")
def packages(project: SampleProject) -> list[LockedPackage]:
    return read_lockfile(project.path / "lockfiles" / f"{CPU}.conda-lock.yml").for_platform(
        host_platform(), "conda")


@pytest.fixture(scope="module")
def lock(project: SampleProject) -> LockData:
    return read_lockfile(project.path / "lockfiles" / f"{CPU}.conda-lock.yml")


@pytest.fixture
def server(project: SampleProject, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultServer]:
    for var in _PROXY_VARS:  # 127.0.0.1 must not go through a proxy of the machine
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    served = tmp_path / "served"
    shutil.copytree(project.path / "channel", served)
    srv = FaultServer(served)
    yield srv
    srv.close()


def http_config(project: SampleProject, tmp_path: Path, url: str,
                environ: dict[str, str] | None = None) -> Config:
    config = load_config(project.path, home=tmp_path / "home", environ=environ or {})
    return dataclasses.replace(config, channel_mirrors={SAMPLE_CHANNEL: url})


def sources(config: Config, lock: LockData) -> list[ChannelSource]:
    return resolve_channels(lock.channels, config)


def no_partials(cache: Path) -> None:
    downloads = cache / "downloads"
    left = [p.name for p in downloads.iterdir()] if downloads.exists() else []
    assert [n for n in left if n.startswith(".") or n.endswith(".partial")] == []


def fetched(cache: Path) -> set[str]:
    downloads = cache / "downloads"
    return {p.name for p in downloads.iterdir()} if downloads.exists() else set()


def test_two_500s_then_success(project: SampleProject, tmp_path: Path, lock: LockData,
                               packages: list[LockedPackage], server: FaultServer) -> None:
    pkg = packages[0]
    server.faults[f"/{pkg.subdir}/{pkg.file_name}"] = ["500", "500"]
    cache = tmp_path / "cache"
    result = verify_artifacts(packages, sources(http_config(project, tmp_path, server.url),
                                                lock), cache)
    assert server.count(pkg) == 3
    assert all(sha256_file(a.path) == a.package.sha256 for a in result)
    assert fetched(cache) == {p.file_name for p in packages}
    no_partials(cache)


def test_reset_mid_body_is_retried(project: SampleProject, tmp_path: Path, lock: LockData,
                                   packages: list[LockedPackage], server: FaultServer) -> None:
    pkg = packages[1]
    server.faults[f"/{pkg.subdir}/{pkg.file_name}"] = ["reset"]
    cache = tmp_path / "cache"
    verify_artifacts(packages, sources(http_config(project, tmp_path, server.url), lock), cache)
    assert server.count(pkg) == 2
    assert sha256_file(cache / "downloads" / pkg.file_name) == pkg.sha256
    no_partials(cache)


def test_short_body_is_resumed_with_a_range_request(project: SampleProject, tmp_path: Path,
                                                    lock: LockData,
                                                    packages: list[LockedPackage],
                                                    server: FaultServer) -> None:
    pkg = packages[0]
    path = f"/{pkg.subdir}/{pkg.file_name}"
    server.faults[path] = ["short"]
    cache = tmp_path / "cache"
    verify_artifacts(packages, sources(http_config(project, tmp_path, server.url), lock), cache)
    size = (server.directory / path.lstrip("/")).stat().st_size
    assert [r for p, r in server.requests if p == path] == [None, f"bytes={size // 2}-"]
    assert sha256_file(cache / "downloads" / pkg.file_name) == pkg.sha256
    no_partials(cache)


def test_server_slower_than_the_timeout(project: SampleProject, tmp_path: Path,
                                        packages: list[LockedPackage],
                                        server: FaultServer) -> None:
    """Configured by PROVISIONER_FETCH_TIMEOUT; every try times out, ensure exits 2."""
    pkg = next(p for p in packages if p.name == "pytorch")
    server.faults[f"/{pkg.subdir}/{pkg.file_name}"] = ["slow"] * 10
    config = http_config(project, tmp_path, server.url, {"PROVISIONER_FETCH_TIMEOUT": "0.3"})
    assert config.fetch_timeout == 0.3
    with pytest.raises(FetchError) as err:
        ensure(config, CPU)
    message = str(err.value)
    assert "\n" not in message and err.value.exit_code == EXIT_USER_ERROR
    assert f"pytorch {pkg.version}" in message and f"{server.url}/{pkg.subdir}/" in message
    assert "no answer within 0.3 s" in message and "4 tries" in message
    assert err.value.hint and "proxy" in err.value.hint
    assert server.count(pkg) == 4
    assert pkg.file_name not in fetched(config.home / "pkgs")
    no_partials(config.home / "pkgs")


def test_one_slow_answer_is_retried(project: SampleProject, tmp_path: Path, lock: LockData,
                                    packages: list[LockedPackage], server: FaultServer) -> None:
    pkg = packages[0]
    server.faults[f"/{pkg.subdir}/{pkg.file_name}"] = ["slow"]
    cache = tmp_path / "cache"
    verify_artifacts(packages, sources(http_config(project, tmp_path, server.url), lock), cache,
                     fetch_timeout=0.3)
    assert server.count(pkg) == 2
    assert sha256_file(cache / "downloads" / pkg.file_name) == pkg.sha256
    no_partials(cache)


def test_first_failure_stops_the_others(project: SampleProject, tmp_path: Path, lock: LockData,
                                        packages: list[LockedPackage],
                                        server: FaultServer) -> None:
    """A 404 while another download stalls: the 404 is reported, the stalled one is hung up."""
    stalled, missing = packages[0], packages[1]
    server.faults[f"/{stalled.subdir}/{stalled.file_name}"] = ["stall"]
    server.faults[f"/{missing.subdir}/{missing.file_name}"] = ["404-after-stall"]
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=f"{missing.file_name}.*HTTP 404"):
        verify_artifacts(packages, sources(http_config(project, tmp_path, server.url), lock),
                         cache)
    assert server.stall_done.wait(60)
    assert server.client_hung_up
    assert stalled.file_name not in fetched(cache) and missing.file_name not in fetched(cache)
    no_partials(cache)


def test_wrong_bytes_are_never_promoted(project: SampleProject, tmp_path: Path,
                                        packages: list[LockedPackage],
                                        server: FaultServer) -> None:
    pkg = next(p for p in packages if p.name == "transformers")
    server.faults[f"/{pkg.subdir}/{pkg.file_name}"] = ["wrong"]
    config = http_config(project, tmp_path, server.url)
    with pytest.raises(IntegrityError) as err:
        ensure(config, CPU)
    assert f"sha256 mismatch for transformers {pkg.version}" in str(err.value)
    assert server.count(pkg) == 1, "whole but wrong bytes are not fetched again"
    assert pkg.file_name not in fetched(config.home / "pkgs")
    no_partials(config.home / "pkgs")
    env_dir = config.home / "envs" / CPU
    assert not env_dir.exists() or not (env_dir / "current").exists()

    result = ensure(config, CPU)  # the server is honest again
    assert result.action == "build" and result.python.is_file()


def test_404_is_one_line_naming_package_and_url(project: SampleProject, tmp_path: Path,
                                                lock: LockData, packages: list[LockedPackage],
                                                server: FaultServer) -> None:
    pkg = packages[-1]
    server.faults[f"/{pkg.subdir}/{pkg.file_name}"] = ["404"]
    cache = tmp_path / "cache"
    with pytest.raises(FetchError) as err:
        verify_artifacts(packages, sources(http_config(project, tmp_path, server.url), lock),
                         cache)
    url = f"{server.url}/{pkg.subdir}/{pkg.file_name}"
    assert str(err.value) == (f"could not download {pkg.name} {pkg.version} ({pkg.file_name}) "
                              f"from {url}: HTTP 404 Not Found")
    assert err.value.exit_code == EXIT_USER_ERROR
    assert server.count(pkg) == 1, "a 404 is not retried"
    assert pkg.file_name not in fetched(cache)
    no_partials(cache)


def test_404_through_the_cli_with_the_mirror_in_provisioner_toml(
        project: SampleProject, tmp_path: Path, packages: list[LockedPackage],
        server: FaultServer) -> None:
    """The http channel is the mirror of the lock's channel in ``[channels]``: exit 2, one line."""
    copy = tmp_path / "project"
    shutil.copytree(project.path, copy, ignore=shutil.ignore_patterns(".provisioner-home"))
    (copy / "provisioner.toml").write_text(f'[channels]\n{SAMPLE_CHANNEL} = "{server.url}"\n')
    pkg = next(p for p in packages if p.name == "numpy")
    (server.directory / pkg.subdir / pkg.file_name).unlink()
    env = {**os.environ, "PROVISIONER_HOME": str(tmp_path / "home")}
    env.pop("PROVISIONER_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "provisioner", "ensure", CPU], cwd=copy,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == EXIT_USER_ERROR, done.stderr
    url = f"{server.url}/{pkg.subdir}/{pkg.file_name}"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert f"numpy {pkg.version}" in errors[0] and url in errors[0] and "404" in errors[0]
    assert server.count(pkg) == 1
    no_partials(tmp_path / "home" / "pkgs")


def test_downloads_run_concurrently(project: SampleProject, tmp_path: Path, lock: LockData,
                                    packages: list[LockedPackage], server: FaultServer) -> None:
    """Four requests must be in flight at once, or the server's barrier breaks."""
    assert len(packages) >= 4
    server.barrier = threading.Barrier(4)
    cache = tmp_path / "cache"
    several = packages[:4]
    verify_artifacts(several, sources(http_config(project, tmp_path, server.url), lock), cache)
    assert len(server.requests) == 4 and not server.barrier.broken
    assert fetched(cache) == {p.file_name for p in several}


def test_proxy_variables_are_honoured(project: SampleProject, tmp_path: Path, lock: LockData,
                                      packages: list[LockedPackage], server: FaultServer,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The channel's host does not exist; only the proxy (our server) can answer."""
    monkeypatch.setenv("http_proxy", server.url)
    cache = tmp_path / "cache"
    channel = "http://sample-channel.invalid"
    verify_artifacts(packages, sources(http_config(project, tmp_path, channel), lock), cache)
    assert {p for p, _ in server.requests} == {
        f"{channel}/{p.subdir}/{p.file_name}" for p in packages}


@pytest.mark.skipif(sys.platform == "win32", reason="pthread_kill is POSIX only")
def test_interrupt_mid_download_leaves_no_partial_file(project: SampleProject, tmp_path: Path,
                                                       lock: LockData,
                                                       packages: list[LockedPackage],
                                                       server: FaultServer) -> None:
    pkg = packages[0]
    server.faults[f"/{pkg.subdir}/{pkg.file_name}"] = ["stall"]
    main = threading.main_thread().ident
    assert main is not None
    server.on_stall = lambda: signal.pthread_kill(main, signal.SIGINT)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):  # the default timeout: the stop must not wait it out
        verify_artifacts(packages, sources(http_config(project, tmp_path, server.url), lock),
                         cache)
    assert server.stall_done.wait(60)
    assert server.client_hung_up, "the stalled download's socket was shut down on Ctrl-C"
    no_partials(cache)
    assert pkg.file_name not in fetched(cache)


def test_fetch_timeout_setting(project: SampleProject, tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "provisioner.toml").write_text("[build]\nfetch-timeout = 7\n")
    assert load_config(tmp_path / "p", environ={}).fetch_timeout == 7.0
    assert load_config(tmp_path / "p", environ={"PROVISIONER_FETCH_TIMEOUT": "2.5"}
                       ).fetch_timeout == 2.5
    assert load_config(project.path, environ={}).fetch_timeout == 120.0
    with pytest.raises(SpecError, match="fetch timeout"):
        load_config(tmp_path / "p", environ={"PROVISIONER_FETCH_TIMEOUT": "soon"})


def test_download_progress_counts_each_byte_once(project: SampleProject, tmp_path: Path,
                                                 lock: LockData, packages: list[LockedPackage],
                                                 server: FaultServer) -> None:
    # A reset (retried from where it broke, or from scratch) and a short body (resumed with a
    # Range request) still add up to each archive's size, received and expected.
    from provisioner.progress import BYTES, PhaseEvent, Progress

    server.faults[f"/{packages[0].subdir}/{packages[0].file_name}"] = ["short"]
    server.faults[f"/{packages[1].subdir}/{packages[1].file_name}"] = ["reset"]
    events: list[PhaseEvent] = []
    cache = tmp_path / "cache"
    with Progress(events.append, CPU).running("download", unit=BYTES) as download:
        verify_artifacts(packages, sources(http_config(project, tmp_path, server.url), lock),
                         cache, download=download)
    size = sum((cache / "downloads" / p.file_name).stat().st_size for p in packages)
    end = events[-1]
    assert (end.kind, end.ok, end.done, end.total) == ("end", True, size, size)
    assert end.note == f"{len(packages)} of {len(packages)} archives fetched"
    assert all(e.done >= 0 for e in events)
