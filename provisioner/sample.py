"""Real conda packages and wheels, built locally without any network.

Tests, the ``provisioner sample DIR`` command, the demo and the benchmarks need
channels that rattler can index, solve and install from. This module writes
genuine ``.tar.bz2`` conda packages (``info/index.json``, ``info/paths.json``,
prefix placeholders, ``noarch: python``) into a ``file://`` channel.

The sample channel mirrors the names and dependency shapes of the pytorch and
nvidia channels. Its ``python`` is a ``/bin/sh`` launcher that runs the host
interpreter with the prefix's ``site-packages`` first on ``sys.path``; a
``sitecustomize.py`` in that directory drops the host's own site-packages so an
env sees only what it installed. The stub ``torch`` reports
``torch.cuda.is_available()`` as true for CUDA builds unless
``CUDA_VISIBLE_DEVICES`` is set to the empty string.

Every artifact is byte-deterministic: the same inputs give the same sha256.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import sys
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from provisioner import fsops, procs
from provisioner.errors import ToolMissingError, UserError
from provisioner.platforms import is_windows_platform, validate_platform

SAMPLE_CHANNEL = "provisioner-sample"
PREFIX_PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"
SAMPLE_PLATFORMS = ("linux-64", "win-64")
PYTORCH_VERSIONS = ("2.1.0", "2.2.1")
# cuda version -> (cudnn in the pytorch build string, cuda-cudart version)
CUDA_LINES = {"11.8": ("8.7.0", "11.8.89"), "12.1": ("8.9.2", "12.1.105")}

_MTIME = 1577836800  # 2020-01-01; fixed so archives are byte-identical across builds
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
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


@dataclass(frozen=True)
class HostPython:
    """The interpreter that the sample ``python`` package launches."""

    version: str  # X.Y.Z
    executable: str

    @property
    def xy(self) -> str:
        return ".".join(self.version.split(".")[:2])


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

    from provisioner.solver import run_rattler

    (Path(channel_dir) / "noarch").mkdir(parents=True, exist_ok=True)
    run_rattler(
        rattler.index.index_fs(Path(channel_dir), write_zst=False, write_shards=False, force=force)
    )
    with contextlib.suppress(OSError):  # the indexer leaves an empty scratch dir behind
        (Path(channel_dir) / ".tmp").rmdir()


def host_python(python_executable: str | None = None) -> HostPython:
    """Version and absolute path of ``python_executable`` (default: this interpreter)."""
    if python_executable is None or python_executable == sys.executable:
        version = ".".join(str(n) for n in sys.version_info[:3])
        return HostPython(version, os.path.abspath(sys.executable))
    try:
        result = procs.run(
            [python_executable, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            timeout=60,
        )
    except ToolMissingError:
        result = None
    if result is None or result.returncode != 0:
        raise UserError(
            f"cannot run the python interpreter {python_executable!r}",
            hint="pass the path of a working python 3 interpreter",
        )
    out = result.stdout.strip()
    return HostPython(out, os.path.abspath(python_executable))


def _site(subdir: str, xy: str) -> str:
    return "Lib/site-packages" if is_windows_platform(subdir) else f"lib/python{xy}/site-packages"


def _text(path: str, text: str) -> PackageFile:
    return PackageFile(path, text.encode())


def _module(site: str, dist: str, version: str, sources: Mapping[str, str]) -> list[PackageFile]:
    """Stub module files plus a ``.dist-info`` so importlib.metadata sees ``dist``."""
    info = f"{site}/{re.sub(r'[-_.]+', '_', dist)}-{version}.dist-info"
    files = [_text(f"{site}/{rel}", src) for rel, src in sources.items()]
    files.append(_text(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\n"
                       f"Version: {version}\n"))
    files.append(_text(f"{info}/INSTALLER", "conda\n"))
    return files


_STUB = '"""Stub of {name} {version} from the provisioner-sample channel."""\n\n'
_SITECUSTOMIZE = '''"""provisioner-sample python: only this prefix's packages are importable."""

