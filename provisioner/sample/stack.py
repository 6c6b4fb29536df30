"""The sample channel: a small, real GPU stack of conda packages, built offline.

Tests, the ``provisioner sample DIR`` command, the demo and the benchmarks need
channels that rattler can index, solve and install from; the packages are
written by :mod:`provisioner.sample.packages` (re-exported here).

The sample channel mirrors the names and dependency shapes of the pytorch and
nvidia channels. Its ``python`` is a ``/bin/sh`` launcher that runs the host
interpreter with the prefix's ``site-packages`` first on ``sys.path``; a
``sitecustomize.py`` in that directory drops the host's own site-packages so an
env sees only what it installed. On Windows it is a real ``python.exe``, the
host's venv launcher (see :mod:`provisioner.sample.host_python`). The stub
``torch`` reports ``torch.cuda.is_available()`` as true for CUDA builds unless
``CUDA_VISIBLE_DEVICES`` is set to the empty string.

Every artifact is byte-deterministic: the same inputs give the same sha256.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from provisioner.lock.platforms import is_windows_platform, validate_platform
from provisioner.lock.wheels import build_wheel
from provisioner.sample.host_python import HostPython, host_python, windows_python_files
from provisioner.sample.packages import (
    PREFIX_PLACEHOLDER,
    PackageFile,
    build_conda_package,
    build_synthetic_channel,
    channel_url,
    index_channel,
)

__all__ = [
    "CUDA_LINES", "PREFIX_PLACEHOLDER", "PYTORCH_VERSIONS", "SAMPLE_CHANNEL", "SAMPLE_PLATFORMS",
    "HostPython", "PackageFile", "build_conda_package", "build_sample_channel",
    "build_synthetic_channel", "build_wheel", "channel_url", "host_python", "index_channel",
]

SAMPLE_CHANNEL = "provisioner-sample"
SAMPLE_PLATFORMS = ("linux-64", "win-64")
PYTORCH_VERSIONS = ("2.1.0", "2.2.1")
# cuda version -> (cudnn in the pytorch build string, cuda-cudart version)
CUDA_LINES = {"11.8": ("8.7.0", "11.8.89"), "12.1": ("8.9.2", "12.1.105")}

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
# A conda python's sys.prefix is its env (lib/pythonX.Y/site-packages, or Lib/site-packages).
_lib = os.path.dirname(_here)
sys.prefix = sys.exec_prefix = os.path.dirname(
    _lib if os.path.basename(_lib).lower() == "lib" else os.path.dirname(_lib))
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
        return [marker, *windows_python_files(py)]
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
