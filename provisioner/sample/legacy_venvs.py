"""Sample legacy per-model venvs, as the old app made them (for the demo and tests).

A real venv (``python -m venv --without-pip``) with small stub packages in its
site-packages: ``torch`` (reporting ``__version__``, ``version.cuda`` and
``cuda.is_available()``), ``transformers``, ``accelerate`` and ``bitsandbytes``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

from provisioner import fsops, processes
from provisioner.errors import BuildError
from provisioner.models.legacy import LEGACY_DIR_PREFIX, VENV_DIR, env_id_for_model

_TORCH = '__version__ = "{version}"\nfrom torch import cuda, version  # noqa: E402,F401\n'
_TORCH_VERSION = 'cuda = {cuda!r}\n'
_TORCH_CUDA = "def is_available():\n    return {available!r}\n"
_PLAIN = '__version__ = "{version}"\n'
_BNB_EXT = "COMPILED_WITH_CUDA = True\nBNB_BACKEND = 'CUDA'\n"


def _site_packages(venv: Path) -> Path:
    if sys.platform == "win32":
        return venv / "Lib" / "site-packages"
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def make_legacy_venv(
    legacy_root: Path,
    model_id: str,
    packages: Mapping[str, str],
    *,
    cuda: str | None = "12.1",
    python: str | None = None,
) -> Path:
    """Create ``<legacy_root>/local_<id>/.venv`` with stub ``packages`` (name -> version)."""
    root = legacy_root / f"{LEGACY_DIR_PREFIX}{env_id_for_model(model_id)}"
    venv = root / VENV_DIR
    result = processes.run([python or sys.executable, "-m", "venv", "--without-pip", str(venv)],
                       timeout=300)
    if not result.ok:
        raise BuildError(f"could not create a venv at {venv}: {result.stderr.strip()[-200:]}")
    site = _site_packages(venv)
    for name, version in packages.items():
        pkg = site / name
        pkg.mkdir(parents=True, exist_ok=True)
        if name == "torch":
            fsops.atomic_write_text(pkg / "__init__.py", _TORCH.format(version=version))
            fsops.atomic_write_text(pkg / "version.py", _TORCH_VERSION.format(cuda=cuda))
            fsops.atomic_write_text(pkg / "cuda.py",
                                    _TORCH_CUDA.format(available=cuda is not None))
        else:
            fsops.atomic_write_text(pkg / "__init__.py", _PLAIN.format(version=version))
        if name == "bitsandbytes":
            fsops.atomic_write_text(pkg / "cextension.py", _BNB_EXT)
    fsops.atomic_write_text(root / "model.json", json.dumps({"model_id": model_id}) + "\n")
    return venv
