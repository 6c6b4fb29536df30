"""One file from a URL onto disk, through rattler's networking: ``file://``, ``http(s)://``, ``s3://``.

:func:`download` is the entry point wherever provisioner needs more than plain
HTTP: ``s3://`` mirrors (rattler's S3 support, which takes credentials from the
standard AWS sources or an ``S3Credentials`` entry of rattler's auth file, and the
endpoint from ``[s3-options]``), hosts that need credentials (rattler's
authentication storage: the file named by ``RATTLER_AUTH_FILE`` or
``~/.rattler/credentials.json``, the keyring, netrc) and packs named by URL.
rattler's client honours ``http_proxy``, ``https_proxy``, ``all_proxy`` and
``no_proxy`` (either case).

What rattler does and does not do here (py-rattler 0.28, read and checked):
``download_to_writer`` streams the body and checks no hash (only
``download_and_extract`` with ``expected_sha`` does). Its client's ``timeout``
bounds the whole request, body included, so it would kill a large download that
is still progressing; and its retry middleware retries only 5xx answers, not a
reset or a body cut short. So provisioner asks rattler for neither: a watchdog
cancels a try when no byte arrived for ``timeout`` seconds, and a failed try (5xx,
408, 429, reset, timeout, short body) starts over from the first byte, ``retries``
times with exponential backoff. Other 4xx answers and missing credentials are not
retried.

``s3://`` downloads run in a child process (``build.transport_child``): with
py-rattler 0.28, a process that used its S3 support crashes while the interpreter
shuts down (SIGSEGV or SIGABRT in about half the runs here, checked), which would
turn every exit code into a crash. The child ends with ``os._exit``, as the
installer child does.

Bytes stream into a ``.<name>.<pid>-<tid>.partial`` sibling of ``dest``, renamed
onto ``dest`` only once complete; a failure, a cancellation or Ctrl-C removes it.
No sha256 is checked here: callers verify ``dest`` before they use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from provisioner import fsops
from provisioner.config import Config, S3Options
from provisioner.errors import FetchError

log = logging.getLogger(__name__)

# The one retry policy for downloads (build.fetch uses it too).
RETRIES = 3
BACKOFF_S = 0.25  # first wait; doubles per retry
SCHEMES = ("file", "http", "https", "s3")
_CHUNK = 1 << 20
_WATCH_S = 0.05
NETWORK_HINT = ("check the network or proxy, or point the channel at a local mirror in "
                "provisioner.toml")
AUTH_HINT = ("store a token for the host in rattler's authentication storage "
             "(RATTLER_AUTH_FILE, ~/.rattler/credentials.json or the keyring)")
S3_HINT = ("give AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an "
           "S3Credentials entry in RATTLER_AUTH_FILE); set the endpoint in [s3-options.<bucket>]")
_STATUS = re.compile(r"HTTP status (?:client|server) error \((\d{3})([^)]*)\)")
_QUERY = re.compile(r"(\w+://[^\s?#)]*)[?#][^\s)]*")
_USERINFO = re.compile(r"(\w+://)[^\s/@]+@")


class TransportError(FetchError):
    """A download that failed for good (exit 2).

    ``why`` is the cause in a few words, ``status`` the HTTP status where a server
    answered, ``needs_credentials`` whether the server (or S3) refused for lack of
    valid credentials.
    """

    def __init__(self, url: str, why: str, *, status: int | None = None,
                 needs_credentials: bool = False, hint: str | None = None) -> None:
        super().__init__(f"could not download {redact(url)}: {why}", hint=hint or NETWORK_HINT)
        self.url = url
        self.why = why
        self.status = status
        self.needs_credentials = needs_credentials


class DownloadCancelled(Exception):
    """The caller's ``cancel`` event was set; the partial file is gone."""


class _Transient(Exception):
    """A failure worth another try."""


def redact(text: str) -> str:
    """``text`` on one line, every URL without its query, fragment and user info.

    Presigned S3 URLs carry their signature in the query; ``user:password@`` is a
    credential too.
    """
    return _USERINFO.sub(r"\1***@", _QUERY.sub(r"\1", " ".join(text.split())))


def auth_file(environ: Mapping[str, str] | None = None) -> Path:
    """rattler's credentials file: ``RATTLER_AUTH_FILE``, else ``~/.rattler/credentials.json``."""
    env = os.environ if environ is None else environ
    named = env.get("RATTLER_AUTH_FILE")
    return Path(named) if named else Path.home() / ".rattler" / "credentials.json"


