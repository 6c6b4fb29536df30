"""Reading ``.conda`` archives: both tar streams, whatever the zstd framing."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from provisioner.build.archives import tar_streams


def _streamed_tar_zst(items: list[tuple[str, bytes]]) -> bytes:
    """A tar written through a streaming, multi-threaded zstd writer, as packagers do."""
    import zstandard

    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(out, closefd=False) as zw, \
            tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("index_size", range(100, 30000, 997))
def test_conda_pkg_stream_reads_after_a_partly_drained_info_stream(
        tmp_path: Path, index_size: int) -> None:
    # tarfile stops at the end-of-archive blocks and may leave the end of the info frame
    # unread; the pkg stream must still decompress (it did not while both shared one
    # ZstdDecompressor: "Unknown frame descriptor" for index sizes such as 8076).
    path = tmp_path / "x-1.0-0.conda"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"conda_pkg_format_version": 2}))
        zf.writestr("info-x-1.0-0.tar.zst", _streamed_tar_zst(
            [("info/index.json", b"a" * index_size), ("info/paths.json", b"{}")]))
        zf.writestr("pkg-x-1.0-0.tar.zst", _streamed_tar_zst([("share/x/f.txt", b"b" * 100)]))
    names = []
    with tar_streams(path, 1 << 30, path.name) as streams:
        for stream in streams:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                names += [m.name for m in tar]
    assert names == ["info/index.json", "info/paths.json", "share/x/f.txt"]
