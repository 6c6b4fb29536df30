"""``transport.download`` and the channels that need rattler: a bearer-token HTTP channel
and an ``s3://`` mirror on a local S3 server (moto), both started here on 127.0.0.1.

The token server refuses any request without the right ``Authorization`` header;
the S3 server is moto's threaded server. Builds go through ``ensure`` (in process)
or the CLI (a child process), with credentials only from the places rattler reads:
``RATTLER_AUTH_FILE`` and the AWS environment variables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from servers import S3_KEY, S3_SECRET, s3_server

from provisioner.build import transport
from provisioner.build.ensure import ensure
from provisioner.config import S3Options, load_config
from provisioner.errors import EXIT_USER_ERROR, SpecError
from provisioner.lock.channels import path_to_file_url
from provisioner.sample.project import SampleProject, create_sample_project
from provisioner.sample.stack import SAMPLE_CHANNEL

CPU = "sample-cpu-transformers"
TOKEN = "s3cr3t-token"
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
_AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION")


class ChannelServer:
    """Serves a directory; with ``token`` set, only to ``Authorization: Bearer <token>``.

    ``faults`` maps a path to answers to give first ("500", "short"); ``proxy``
    makes it forward absolute-URI requests instead (a CONNECT-less HTTP proxy).
    """

    def __init__(self, directory: Path | None, token: str | None = None,
                 proxy: bool = False) -> None:
        self.directory = directory
        self.token = token
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path as sent, Authorization)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Authorization")))
                body = outer.forward(self.path) if proxy else outer.answer(self)
                if body is None:
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.faults.get(self.path, [""])[:1] == ["short"]:
                    outer.faults[self.path].pop(0)
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def answer(self, h: BaseHTTPRequestHandler) -> bytes | None:
        if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            h.send_error(401)
            return None
        queue = self.faults.get(h.path, [])
        if queue and queue[0] == "500":
            queue.pop(0)
            h.send_error(500)
            return None
        assert self.directory is not None
        file = self.directory / urlsplit(h.path).path.lstrip("/")
        if not file.is_file():
            h.send_error(404)
            return None
        return file.read_bytes()

    @staticmethod
    def forward(url: str) -> bytes:
        target = url.replace("http://channel.invalid", os.environ["TEST_ORIGIN"])
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(target) as resp:
            data: bytes = resp.read()
            return data

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(autouse=True)
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy, no credentials of the machine: a tmp HOME, an empty auth file, no AWS."""
    for var in _PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "userhome").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "userhome"))
    monkeypatch.setenv("RATTLER_AUTH_FILE", str(tmp_path / "no-credentials.json"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("transport") / "sp")


@pytest.fixture
def files(tmp_path: Path) -> Iterator[ChannelServer]:
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "a.bin").write_bytes(os.urandom(300_000))
    srv = ChannelServer(tmp_path / "srv")
    yield srv
    srv.close()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


# -- transport.download ------------------------------------------------------------------


def test_file_url_is_copied_whole(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 5000)
    dest = tmp_path / "out" / "dest.bin"
    transport.download(path_to_file_url(src), dest, timeout=5)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(transport.TransportError, match="no such file"):
        transport.download(path_to_file_url(tmp_path / "gone"), tmp_path / "out" / "g",
                           timeout=5)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest.bin"]


def test_500_and_short_body_are_retried(files: ChannelServer, tmp_path: Path) -> None:
    files.faults["/a.bin"] = ["500", "short"]
    dest = tmp_path / "out" / "a.bin"
    counted: list[int] = []
    transport.download(f"{files.url}/a.bin", dest, timeout=10, on_bytes=counted.append)
    assert sum(counted) == dest.stat().st_size == 300_000
    assert any(n < 0 for n in counted), "the short try was taken back"
    assert dest.read_bytes() == (files.directory or tmp_path).joinpath("a.bin").read_bytes()
    assert [p for p, _ in files.requests] == ["/a.bin"] * 3
    assert leftovers(dest.parent) == []