def has_stored_credentials(url: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether rattler's credentials file holds an entry for ``url``'s host.

    Keys are host names (``repo.example.com``, ``*.example.com``) or, for S3,
    ``s3://bucket[/prefix]``. The keyring and netrc are not read here; a 401 or
    403 from a plain request is what sends those hosts through rattler.
    """
    try:
        data = json.loads(auth_file(environ).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    for key in map(str.lower, data):
        if key in (host, parts.netloc.lower()) or (key.startswith("s3://") and
                                                   url.lower().startswith(key)):
            return True
        if key.startswith("*.") and host.endswith(key[1:]):
            return True
    return False


def rattler_config_toml(s3_options: Mapping[str, S3Options]) -> str:
    """rattler's own configuration (TOML) for ``[s3-options]`` of provisioner.toml."""
    lines = []
    for bucket, opts in sorted(s3_options.items()):
        style = "path" if opts.force_path_style else "virtual-host"
        # JSON strings are valid TOML basic strings (same escapes).
        lines += [f"[s3-options.{json.dumps(bucket)}]",
                  f"endpoint-url = {json.dumps(opts.endpoint_url)}",
                  f"region = {json.dumps(opts.region)}",
                  f'addressing-style = "{style}"']
    return "\n".join(lines) + "\n"


def make_client(config: Config | None = None,
                s3_options: Mapping[str, S3Options] | None = None) -> Any:
    """A ``rattler.networking.Client`` for :func:`download`.

    It carries rattler's authentication middleware, S3 (``s3_options``, else
    ``config.s3_options``) and the rest of its standard stack, with no retries and
    no timeout of its own (:func:`download` does both, see the module docstring).
    """
    import rattler
    from rattler.networking import Client

    options = s3_options if s3_options is not None else (config.s3_options if config else {})
    settings = rattler.Config.from_toml(rattler_config_toml(options))
    return Client.from_config(settings, max_retries=0)


def download(url: str, dest: Path, *, timeout: float, client: Any = None,
             cancel: threading.Event | None = None, retries: int = RETRIES,
             on_bytes: Callable[[int], None] | None = None,
             s3_options: Mapping[str, S3Options] | None = None) -> None:
    """Download ``url`` to ``dest`` atomically (no hash check: callers check).

    ``timeout`` is the longest wait for the next bytes, in seconds; ``client``
    defaults to :func:`make_client` (no ``[s3-options]``); setting ``cancel``
    stops the download soon after and raises :class:`DownloadCancelled`;
    ``on_bytes(n)`` is called with the size of each chunk written, and with minus
    the bytes written so far when a try starts over. ``s3://`` URLs are fetched
    in a child process configured by ``s3_options`` (``[s3-options]``), not by
    ``client``. Raises
    :class:`TransportError` when the file cannot be had (after ``retries`` further
    tries for transient failures).
    """
    count = on_bytes or (lambda n: None)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise TransportError(url, f"unsupported URL scheme {scheme!r} (use one of "
                                  f"{', '.join(SCHEMES)})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        if scheme == "file":
            _copy(url, partial, cancel, count)
        elif scheme == "s3":
            _in_child(url, partial, timeout, cancel, retries, count, s3_options or {})
        else:
            _with_retries(url, partial, timeout, client or make_client(), cancel, retries,
                          count)
        fsops.rename_with_retry(partial, dest, rename=os.replace,
                                denied_budget=fsops.RENAME_RETRY_BUDGET_S)  # being scanned
    finally:
        fsops.remove_file(partial)


def _in_child(url: str, partial: Path, timeout: float, cancel: threading.Event | None,
              retries: int, count: Callable[[int], None],
              s3_options: Mapping[str, S3Options]) -> None:
    import sys

    from provisioner import processes

    request = {"url": url, "dest": str(partial), "timeout": timeout, "retries": retries,
               "s3": {bucket: [o.endpoint_url, o.region, o.force_path_style]
                      for bucket, o in s3_options.items()}}
    outcome: dict[str, Any] = {}

    def on_line(line: str) -> None:  # the child says "tick" every 50 ms: cancel is seen
        if cancel is not None and cancel.is_set():
            raise DownloadCancelled
        word, _sep, rest = line.partition(" ")
        if word == "bytes":
            count(int(rest))
        elif word == "result":
            outcome.update(json.loads(rest))

    argv = [sys.executable, "-m", "provisioner.build.transport_child"]
    done = processes.run_streaming(argv, on_line=on_line, input_text=json.dumps(request))
    if outcome.get("ok"):
        return
    if "why" in outcome:
        raise TransportError(url, str(outcome["why"]), status=outcome.get("status"),
                             needs_credentials=bool(outcome.get("needs_credentials")),
                             hint=outcome.get("hint"))
    last = done.stderr.strip().splitlines()[-1:] or ["no output"]
    raise TransportError(url, f"the S3 download child exited with {done.returncode}: "
                              f"{redact(last[0])}")


def serve_child(request: dict[str, Any], say: Callable[[str], None]) -> None:
    """The child's side of :func:`_in_child`: fetch, report bytes, end with a result line."""
    options = {b: S3Options(str(e), str(r), bool(p)) for b, (e, r, p) in request["s3"].items()}
    try:
        _with_retries(request["url"], Path(request["dest"]), float(request["timeout"]),
                      make_client(s3_options=options), None, int(request["retries"]),
                      lambda n: say(f"bytes {n}"))
        result: dict[str, Any] = {"ok": True}
    except TransportError as exc:
        result = {"ok": False, "why": exc.why, "status": exc.status,
                  "needs_credentials": exc.needs_credentials, "hint": exc.hint}
    say("result " + json.dumps(result))


def _copy(url: str, partial: Path, cancel: threading.Event | None,
          count: Callable[[int], None]) -> None:
    from provisioner.lock.channels import file_url_to_path

    source = file_url_to_path(url)
    try:
        with source.open("rb") as src, partial.open("wb") as out:
            while chunk := src.read(_CHUNK):
                if cancel is not None and cancel.is_set():
                    raise DownloadCancelled
                out.write(chunk)
                count(len(chunk))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise TransportError(url, "no such file") from None
    except PermissionError:
        raise TransportError(url, "permission denied") from None


def _with_retries(url: str, partial: Path, timeout: float, client: Any,
                  cancel: threading.Event | None, retries: int,
                  count: Callable[[int], None]) -> None:
    for attempt in range(retries + 1):
        writer = None
        try:
            with partial.open("wb") as out:
                writer = _Writer(out, count)
                asyncio.run(_stream(client, url, writer, timeout, cancel))
            return
        except _Transient as exc:
            if writer is not None and writer.size:
                count(-writer.size)
            if attempt == retries:
                raise TransportError(url, f"{exc} (gave up after {retries + 1} tries)"
                                     ) from None
            log.info("retrying %s after: %s", redact(url), exc)
            if (cancel or threading.Event()).wait(BACKOFF_S * 2 ** attempt):
                raise DownloadCancelled from None


class _Writer:
    """rattler calls ``write`` per chunk; the watchdog reads ``last``."""

    def __init__(self, out: IO[bytes], count: Callable[[int], None]) -> None:
        self.out = out
        self.count = count
        self.size = 0
        self.last = time.monotonic()

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.size += len(data)
        self.last = time.monotonic()
        self.count(len(data))


async def _stream(client: Any, url: str, writer: _Writer, timeout: float,
                  cancel: threading.Event | None) -> None:
    from rattler.package_streaming import download_to_writer

    task = asyncio.ensure_future(download_to_writer(client, url, writer))
    while True:
        done, _pending = await asyncio.wait({task}, timeout=_WATCH_S)
        if done:
            try:
                task.result()
            except Exception as exc:
                raise _classify(url, exc) from None
            return
        cancelled = cancel is not None and cancel.is_set()
        if not cancelled and time.monotonic() - writer.last <= timeout:
            continue
        task.cancel()  # drops rattler's future: the connection is closed
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if cancelled:
            raise DownloadCancelled
        raise _Transient(f"no answer within {timeout:g} s (PROVISIONER_FETCH_TIMEOUT)")


def _classify(url: str, exc: Exception) -> Exception:
    text = redact(str(exc)) or type(exc).__name__
    s3 = url.lower().startswith("s3://")
    match = _STATUS.search(text)
    if match:
        status = int(match.group(1))
        why = f"HTTP {status}{match.group(2)}"
        if status >= 500 or status in (408, 429):
            return _Transient(why)
        refused = status in (401, 403)
        return TransportError(url, why, status=status, needs_credentials=refused,
                              hint=(S3_HINT if s3 else AUTH_HINT) if refused else None)
    if s3 and ("presign" in text or "credential" in text.lower()):
        return TransportError(url, f"no usable S3 credentials ({text})", needs_credentials=True,
                              hint=S3_HINT)
    return _Transient(text)
