"""Real wheels as ``.conda`` packages, a local channel of them, and a throttled HTTP server.

Used by ``benchmarks/bench_real.py``. A wheel becomes one ``.conda`` package (the
current format: a zip holding ``metadata.json`` and two zstd-compressed tars):

* name: the canonical PyPI name (``huggingface_hub`` -> ``huggingface-hub``); version: the
  wheel's, its local part (``+cpu``) moved into the build string;
* pure-Python wheels (``py3-none-any``) are ``noarch: python`` with files under
  ``site-packages/`` (CEP 20 / conda's noarch layout); the others go to the host's subdir
  under ``lib/pythonX.Y/site-packages/`` and depend on ``python X.Y.*``;
* ``depends``: each ``Requires-Dist`` whose marker holds on this host without extras and
  whose distribution is in the same download set, its PEP 440 specifier kept as is
  (rattler reads ``>=``, ``~=``, ``!=``, ``==X.*``);
* ``info/paths.json`` has the real sha256 and size of every file, hashed while the file
  streams into the archive; shared libraries the wheel carries as identical copies
  (``libcupti.so``, ``libcupti.so.13``, ``libcupti.so.2026.2.0``: wheels cannot hold
  symlinks) become symlinks to the longest name, as conda packages ship them;
* ``.data/purelib|platlib|headers|data`` are mapped; ``.data/scripts`` are left out
  (wheel shebangs need a rewrite that is not what this benchmark measures).

Nothing is held in memory whole: members stream from the wheel through a hashing reader
into a zstd stream, so a 1.2 GB torch wheel converts in constant memory.
"""

from __future__ import annotations

import email.parser
import hashlib
import http.server
import io
import json
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import threading
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

CONVERTER_VERSION = 2  # part of the cache key: bump when the output changes
_MTIME = 1577836800
_SO = re.compile(r"^lib.+\.so(\.[0-9A-Za-z_.-]+)?$")


@dataclass(frozen=True)
class Converted:
    """One converted package."""

    path: Path
    name: str
    version: str
    build: str
    noarch: bool
    files: int
    symlinks: int
    dropped_deps: tuple[str, ...]