def test_404_is_final_and_leaves_nothing(files: ChannelServer, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "missing.bin"
    with pytest.raises(transport.TransportError) as err:
        transport.download(f"{files.url}/missing.bin", dest, timeout=10)
    assert err.value.status == 404 and not err.value.needs_credentials
    assert str(err.value) == f"could not download {files.url}/missing.bin: HTTP 404 Not Found"
    assert len(files.requests) == 1
    assert not dest.exists() and leftovers(dest.parent) == []


def test_errors_redact_credentials_in_urls() -> None:
    text = ("HTTP status client error (403 Forbidden) for url (http://127.0.0.1:9/chan/x.conda"
            "?X-Amz-Credential=k%2F1&X-Amz-Signature=abc)\n more")
    assert transport.redact(text) == ("HTTP status client error (403 Forbidden) for url "
                                      "(http://127.0.0.1:9/chan/x.conda) more")
    assert transport.redact("https://user:pw@host/c/x") == "https://***@host/c/x"


def test_unknown_scheme_is_refused(tmp_path: Path) -> None:
    with pytest.raises(transport.TransportError, match="unsupported URL scheme 'ftp'"):
        transport.download("ftp://example.invalid/x", tmp_path / "x", timeout=1)


def test_cancel_stops_and_removes_the_partial_file(files: ChannelServer, tmp_path: Path) -> None:
    files.faults["/a.bin"] = ["500"] * 10
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(transport.DownloadCancelled):
        transport.download(f"{files.url}/a.bin", tmp_path / "a.bin", timeout=10, cancel=cancel)
    assert len(files.requests) == 1, "no retry after the cancel"
    assert list(tmp_path.glob("*a.bin*")) == []


def test_http_proxy_variable_is_honoured(files: ChannelServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The host does not exist; only the proxy (which forwards to ``files``) can answer."""
    proxy = ChannelServer(None, proxy=True)
    try:
        monkeypatch.setenv("TEST_ORIGIN", files.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        dest = tmp_path / "a.bin"
        transport.download("http://channel.invalid/a.bin", dest, timeout=10)
    finally:
        proxy.close()
    assert [p for p, _ in proxy.requests] == ["http://channel.invalid/a.bin"]
    assert dest.read_bytes() == (tmp_path / "srv" / "a.bin").read_bytes()


def test_stored_credentials_lookup(tmp_path: Path) -> None:
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"repo.example.com": {"BearerToken": "t"},
                                "*.corp.example": {"BearerToken": "t"},
                                "s3://bucket/chan": {"S3Credentials": {}}}))
    env = {"RATTLER_AUTH_FILE": str(auth)}
    assert transport.has_stored_credentials("https://repo.example.com:8443/c/x", env)
    assert transport.has_stored_credentials("https://a.corp.example/c/x", env)
    assert transport.has_stored_credentials("s3://bucket/chan/noarch/x.conda", env)
    assert not transport.has_stored_credentials("https://example.com/c/x", env)
    assert not transport.has_stored_credentials("https://corp.example.evil/x", env)
    assert not transport.has_stored_credentials("https://x", {"RATTLER_AUTH_FILE": "/nope"})


def test_s3_options_become_rattler_settings(tmp_path: Path) -> None:
    (tmp_path / "provisioner.toml").write_text(
        '[s3-options.my-bucket]\nendpoint-url = "http://127.0.0.1:9000"\n'
        'region = "eu-central-1"\nforce-path-style = true\n')
    config = load_config(tmp_path, environ={})
    assert config.s3_options == {"my-bucket": S3Options("http://127.0.0.1:9000",
                                                        "eu-central-1", True)}
    import rattler

    settings = rattler.Config.from_toml(transport.rattler_config_toml(config.s3_options))
    assert settings.s3_options["my-bucket"]["addressing-style"] == "path"
    assert settings.s3_options["my-bucket"]["region"] == "eu-central-1"
    (tmp_path / "provisioner.toml").write_text('[s3-options.b]\nregion = "x"\n')
    with pytest.raises(SpecError, match=r"\[s3-options.b\] needs endpoint-url"):
        load_config(tmp_path, environ={})


# -- a channel that demands a bearer token -------------------------------------------------


@pytest.fixture
def token_server(project: SampleProject, tmp_path: Path) -> Iterator[ChannelServer]:
    served = tmp_path / "served"
    shutil.copytree(project.path / "channel", served)
    srv = ChannelServer(served, token=TOKEN)
    yield srv
    srv.close()


def project_with_mirror(project: SampleProject, tmp_path: Path, toml: str) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(project.path, copy, ignore=shutil.ignore_patterns(".provisioner-home"))
    (copy / "provisioner.toml").write_text(toml)
    return copy


def cli_ensure(copy: Path, tmp_path: Path) -> tuple[int, list[str], str]:
    env = {**os.environ, "PROVISIONER_HOME": str(tmp_path / "home")}
    env.pop("PROVISIONER_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "provisioner", "ensure", CPU], cwd=copy,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, errors, done.stderr


def test_token_from_rattler_auth_file_builds(project: SampleProject, tmp_path: Path,
                                             token_server: ChannelServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    auth = tmp_path / "credentials.json"
    auth.write_text(json.dumps({"127.0.0.1": {"BearerToken": TOKEN}}))
    monkeypatch.setenv("RATTLER_AUTH_FILE", str(auth))
    copy = project_with_mirror(project, tmp_path, f'[channels]\n{SAMPLE_CHANNEL} = '
                                                  f'"{token_server.url}"\n')
    result = ensure(load_config(copy, home=tmp_path / "home", environ={}), CPU)
    assert result.action == "build" and result.python.is_file()
    archives = [r for r in token_server.requests if r[0].endswith((".conda", ".tar.bz2"))]
    assert archives and all(a == f"Bearer {TOKEN}" for _, a in archives)


@pytest.mark.parametrize("stored", ["wrong-token", None])
def test_wrong_or_no_token_is_one_line_naming_the_channel(
        project: SampleProject, tmp_path: Path, token_server: ChannelServer,
        monkeypatch: pytest.MonkeyPatch, stored: str | None) -> None:
    if stored is not None:
        auth = tmp_path / "credentials.json"
        auth.write_text(json.dumps({"127.0.0.1": {"BearerToken": stored}}))
        monkeypatch.setenv("RATTLER_AUTH_FILE", str(auth))
    copy = project_with_mirror(project, tmp_path, f'[channels]\n{SAMPLE_CHANNEL} = '
                                                  f'"{token_server.url}"\n')
    code, errors, stderr = cli_ensure(copy, tmp_path)
    assert code == EXIT_USER_ERROR, stderr
    assert len(errors) == 1, stderr
    assert f"channel '{SAMPLE_CHANNEL}' refused access" in errors[0]
    assert "HTTP 401" in errors[0] and token_server.url in errors[0]
    assert "RATTLER_AUTH_FILE" in stderr  # the hint
    assert TOKEN not in stderr and "wrong-token" not in stderr
    sent = {a for _, a in token_server.requests}
    assert sent == ({f"Bearer {stored}"} if stored else {None}), "stored token used, or none"
    assert not (tmp_path / "home" / "envs" / CPU / "current").exists()


# -- an s3:// mirror on a local S3 server ----------------------------------------------------


@pytest.fixture(scope="module")
def s3(project: SampleProject) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 whose bucket ``chan`` holds the channel under ``sample/``."""
    channel = project.path / "channel"
    files = {f"sample/{f.relative_to(channel).as_posix()}": f
             for f in channel.rglob("*") if f.is_file()}
    with s3_server({"chan": files}) as endpoint:
        yield endpoint


def s3_toml(endpoint: str) -> str:
    return (f'[channels]\n{SAMPLE_CHANNEL} = "s3://chan/sample"\n\n'
            f'[s3-options.chan]\nendpoint-url = "{endpoint}"\nregion = "us-east-1"\n'
            "force-path-style = true\n")


def test_s3_mirror_builds_with_aws_credentials(project: SampleProject, tmp_path: Path, s3: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    copy = project_with_mirror(project, tmp_path, s3_toml(s3))
    config = load_config(copy, home=tmp_path / "home", environ={})
    result = ensure(config, CPU)
    assert result.action == "build" and result.python.is_file()
    done = subprocess.run([str(result.python), "-c", "import transformers"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_s3_mirror_without_credentials_is_one_line_naming_the_channel(
        project: SampleProject, tmp_path: Path, s3: str) -> None:
    copy = project_with_mirror(project, tmp_path, s3_toml(s3))
    code, errors, stderr = cli_ensure(copy, tmp_path)
    assert code == EXIT_USER_ERROR, stderr
    assert len(errors) == 1, stderr
    assert f"channel '{SAMPLE_CHANNEL}' refused access" in errors[0]
    assert "s3://chan/sample/" in errors[0] and "S3 credentials" in errors[0]
    assert "X-Amz" not in stderr, "no presigned query in the message"
    assert "AWS_ACCESS_KEY_ID" in stderr  # the hint
    assert not (tmp_path / "home" / "envs" / CPU / "current").exists()


def test_a_process_that_used_s3_exits_with_its_own_code(s3: str, tmp_path: Path) -> None:
    """py-rattler 0.28 crashes at interpreter exit after S3 use (half the runs, checked):
    ``s3://`` downloads run in a child, so the caller's exit code survives."""
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from provisioner.build import transport\nfrom provisioner.config import S3Options\n"
        f"opts = {{'chan': S3Options({s3!r}, 'us-east-1', True)}}\n"
        "try:\n"
        "    transport.download('s3://chan/sample/noarch/repodata.json', Path(sys.argv[1]),\n"
        "                       timeout=30, s3_options=opts)\n"
        "except transport.TransportError as exc:\n"
        "    print(exc)\n"
        "sys.exit(7)\n")
    codes = [subprocess.run([sys.executable, "-c", script, str(tmp_path / f"r{i}.json")],
                            capture_output=True, text=True, timeout=120, check=False)
             for i in range(4)]
    assert [c.returncode for c in codes] == [7] * 4, [c.stderr[-300:] for c in codes]
    assert all("no usable S3 credentials" in c.stdout for c in codes)
    assert not list(tmp_path.glob("r*")), "no download and no partial file"
