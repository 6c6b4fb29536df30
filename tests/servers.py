"""Servers the tests start on 127.0.0.1 and stop again: a static web host and an S3 endpoint.

Both stand for storage people already run (a web server or CDN, an S3 bucket); nothing
here reaches beyond the loopback interface.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from collections.abc import Iterator, Mapping
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

S3_KEY = "test-key"
S3_SECRET = "test-secret"
S3_REGION = "us-east-1"


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        self.server.paths.append(self.path)  # type: ignore[attr-defined]


@contextlib.contextmanager
def static_server(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """A plain static file server over ``directory``: yields its base URL and the paths asked."""
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_Handler, directory=str(directory)))
    server.paths = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.paths  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def s3_server(uploads: Mapping[str, Mapping[str, Path]]) -> Iterator[str]:
    """moto's S3 server; ``uploads`` maps bucket -> {key: file}. Yields the endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name=S3_REGION,
                              aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)
        for bucket, files in uploads.items():
            client.create_bucket(Bucket=bucket)
            for key, file in files.items():
                client.upload_file(str(file), bucket, key)
        yield endpoint
    finally:
        server.stop()
