"""Real legacy venvs for tests: ``python -m venv --without-pip`` plus stub packages.

A venv is created once (about a second) and cloned with ``copytree(symlinks=True)``
for each variant; the stubs are tiny packages that answer what the health
probe asks (``__version__``, ``torch.version.cuda``, ``torch.cuda.is_available()``,
``bitsandbytes.cextension.COMPILED_WITH_CUDA``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from provisioner.contained import pid_alive  # noqa: F401  (re-exported for the tests)
from provisioner.models.legacy import LEGACY_DIR_PREFIX, VENV_DIR, env_id_for_model

#: What the sample's cu121 keys provide, at versions that satisfy them.
HEALTHY = {"torch": "2.2.1", "cuda": "12.1", "transformers": "4.38.0", "accelerate": "0.27.0"}
#: Imports fine and majors match, but transformers is older than ``>=4.36``.
OUTDATED = {**HEALTHY, "transformers": "4.30.0"}


def create_venv(dest: Path) -> Path:
    """A fresh, empty venv at ``dest`` made by the running interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True,
                   capture_output=True, timeout=120)
    return dest


def clone_venv(src: Path, dest: Path) -> Path:
    """Copy a venv (its interpreter stays a symlink to the base python)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest, symlinks=True)
    return dest


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages")) or sorted(
        venv.glob("Lib/site-packages"))
    assert found, f"{venv} has no site-packages"
    return found[0]


def write_package(venv: Path, name: str, files: dict[str, str]) -> Path:
    """Drop package ``name`` (``{relative file: text}``) into the venv's site-packages."""
    pkg = site_packages(venv) / name
    if pkg.exists():
        shutil.rmtree(pkg)
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return pkg


def add_torch(venv: Path, version: str = "2.2.1", cuda: str | None = "12.1",
              available: bool = True) -> None:
    write_package(venv, "torch", {
        "__init__.py": f"__version__ = {version!r}\nfrom . import cuda, version\n",
        "version.py": f"__version__ = {version!r}\ncuda = {cuda!r}\n",
        "cuda.py": f"def is_available():\n    return {available!r}\n",
    })


def add_simple(venv: Path, name: str, version: str) -> None:
    write_package(venv, name, {"__init__.py": f"__version__ = {version!r}\n"})


def add_bitsandbytes(venv: Path, version: str = "0.43.1", with_cuda: bool = True) -> None:
    write_package(venv, "bitsandbytes", {
        "__init__.py": f"__version__ = {version!r}\nfrom . import cextension\n",
        "cextension.py": f"COMPILED_WITH_CUDA = {with_cuda!r}\n",
    })


def add_broken(venv: Path, name: str, message: str = "boom: missing libcudart") -> None:
    write_package(venv, name, {"__init__.py": f"raise ImportError({message!r})\n"})


def populate(venv: Path, versions: dict[str, str], *, bnb: str | None = None) -> Path:
    """Install the stubs named in ``versions`` (keys of :data:`HEALTHY`)."""
    if "torch" in versions:
        add_torch(venv, versions["torch"], versions.get("cuda"))
    for name in ("transformers", "accelerate"):
        if name in versions:
            add_simple(venv, name, versions[name])
    if bnb is not None:
        add_bitsandbytes(venv, bnb)
    return venv


def legacy_dir(root: Path, model_id: str) -> Path:
    """``<root>/local_<id>`` the way the old app named it."""
    return root / f"{LEGACY_DIR_PREFIX}{env_id_for_model(model_id)}"


def make_legacy(base: Path, root: Path, model_id: str, versions: dict[str, str], *,
                bnb: str | None = None) -> Path:
    """A legacy venv for ``model_id`` under ``root`` cloned from ``base``; returns the venv."""
    venv = clone_venv(base, legacy_dir(root, model_id) / VENV_DIR)
    return populate(venv, versions, bnb=bnb)


def hanging_python(venv: Path, pid_dir: Path) -> Path:
    """Replace the venv's interpreter with a script that hangs and leaves a sleeping child.

    Both record their pid in ``pid_dir`` (``sh.pid`` and ``child.pid``).
    """
    python = venv / "bin" / "python"
    python.unlink()
    python.write_text(
        "#!/bin/sh\n"
        f"echo $$ > '{pid_dir}/sh.pid'\n"
        f"sleep 600 & echo $! > '{pid_dir}/child.pid'\n"
        "sleep 600\n",
        encoding="utf-8",
    )
    python.chmod(0o755)
    return python


def script_python(venv: Path, body: str) -> Path:
    """Replace the venv's interpreter with a shell script running ``body``."""
    python = venv / "bin" / "python"
    python.unlink()
    python.write_text("#!/bin/sh\n" + body + "\n", encoding="utf-8")
    python.chmod(0o755)
    return python


#: Stub packages of a migratable legacy venv (healthy for the sample's bnb key).
MIGRATABLE_STUBS = {
    "torch/__init__.py": "from torch import cuda, version\n\n__version__ = '2.2.1'\n",
    "torch/version.py": "__version__ = '2.2.1'\ncuda = '12.1'\n",
    "torch/cuda/__init__.py": "def is_available() -> bool:\n    return True\n",
    "transformers/__init__.py": "__version__ = '4.38.2'\n",
    "accelerate/__init__.py": "__version__ = '0.27.0'\n",
    "bitsandbytes/__init__.py": "__version__ = '0.43.1'\n",
    "bitsandbytes/cextension.py": "COMPILED_WITH_CUDA = True\n",
}


def make_migratable_venv(root: Path, model_id: str) -> Path:
    """A real venv (``python -m venv --without-pip``) at ``local_<id>/.venv`` with stub packages.

    Returns the ``local_<id>`` directory.
    """
    directory = root / f"local_{model_id.replace('/', '--')}"
    venv = directory / ".venv"
    site = site_packages(create_venv(venv))
    for rel, text in MIGRATABLE_STUBS.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text, encoding="utf-8")
    return directory
