"""Real conda packages and wheels, written locally without any network.

Genuine ``.tar.bz2`` conda packages (``info/index.json``, ``info/paths.json``
with sha256 and prefix placeholders, ``info/link.json`` for ``noarch: python``)
in a ``file://`` channel indexed with rattler, and valid wheels for the pip
layer. Every artifact is byte-deterministic: the same inputs give the same
sha256. :mod:`provisioner.sample.stack` fills a channel with the sample GPU stack.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner import fsops

PREFIX_PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"
_MTIME = 1577836800  # 2020-01-01; fixed so archives are byte-identical across builds
_ARCH = {
    "linux-64": ("x86_64", "linux"), "linux-aarch64": ("aarch64", "linux"),
    "osx-64": ("x86_64", "osx"), "osx-arm64": ("arm64", "osx"), "win-64": ("x86_64", "win"),
}


@dataclass(frozen=True)
class PackageFile:
    """One file in a conda package, at ``path`` relative to the prefix."""

    path: str
    content: bytes
    text_placeholder: bool = False
    executable: bool = False


def channel_url(channel_dir: Path) -> str:
    """The ``file://`` URL of a local channel directory."""
    return Path(channel_dir).resolve().as_uri()


def _tar_bz2(members: Sequence[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2", format=tarfile.GNU_FORMAT) as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _MTIME, mode
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _json_bytes(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, separators=(",", ": ")) + "\n").encode()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fsops.atomic_write_bytes(path, data)


def _check_file(f: PackageFile) -> None:
    parts = f.path.split("/")
    if not f.path or f.path.startswith("/") or "\\" in f.path or ".." in parts or "" in parts:
        raise ValueError(f"package file path {f.path!r} must be relative with forward slashes")
    if f.text_placeholder and PREFIX_PLACEHOLDER.encode() not in f.content:
        raise ValueError(f"{f.path} is marked text_placeholder but holds no placeholder")


def build_conda_package(
    channel_dir: Path,
    subdir: str,
    name: str,
    version: str,
    build: str,
    build_number: int = 0,
    depends: Sequence[str] = (),
    files: Sequence[PackageFile] = (),
    noarch: str | None = None,
    constrains: Sequence[str] = (),
    track_features: Sequence[str] = (),
) -> Path:
    """Write ``channel_dir/<subdir>/<name>-<version>-<build>.tar.bz2`` and return its path.

    ``noarch`` (``"python"`` or ``"generic"``) requires ``subdir == "noarch"``.
    The archive is byte-deterministic for the same arguments.
    """
    if (noarch is not None) != (subdir == "noarch"):
        raise ValueError("noarch packages, and only they, go into the 'noarch' subdir")
    if noarch not in (None, "python", "generic"):
        raise ValueError(f"noarch must be 'python' or 'generic', not {noarch!r}")
    ordered = sorted(files, key=lambda f: f.path)
    for f in ordered:
        _check_file(f)
    if len({f.path for f in ordered}) != len(ordered):
        raise ValueError(f"{name}: duplicate file paths")
    arch, plat = _ARCH.get(subdir, (None, None))
    index: dict[str, object] = {
        "arch": arch, "build": build, "build_number": build_number, "depends": list(depends),
        "license": "MIT", "name": name, "platform": plat, "subdir": subdir, "version": version,
    }
    if constrains:
        index["constrains"] = list(constrains)
    if noarch:
        index["noarch"] = noarch
    if track_features:
        index["track_features"] = " ".join(track_features)

    paths = []
    for f in ordered:
        entry: dict[str, object] = {
            "_path": f.path, "path_type": "hardlink",
            "sha256": hashlib.sha256(f.content).hexdigest(), "size_in_bytes": len(f.content),
        }
        if f.text_placeholder:
            entry["file_mode"] = "text"
            entry["prefix_placeholder"] = PREFIX_PLACEHOLDER
        paths.append(entry)
    info = {
        "info/index.json": _json_bytes(index),
        "info/paths.json": _json_bytes({"paths": paths, "paths_version": 1}),
        "info/files": "".join(f"{f.path}\n" for f in ordered).encode(),
    }
    placeholders = [f.path for f in ordered if f.text_placeholder]
    if placeholders:
        info["info/has_prefix"] = "".join(
            f"{PREFIX_PLACEHOLDER} text {p}\n" for p in placeholders
        ).encode()
    if noarch:
        # What conda-build writes for every noarch package.
        info["info/link.json"] = _json_bytes(
            {"noarch": {"type": noarch}, "package_metadata_version": 1}
        )
    members = [(f.path, f.content, 0o755 if f.executable else 0o644) for f in ordered]
    members += [(k, v, 0o644) for k, v in sorted(info.items())]
    out = Path(channel_dir) / subdir / f"{name}-{version}-{build}.tar.bz2"
    _write_atomic(out, _tar_bz2(members))
    return out


def index_channel(channel_dir: Path, *, force: bool = True) -> None:
    """Write ``repodata.json`` for every subdir of ``channel_dir`` (``noarch/`` is created).

    ``force`` re-reads every archive, so a rebuilt package under an old file
    name never keeps a stale hash.
    """
    import rattler.index

    from provisioner.lock.solve import run_rattler

    (Path(channel_dir) / "noarch").mkdir(parents=True, exist_ok=True)
    run_rattler(
        rattler.index.index_fs(Path(channel_dir), write_zst=False, write_shards=False, force=force)
    )
    with contextlib.suppress(OSError):  # the indexer leaves an empty scratch dir behind
        (Path(channel_dir) / ".tmp").rmdir()


def build_synthetic_channel(
    channel_dir: Path, n_packages: int, files_per_package: int, subdir: str,
    file_size: int = 200, *, name_prefix: str = "synth-", with_deps: bool = True,
) -> list[str]:
    """Build and index ``n_packages`` generic packages for benchmarks; return their names.

    Each package holds ``files_per_package`` text files of about ``file_size``
    bytes (the first one with a prefix placeholder), and with ``with_deps`` some
    packages depend on earlier ones.
    """
    names = [f"{name_prefix}{i:05d}" for i in range(n_packages)]
    noarch = "generic" if subdir == "noarch" else None
    for i, name in enumerate(names):
        deps = []
        if with_deps and i % 7 == 3:
            deps.append(names[i - 1])
        if with_deps and i % 11 == 5:
            deps.append(f"{names[i // 2]} >=1.0")
        files = []
        for j in range(files_per_package):
            body = f"{name} file {j}\n" + "x" * file_size + "\n"
            if j == 0:
                body += f"prefix = {PREFIX_PLACEHOLDER}\n"
            files.append(PackageFile(f"share/synth/{name}/f{j:04d}.txt", body.encode(),
                                     text_placeholder=j == 0))
        build_conda_package(channel_dir, subdir, name, "1.0", "h_synth_0", depends=deps,
                            files=files, noarch=noarch)
    index_channel(channel_dir)
    return names


# --------------------------------------------------------------------------- raw (hostile) packages


@dataclass(frozen=True)
class RawMember:
    """One archive member written exactly as given, unchecked (for hostile-input tests).

    ``kind`` is ``file``, ``dir``, ``symlink`` or ``hardlink`` (``target`` is the
    link target); ``zeros`` makes a file of that many NUL bytes, streamed (bombs).
    """

    name: str
    data: bytes = b""
    kind: str = "file"
    target: str = ""
    zeros: int = 0


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def _raw_tar(members: Sequence[RawMember], compression: str) -> bytes:
    buf = io.BytesIO()
    mode: Any = f"w:{compression}"
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mtime, info.mode = _MTIME, 0o755 if m.kind == "dir" else 0o644
            types = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE,
                     "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}
            info.type, info.linkname = types[m.kind], m.target
            body: Any = None
            if m.kind == "file":
                info.size = m.zeros or len(m.data)
                body = _Zeros(m.zeros) if m.zeros else io.BytesIO(m.data)
            tar.addfile(info, body)
    return buf.getvalue()


def _raw_paths(members: Sequence[RawMember]) -> list[dict[str, object]]:
    paths: list[dict[str, object]] = []
    for m in members:
        if m.name.startswith("info/") or m.kind == "dir":
            continue
        if m.kind == "symlink":
            paths.append({"_path": m.name, "path_type": "softlink"})
            continue
        digest = hashlib.sha256()
        size = m.zeros or len(m.data)
        if m.zeros:
            for start in range(0, m.zeros, 1 << 20):
                digest.update(bytes(min(1 << 20, m.zeros - start)))
        else:
            digest.update(m.data)
        paths.append({"_path": m.name, "path_type": "hardlink",
                      "sha256": digest.hexdigest(), "size_in_bytes": size})
    return paths


def build_raw_package(
    channel_dir: Path, subdir: str, name: str, version: str, build: str,
    members: Sequence[RawMember], *, paths: Sequence[dict[str, object]] | None = None,
    fmt: str = "tar.bz2",
) -> Path:
    """Write a package whose members and ``paths.json`` are exactly as given.

    For tests of provisioner's refusal of hostile packages: nothing here is
    checked. ``paths`` defaults to entries derived from ``members``; ``fmt`` is
    ``tar.bz2`` or ``conda``. Index the channel afterwards with :func:`index_channel`.
    """
    arch, plat = _ARCH.get(subdir, (None, None))
    index: dict[str, object] = {
        "arch": arch, "build": build, "build_number": 0, "depends": [], "license": "MIT",
        "name": name, "platform": plat, "subdir": subdir, "version": version,
    }
    if subdir == "noarch":
        index["noarch"] = "generic"
    entries = list(paths) if paths is not None else _raw_paths(members)
    info = [RawMember("info/index.json", _json_bytes(index)),
            RawMember("info/paths.json", _json_bytes({"paths": entries, "paths_version": 1}))]
    stem = f"{name}-{version}-{build}"
    if fmt == "tar.bz2":
        data = _raw_tar([*info, *members], "bz2")
    elif fmt == "conda":
        import zipfile

        import zstandard

        zbuf = io.BytesIO()
        cctx = zstandard.ZstdCompressor()
        with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("metadata.json", json.dumps({"conda_pkg_format_version": 2}))
            zf.writestr(f"info-{stem}.tar.zst", cctx.compress(_raw_tar(info, "")))
            zf.writestr(f"pkg-{stem}.tar.zst", cctx.compress(_raw_tar(members, "")))
        data = zbuf.getvalue()
    else:
        raise ValueError(f"fmt must be 'tar.bz2' or 'conda', not {fmt!r}")
    out = Path(channel_dir) / subdir / f"{stem}.{fmt}"
    _write_atomic(out, data)
    return out