class _HashingReader(io.RawIOBase):
    """Reads through ``raw`` and hashes what passes."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def wheel_facts(zf: zipfile.ZipFile) -> tuple[str, dict[str, Any]]:
    """The ``.dist-info`` directory name and its METADATA / WHEEL fields."""
    info_dirs = {n.split("/")[0] for n in zf.namelist()
                 if n.count("/") == 1 and n.endswith(".dist-info/METADATA")}
    if len(info_dirs) != 1:
        raise ValueError(f"{zf.filename}: expected one .dist-info, found {sorted(info_dirs)}")
    info_dir = info_dirs.pop()
    meta = email.parser.BytesParser().parsebytes(zf.read(f"{info_dir}/METADATA"))
    wheel = email.parser.BytesParser().parsebytes(zf.read(f"{info_dir}/WHEEL"))
    return info_dir, {"name": meta["Name"], "version": meta["Version"],
                      "requires": meta.get_all("Requires-Dist") or [],
                      "tags": wheel.get_all("Tag") or []}


def conda_depends(requires: list[str], known: dict[str, list[str]]
                  ) -> tuple[list[str], list[str]]:
    """(conda depends, requirements left out) for ``Requires-Dist`` lines on this host.

    ``known`` maps each distribution of the download set to its own ``Requires-Dist``;
    a requirement with extras (``cuda-toolkit[cublas]``) also depends on what those
    extras of that distribution require (conda packages have no extras).
    """
    depends: dict[str, str] = {}
    dropped = []
    todo = [(line, "") for line in requires]
    seen_extras: set[tuple[str, str]] = set()
    while todo:
        line, extra = todo.pop(0)
        try:
            req = Requirement(line)
        except InvalidRequirement:
            dropped.append(line)
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name not in known:
            dropped.append(line)
            continue
        spec = ",".join(str(s).split("+")[0] for s in req.specifier)
        depends[name] = ",".join(x for x in (depends.get(name, ""), spec) if x)
        for e in sorted(req.extras):
            if (name, e) not in seen_extras:
                seen_extras.add((name, e))
                todo += [(sub, e) for sub in known[name]
                         if Requirement(sub).marker is not None
                         and not Requirement(sub).marker.evaluate({"extra": ""})]
    return [f"{n} {s}".strip() for n, s in depends.items()], dropped


def _target(name: str, info_dir: str, site: str) -> str | None:
    """Where a wheel member goes in the prefix (None: left out)."""
    data_dir = info_dir[: -len(".dist-info")] + ".data/"
    if not name.startswith(data_dir):
        return f"{site}/{name}"
    kind, _, rest = name[len(data_dir):].partition("/")
    if kind in ("purelib", "platlib"):
        return f"{site}/{rest}"
    if kind == "headers":
        return f"include/{rest}"
    if kind == "data":
        return rest
    return None  # scripts


def _so_copies(members: list[tuple[zipfile.ZipInfo, str]]) -> dict[str, str]:
    """Shared-library copies in one directory (same size and CRC): path -> link target."""
    groups: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    for zi, path in members:
        if _SO.match(posixpath.basename(path)):
            groups[(posixpath.dirname(path), zi.file_size, zi.CRC)].append(path)
    links = {}
    for paths in groups.values():
        if len(paths) > 1:
            keep = max(paths, key=lambda p: (len(p), p))
            for p in paths:
                if p != keep:
                    links[p] = posixpath.basename(keep)
    return links


def _tar_info(path: str, size: int = 0, mode: int = 0o644, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.size, info.mtime, info.mode = size, _MTIME, mode
    info.uname = info.gname = ""
    if link:
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, link, 0o777
    return info


def _json(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def convert_wheel(wheel: Path, channel: Path, subdir: str, py_xy: str,
                  known: dict[str, list[str]],
                  level: int = 3, tag: int = 0) -> Converted:
    """Write ``wheel`` as a ``.conda`` into ``channel`` (skipped when already there).

    ``tag`` ends the build string (``pyh_0``, ``pyh_1``): another build of the same files.
    """
    with zipfile.ZipFile(wheel) as zf:
        info_dir, facts = wheel_facts(zf)
        name = canonicalize_name(facts["name"])
        version, _, local = str(facts["version"]).partition("+")
        noarch = all(t.endswith("-none-any") for t in facts["tags"])
        cp = "py" + py_xy.replace(".", "")
        build = ("pyh" if noarch else cp) + (f"_{re.sub(r'[^A-Za-z0-9]', '_', local)}"
                                             if local else "") + f"_{tag}"
        out_dir = channel / ("noarch" if noarch else subdir)
        stem = f"{name}-{version}-{build}"
        out = out_dir / f"{stem}.conda"
        depends, dropped = conda_depends(facts["requires"], known)
        depends.append("python" if noarch else f"python {py_xy}.*")
        site = "site-packages" if noarch else f"lib/python{py_xy}/site-packages"
        members = [(zi, t) for zi in zf.infolist() if not zi.is_dir()
                   if (t := _target(zi.filename, info_dir, site)) is not None]
        links = _so_copies(members)
        if out.is_file():
            return Converted(out, name, version, build, noarch, len(members), len(links),
                             tuple(dropped))
        out_dir.mkdir(parents=True, exist_ok=True)
        paths: list[dict[str, object]] = []
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".convert-") as tmp:
            pkg_zst = Path(tmp) / f"pkg-{stem}.tar.zst"
            _write_pkg(zf, sorted(members, key=lambda m: m[1]), links, pkg_zst, paths, level)
            index: dict[str, object] = {
                "name": name, "version": version, "build": build, "build_number": 0,
                "depends": depends, "license": "see the wheel's METADATA",
                "subdir": "noarch" if noarch else subdir,
                "arch": None if noarch else "x86_64", "platform": None if noarch else "linux"}
            info = {"info/index.json": _json(index),
                    "info/paths.json": _json({"paths": paths, "paths_version": 1}),
                    "info/files": "".join(f"{p['_path']}\n" for p in paths).encode()}
            if noarch:
                index["noarch"] = "python"
                info["info/index.json"] = _json(index)
                info["info/link.json"] = _json({"noarch": {"type": "python"},
                                                "package_metadata_version": 1})
            info_zst = Path(tmp) / f"info-{stem}.tar.zst"
            _write_tar_zst(info_zst, [(k, v) for k, v in sorted(info.items())], level)
            part = Path(tmp) / "out.conda"
            with zipfile.ZipFile(part, "w", zipfile.ZIP_STORED, allowZip64=True) as cz:
                cz.writestr("metadata.json", json.dumps({"conda_pkg_format_version": 2}))
                cz.write(info_zst, info_zst.name)
                cz.write(pkg_zst, pkg_zst.name)
            os.replace(part, out)
    return Converted(out, name, version, build, noarch, len(members), len(links), tuple(dropped))


def _compressor(level: int) -> Any:
    import zstandard

    return zstandard.ZstdCompressor(level=level, threads=-1)


def _write_tar_zst(dest: Path, items: list[tuple[str, bytes]], level: int) -> None:
    with open(dest, "wb") as fh, _compressor(level).stream_writer(fh, closefd=False) as zw, \
            tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path, data in items:
            tar.addfile(_tar_info(path, len(data)), io.BytesIO(data))


def _write_pkg(zf: zipfile.ZipFile, members: list[tuple[zipfile.ZipInfo, str]],
               links: dict[str, str], dest: Path, paths: list[dict[str, object]],
               level: int) -> None:
    with open(dest, "wb") as fh, _compressor(level).stream_writer(fh, closefd=False) as zw, \
            tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for zi, path in members:
            if path in links:
                tar.addfile(_tar_info(path, link=links[path]))
                paths.append({"_path": path, "path_type": "softlink"})
                continue
            mode = 0o755 if (zi.external_attr >> 16) & 0o111 else 0o644
            with zf.open(zi) as raw:
                reader = _HashingReader(raw)
                tar.addfile(_tar_info(path, zi.file_size, mode), reader)
            paths.append({"_path": path, "path_type": "hardlink",
                          "sha256": reader.digest.hexdigest(), "size_in_bytes": zi.file_size})


def add_sample_python(channel: Path, subdir: str) -> Path:
    """Copy the sample stack's ``python`` (a launcher for this interpreter) into ``channel``."""
    from provisioner.sample.stack import build_sample_channel

    with tempfile.TemporaryDirectory() as tmp:
        build_sample_channel(Path(tmp), [subdir])
        (src,) = Path(tmp, subdir).glob("python-*.tar.bz2")
        dest = channel / subdir / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return dest


# --------------------------------------------------------------------------- HTTP server


class Throttle:
    """One link shared by every connection: ``rate`` bytes per second, in order of arrival."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.free_at = time.monotonic()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.free_at = max(self.free_at, now) + n / self.rate
            until = self.free_at
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def serve_channel(channel: Path, latency_s: float, rate: float
                  ) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``channel`` on 127.0.0.1 (a thread); return (server, base URL). Call shutdown()."""
    throttle = Throttle(rate)
    stats = {"requests": 0, "bytes": 0}

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(channel), **kwargs)

        def send_head(self) -> Any:
            time.sleep(latency_s)  # the round trip and the server's think time
            stats["requests"] += 1
            return super().send_head()

        def copyfile(self, source: Any, outputfile: Any) -> None:
            while chunk := source.read(256 << 10):
                throttle.take(len(chunk))
                outputfile.write(chunk)
                stats["bytes"] += len(chunk)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.stats = stats  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
