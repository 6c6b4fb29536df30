"""Remote package archives, downloaded concurrently, retried, resumed and verified.

Why urllib and not rattler's own fetching: provisioner hands rattler only archives
it has already verified against the lock (``file://`` URLs, which rattler does not
hash), so one verification path serves local mirrors and remote channels alike.
urllib honours the standard proxy variables (``http_proxy``, ``https_proxy``,
``no_proxy``) through its default opener.

Each archive streams into a private ``.<file>.<pid>-<tid>.partial`` sibling of its
target while its sha256 is computed; only bytes that match the lock are renamed
into place, so the target never holds anything unverified. A 5xx, 408, 429, a
timeout, a reset or a body shorter than its ``Content-Length`` is retried
(``RETRIES`` times, exponential backoff); the retry asks for the rest with an HTTP
``Range`` request and appends where the server answers ``206`` from that offset,
and starts over otherwise. Bytes that arrive whole but do not match the lock are
not retried: the server sent exactly that file, and a second request would only
double the traffic. Any failure, Ctrl-C included, deletes the partial file;
on Ctrl-C or a first failure the other downloads' sockets are shut down, so nobody
waits out a timeout.

``s3://`` URLs, hosts with an entry in rattler's credentials file, and hosts that
answer a plain request with 401 or 403 (credentials in the keyring or netrc) go
through ``build.transport`` instead: rattler's client, its authentication storage
and S3 support. Those downloads restart rather than resume, and are hashed once
complete, before the same rename. A refusal for lack of credentials names the
channel.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner import fsops
from provisioner.build.transport import BACKOFF_S, NETWORK_HINT, RETRIES
from provisioner.config import Config
from provisioner.errors import FetchError, IntegrityError
from provisioner.lock.lockfile import LockedPackage

log = logging.getLogger(__name__)

WORKERS = 4
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchJob:
    """One archive to download from ``url`` into ``target``."""

    package: LockedPackage
    url: str
    target: Path
    channel: str = ""  # the lock's channel name, for refusals of credentials


class _Transient(Exception):
    """A failure worth retrying (server error, timeout, reset, short body)."""


class _Stopped(Exception):
    """Another download failed or the user interrupted: give up quietly."""


class _NeedsCredentials(Exception):
    """A plain request was refused with 401 or 403: retry through rattler's auth storage."""


class _RattlerClient:
    """One rattler client per ``fetch_all``, made on first use (rattler imports slowly)."""

    def __init__(self, config: Config | None) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._client: Any = None

    @property
    def s3_options(self) -> Any:
        return self._config.s3_options if self._config is not None else {}

    def get(self) -> Any:
        from provisioner.build.transport import make_client

        with self._lock:
            if self._client is None:
                self._client = make_client(self._config)
            return self._client