import os
import site
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_foreign = {os.path.normcase(p) for p in site.getsitepackages() if os.path.normcase(p) != _here}
sys.path[:] = [p for p in sys.path if os.path.normcase(os.path.abspath(p or ".")) not in _foreign]
site.addsitedir(_here)  # processes .pth files, which PYTHONPATH alone does not
'''
_LAUNCHER = """#!/bin/sh
# provisioner-sample "python": the host interpreter with this prefix's packages.
PYTHONPATH={site}"${{PYTHONPATH:+:$PYTHONPATH}}"
PYTHONNOUSERSITE=1
export PYTHONPATH PYTHONNOUSERSITE
exec {exe} "$@"
"""
_TORCH_CUDA = '''"""CUDA is "available" for CUDA builds unless CUDA_VISIBLE_DEVICES is empty."""

import os

from torch import version as _version


def is_available() -> bool:
    return _version.cuda is not None and os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def device_count() -> int:
    return 1 if is_available() else 0
'''


def _python_files(subdir: str, py: HostPython) -> list[PackageFile]:
    site = _site(subdir, py.xy)
    marker = _text(f"{site}/_sample_python_marker.py", f'VERSION = "{py.version}"\n')
    if is_windows_platform(subdir):
        return [marker, _text("python.exe", "provisioner-sample stand-in; never executed\n")]
    launcher = _LAUNCHER.format(
        site=shlex.quote(f"{PREFIX_PLACEHOLDER}/{site}"), exe=shlex.quote(py.executable)
    ).encode()
    names = ("python", "python3", f"python{py.xy}")
    return [marker, _text(f"{site}/sitecustomize.py", _SITECUSTOMIZE)] + [
        PackageFile(f"bin/{n}", launcher, text_placeholder=True, executable=True) for n in names
    ]


def _torch_files(site: str, version: str, cuda: str | None) -> list[PackageFile]:
    return _module(site, "torch", version, {
        "torch/__init__.py": _STUB.format(name="torch", version=version)
        + f'from torch import version, cuda\n\n__version__ = "{version}"\n',
        "torch/version.py": f'__version__ = "{version}"\ncuda = {cuda!r}\n',
        "torch/cuda/__init__.py": _TORCH_CUDA,
    })


def _next_minor(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) + 1}"


def _simple_module(site: str, name: str, version: str) -> list[PackageFile]:
    source = _STUB.format(name=name, version=version) + f'__version__ = "{version}"\n'
    return _module(site, name, version, {f"{name}/__init__.py": source})


def _build_platform(channel_dir: Path, subdir: str, py: HostPython) -> None:
    xy, site = py.xy, _site(subdir, py.xy)
    pin = f"python >={xy},<{_next_minor(xy)}.0a0"
    cp = "py" + xy.replace(".", "")

    build_conda_package(channel_dir, subdir, "python", py.version, "h_sample_0",
                        files=_python_files(subdir, py))
    build_conda_package(channel_dir, subdir, "numpy", "1.26.4", f"{cp}h_sample_0", depends=[pin],
                        files=_simple_module(site, "numpy", "1.26.4"))
    for cuda, (_cudnn, cudart) in CUDA_LINES.items():
        major = cuda.split(".")[0]
        lib = (f"Library/bin/cudart64_{major}.dll" if is_windows_platform(subdir)
               else f"lib/libcudart.so.{cudart}")
        build_conda_package(channel_dir, subdir, "cuda-cudart", cudart, "h_sample_0",
                            depends=[f"cuda-version >={cuda},<{_next_minor(cuda)}.0a0"],
                            files=[_text(lib, f"stub cudart {cudart}\n")])
    for version in PYTORCH_VERSIONS:
        variants: list[tuple[str | None, str]] = [(None, f"py{xy}_cpu_0")]
        variants += [(c, f"py{xy}_cuda{c}_cudnn{d}_0") for c, (d, _r) in CUDA_LINES.items()]
        for cu, build in variants:
            deps = [pin, "numpy", f"pytorch-mutex 1.0 {'cuda' if cu else 'cpu'}"]
            if cu:
                deps.append(f"pytorch-cuda >={cu},<{_next_minor(cu)}")
            build_conda_package(channel_dir, subdir, "pytorch", version, build, depends=deps,
                                files=_torch_files(site, version, cu))
    build_conda_package(
        channel_dir, subdir, "bitsandbytes", "0.43.1", f"{cp}_cuda_sample_0",
        depends=[pin, "numpy", "pytorch", "pytorch-cuda"],
        files=_module(site, "bitsandbytes", "0.43.1", {
            "bitsandbytes/__init__.py": _STUB.format(name="bitsandbytes", version="0.43.1")
            + 'from bitsandbytes import cextension\n\n__version__ = "0.43.1"\n',
            "bitsandbytes/cextension.py": 'COMPILED_WITH_CUDA = True\nBNB_BACKEND = "CUDA"\n',
        }))


def _build_noarch(channel_dir: Path) -> None:
    def pure(name: str, version: str, depends: list[str]) -> None:
        build_conda_package(channel_dir, "noarch", name, version, "pyh_sample_0", depends=depends,
                            files=_simple_module("site-packages", name, version), noarch="python")

    for mutex in ("cpu", "cuda"):
        # Like the real pytorch channel: the cpu mutex is de-prioritised, so
        # an unqualified 'pytorch' prefers a CUDA build.
        build_conda_package(channel_dir, "noarch", "pytorch-mutex", "1.0", mutex,
                            build_number=100, noarch="generic",
                            track_features=("pytorch-mutex",) if mutex == "cpu" else ())
    for cuda in CUDA_LINES:
        nxt = _next_minor(cuda)
        build_conda_package(channel_dir, "noarch", "cuda-version", cuda, "h_sample_0",
                            noarch="generic", constrains=[f"__cuda >={cuda}"])
        build_conda_package(channel_dir, "noarch", "pytorch-cuda", cuda, "h_sample_0",
                            noarch="generic", depends=[f"cuda-version >={cuda},<{nxt}",
                                                       f"cuda-cudart >={cuda},<{nxt}"])
    for version in ("4.36.2", "4.40.0"):
        pure("transformers", version, ["numpy >=1.17", "python >=3.8"])
    pure("accelerate", "0.26.1", ["numpy >=1.17", "python >=3.8", "pytorch >=1.10"])


def build_sample_channel(
    channel_dir: Path,
    platforms: Sequence[str] = SAMPLE_PLATFORMS,
    python_executable: str | None = None,
) -> Path:
    """Build and index the sample channel for ``platforms`` and noarch; return ``channel_dir``."""
    py = host_python(python_executable)
    for subdir in dict.fromkeys(platforms):
        _build_platform(Path(channel_dir), validate_platform(subdir), py)
    _build_noarch(Path(channel_dir))
    index_channel(Path(channel_dir))
    return Path(channel_dir)


def _wheel_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def build_wheel(
    out_dir: Path,
    name: str,
    version: str,
    requires: Sequence[str] = (),
    files: Mapping[str, bytes] | None = None,
    tag: str = "py3-none-any",
) -> Path:
    """Write a valid, deterministic wheel and return its path.

    ``files`` maps archive paths to contents; the default is a module
    ``<name>/__init__.py`` that sets ``__version__``. ``requires`` become
    ``Requires-Dist`` lines.
    """
    dist = _wheel_name(name)
    if files is None:
        files = {f"{dist}/__init__.py": f'__version__ = "{version}"\n'.encode()}
    info = f"{dist}-{version}.dist-info"
    plats = tag.split("-")[2]
    tags = ["-".join(t) for t in itertools.product(*(part.split(".") for part in tag.split("-")))]
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    wheel = "Wheel-Version: 1.0\nGenerator: provisioner.sample\n"
    wheel += f"Root-Is-Purelib: {'true' if plats == 'any' else 'false'}\n"
    wheel += "".join(f"Tag: {t}\n" for t in tags)
    entries = dict(sorted(files.items()))
    entries[f"{info}/METADATA"] = metadata.encode()
    entries[f"{info}/WHEEL"] = wheel.encode()
    record = ""
    for path, data in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    entries[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in entries.items():
            zinfo = zipfile.ZipInfo(path, date_time=_ZIP_DATE)
            zinfo.external_attr = 0o644 << 16
            zinfo.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zinfo, data)
    out = Path(out_dir) / f"{dist}-{version}-{tag}.whl"
    _write_atomic(out, buf.getvalue())
    return out


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