class _Connections:
    """Every socket of one ``fetch_all`` call, so that a stop can shut them down.

    A worker blocked in ``recv`` would otherwise notice Ctrl-C only after its
    timeout (two minutes by default); ``shutdown`` wakes it at once. Sockets are
    recorded at connect time because urllib detaches them from the connection
    once the headers arrive.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._stopped = False

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.append(sock)
            if not self._stopped:
                return
        self.shut_down()

    def shut_down(self) -> None:
        with self._lock:
            self._stopped = True
            for sock in self._open:
                with contextlib.suppress(OSError):  # already closed: nothing to wake
                    sock.shutdown(socket.SHUT_RDWR)


def _tracked(base: type[http.client.HTTPConnection], conns: _Connections) -> Any:
    class Connection(base):  # type: ignore[valid-type,misc]
        def connect(self) -> None:
            super().connect()
            conns.track(self.sock)

    return Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, conns: _Connections) -> None:
        super().__init__()
        self.connection = _tracked(http.client.HTTPConnection, conns)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self.connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, conns: _Connections) -> None:
        super().__init__()
        self.connection = _tracked(http.client.HTTPSConnection, conns)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self.connection, req,
                            context=self._context)  # type: ignore[attr-defined]


def _what(pkg: LockedPackage) -> str:
    return f"{pkg.name} {pkg.version} ({pkg.file_name})"


def _fetch_error(job: FetchJob, why: str) -> FetchError:
    return FetchError(f"could not download {_what(job.package)} from {job.url}: {why}",
                      hint=NETWORK_HINT)


class _Download:
    def __init__(self, job: FetchJob, timeout: float, stop: threading.Event,
                 opener: urllib.request.OpenerDirector, rattler: _RattlerClient,
                 on_bytes: Callable[[int, int], None] | None = None) -> None:
        self.job = job
        self.on_bytes = on_bytes
        self.opener = opener
        self.rattler = rattler
        self.timeout = timeout
        self.stop = stop
        self.partial = job.target.with_name(
            f".{job.target.name}.{os.getpid()}-{threading.get_ident()}.partial")
        self.digest = hashlib.sha256()
        self.size = 0
        self.started = threading.Event()
        self.finished = threading.Event()
        self.expected = 0  # this archive's size as last announced to on_bytes

    def _report(self, received: int, expected_total: int | None = None) -> None:
        if self.on_bytes is None:
            return
        grown = 0
        if expected_total is not None and expected_total != self.expected:
            grown, self.expected = expected_total - self.expected, expected_total
        self.on_bytes(received, grown)

    def run(self) -> None:
        self.started.set()
        try:
            self._run()
        finally:
            self.finished.set()

    def _run(self) -> None:
        if self.stop.is_set():
            raise _Stopped
        self.job.target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if _through_rattler(self.job.url):
                self._through_transport()
            else:
                try:
                    self._with_retries()
                except _NeedsCredentials:
                    self._through_transport()
            actual = self.digest.hexdigest()
            if actual != self.job.package.sha256:
                pkg = self.job.package
                raise IntegrityError(
                    f"sha256 mismatch for {_what(pkg)} downloaded from {self.job.url}: "
                    f"lock has {pkg.sha256}, archive has {actual}",
                    hint="the archive or the lock was altered; relock, or fix the mirror")
            fsops.rename_with_retry(self.partial, self.job.target, rename=os.replace,
                                    denied_budget=fsops.RENAME_RETRY_BUDGET_S)  # being scanned
        except Exception:
            if self.stop.is_set():  # whatever a shut-down socket raised, the cause is elsewhere
                raise _Stopped from None
            raise
        finally:
            fsops.remove_file(self.partial)

    def _through_transport(self) -> None:
        from provisioner.build.transport import DownloadCancelled, TransportError, download

        try:
            s3 = self.job.url.lower().startswith("s3://")  # fetched in a child process
            download(self.job.url, self.partial, timeout=self.timeout, cancel=self.stop,
                     client=None if s3 else self.rattler.get(), retries=RETRIES,
                     s3_options=self.rattler.s3_options)
        except DownloadCancelled:
            raise _Stopped from None
        except TransportError as exc:
            error = _fetch_error(self.job, exc.why)
            if exc.needs_credentials:
                error = FetchError(f"channel '{self.job.channel or '?'}' refused access: {error}",
                                   hint=exc.hint)
            raise error from None
        size = self.partial.stat().st_size
        self._report(size - self.size, size)  # the transport counts no bytes as they arrive
        self.digest = hashlib.sha256()
        with self.partial.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                self.digest.update(chunk)

    def _with_retries(self) -> None:
        for attempt in range(RETRIES + 1):
            try:
                self._attempt()
                return
            except _Transient as exc:
                if attempt == RETRIES:
                    raise _fetch_error(self.job, f"{exc} (gave up after {RETRIES + 1} tries)"
                                       ) from None
                log.info("retrying %s after: %s", self.job.url, exc)
                if self.stop.wait(BACKOFF_S * 2 ** attempt):
                    raise _Stopped from None

    def _attempt(self) -> None:
        request = urllib.request.Request(self.job.url)
        if self.size:
            request.add_header("Range", f"bytes={self.size}-")
        try:
            with self.opener.open(request, timeout=self.timeout) as resp:
                self._receive(resp)
        except urllib.error.HTTPError as exc:
            why = f"HTTP {exc.code} {exc.reason}"
            if exc.code in (401, 403):
                raise _NeedsCredentials from None
            if exc.code >= 500 or exc.code in (408, 429):
                raise _Transient(why) from None
            raise _fetch_error(self.job, why) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise _Transient(_describe(exc, self.timeout)) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, ConnectionError)):
                raise _Transient(_describe(exc.reason, self.timeout)) from None
            raise _fetch_error(self.job, str(exc.reason)) from None

    def _receive(self, resp: http.client.HTTPResponse) -> None:
        if self.size and not (resp.status == 206 and _range_start(resp) == self.size):
            self._report(-self.size)  # those bytes will come again
            self.digest = hashlib.sha256()  # no resume from here: start over
            self.size = 0
        expected = resp.headers.get("Content-Length")
        if expected is not None and expected.isdigit():
            self._report(0, self.size + int(expected))
        got = 0
        with self.partial.open("ab" if self.size else "wb") as out:
            while chunk := resp.read(_CHUNK):
                if self.stop.is_set():
                    raise _Stopped
                out.write(chunk)
                self.digest.update(chunk)
                self.size += len(chunk)
                got += len(chunk)
                self._report(len(chunk))
        # http.client's read(n) returns b"" at a closed connection without raising.
        if expected is not None and expected.isdigit() and got < int(expected):
            raise _Transient(f"body cut short at {got} of {expected} bytes")


def _range_start(resp: http.client.HTTPResponse) -> int | None:
    value = resp.headers.get("Content-Range", "")  # "bytes 100-999/1000"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s (PROVISIONER_FETCH_TIMEOUT)"
    return str(exc) or type(exc).__name__


def _through_rattler(url: str) -> bool:
    if url.lower().startswith("s3://"):
        return True
    from provisioner.build.transport import has_stored_credentials

    return has_stored_credentials(url)


def fetch_all(jobs: Sequence[FetchJob], *, timeout: float, workers: int = WORKERS,
              config: Config | None = None,
              on_bytes: Callable[[int, int], None] | None = None) -> None:
    """Download and verify every job, ``workers`` at a time; raise the first failure.

    ``config`` gives the ``[s3-options]`` for ``s3://`` URLs. ``on_bytes(received,
    expected)`` (called from the worker threads) gets changes of two sums over all
    jobs: bytes received (negative when a download starts over) and bytes expected
    (each archive's ``Content-Length``, announced as its response arrives), for a
    progress bar with a rate and an ETA.

    The first failure (in job order) stops the others: they delete their partial
    files and end. So does an interrupt of the calling thread, which is re-raised
    once every worker has cleaned up.
    """
    if not jobs:
        return
    stop = threading.Event()
    conns = _Connections()
    # Built per call, not urlopen's process-wide opener: it reads the proxy variables now.
    opener = urllib.request.build_opener(_HTTPHandler(conns), _HTTPSHandler(conns))
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))),
                              thread_name_prefix="provisioner-fetch")
    futures: list[Future[None]] = []
    downloads: list[_Download] = []
    rattler = _RattlerClient(config)
    try:
        for job in jobs:
            log.info("downloading %s", job.package.file_name)
            downloads.append(_Download(job, timeout, stop, opener, rattler, on_bytes))
            futures.append(pool.submit(downloads[-1].run))
        wait(futures, return_when=FIRST_EXCEPTION)
        stop.set()  # a no-op when all succeeded; otherwise the rest end early
        conns.shut_down()
        wait(futures)
        for future in futures:
            exc = None if future.cancelled() else future.exception()
            if exc is not None and not isinstance(exc, _Stopped):
                raise exc
    except BaseException:
        stop.set()
        conns.shut_down()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        # A Ctrl-C inside submit (Thread.start waits for the new thread) leaves that
        # thread out of the pool's list, unjoined: wait for every download that started.
        for download in downloads:
            if download.started.is_set():
                download.finished.wait()
