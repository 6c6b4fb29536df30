"""Legacy per-model venvs: ``<legacy root>/local_<id>/.venv`` made by the old app with pip.

A venv's model id comes from, in order:

1. ``local_<id>/model.json`` (``{"model_id": "org/name"}``), written by newer app versions;
2. the ``[legacy.models]`` table of ``provisioner.toml`` (``"<id>" = "org/name"``);
3. the derivation the old app used: ``/`` in a model id became ``--``, so
   ``local_meta-llama--Llama-2-7b-hf`` is ``meta-llama/Llama-2-7b-hf``.

Discovery never follows a symlink out of the legacy root.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LEGACY_DIR_PREFIX = "local_"
VENV_DIR = ".venv"


@dataclass(frozen=True)
class LegacyEnv:
    """One legacy per-model venv found on disk."""

    env_id: str
    model_id: str
    root: Path  # the local_<id> directory (what migration deletes)
    venv: Path
    python: Path | None  # None when the interpreter is missing
    layout: str  # "posix" or "windows"
    mapped_by: str  # "model.json", "config" or "derived"

    def to_dict(self) -> dict[str, object]:
        return {
            "env_id": self.env_id, "model_id": self.model_id, "root": str(self.root),
            "venv": str(self.venv), "python": str(self.python) if self.python else None,
            "layout": self.layout, "mapped_by": self.mapped_by,
        }


def env_id_for_model(model_id: str) -> str:
    """The old app's directory id for a model id (``org/name`` -> ``org--name``)."""
    return model_id.replace("/", "--")


def model_for_env_id(env_id: str) -> str:
    """Inverse of :func:`env_id_for_model`."""
    return env_id.replace("--", "/", 1)


def venv_python(venv: Path) -> tuple[Path | None, str]:
    """The interpreter of a venv in either layout, and which layout it has."""
    windows = venv / "Scripts" / "python.exe"
    posix = venv / "bin" / "python"
    if windows.exists():
        return windows, "windows"
    if posix.exists() or posix.is_symlink():
        return (posix if posix.exists() else None), "posix"
    return None, "windows" if (venv / "Scripts").is_dir() else "posix"


def base_interpreter(venv: Path, layout: str) -> Path | None:
    """The base interpreter named by the ``home =`` line of the venv's ``pyvenv.cfg``.

    On Windows a venv's ``Scripts\\python.exe`` is a copy of a redirector that
    starts ``<home>\\python.exe``: uninstalling the base Python leaves the venv's
    own files untouched. ``None`` without a readable ``home``; a missing base is
    returned all the same (its absence is what a health signature must see).
    """
    try:
        text = (venv / "pyvenv.cfg").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    home = next((value.strip() for key, sep, value in
                 (line.partition("=") for line in text.splitlines())
                 if sep and key.strip().lower() == "home" and value.strip()), None)
    if home is None:
        return None
    names = ("python.exe",) if layout == "windows" else ("python3", "python")
    found = [Path(home) / n for n in names]
    return next((p for p in found if p.exists()), found[0])


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


def _model_id(directory: Path, env_id: str, explicit: Mapping[str, str]) -> tuple[str, str]:
    meta = directory / "model.json"
    if meta.is_file() and _inside(meta, directory):
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("model_id"), str):
                return data["model_id"], "model.json"
        except (OSError, ValueError):
            pass
    if env_id in explicit:
        return explicit[env_id], "config"
    return model_for_env_id(env_id), "derived"


def discover_legacy(
    root: Path | None, explicit: Mapping[str, str] | None = None
) -> list[LegacyEnv]:
    """Every ``local_<id>/.venv`` under ``root``, sorted by model id."""
    if root is None or not root.is_dir():
        return []
    found = []
    for directory in sorted(root.iterdir()):
        if not directory.name.startswith(LEGACY_DIR_PREFIX) or directory.is_symlink():
            continue
        venv = directory / VENV_DIR
        if not venv.is_dir() or not _inside(venv, root):
            continue
        env_id = directory.name[len(LEGACY_DIR_PREFIX):]
        python, layout = venv_python(venv)
        if python is not None and not _inside(python.parent, root):
            python = None
        model_id, mapped_by = _model_id(directory, env_id, explicit or {})
        found.append(LegacyEnv(env_id, model_id, directory, venv, python, layout, mapped_by))
    return sorted(found, key=lambda e: e.model_id)


def legacy_for_model(
    root: Path | None, model_id: str, explicit: Mapping[str, str] | None = None
) -> LegacyEnv | None:
    """The legacy venv of ``model_id``, if one exists."""
    if root is None:
        return None
    direct = root / f"{LEGACY_DIR_PREFIX}{env_id_for_model(model_id)}"
    if (direct / VENV_DIR).is_dir() and not direct.is_symlink() and \
            _inside(direct / VENV_DIR, root):
        python, layout = venv_python(direct / VENV_DIR)
        if python is not None and not _inside(python.parent, root):
            python = None
        found_id, mapped_by = _model_id(direct, env_id_for_model(model_id), explicit or {})
        if found_id == model_id:
            return LegacyEnv(env_id_for_model(model_id), model_id, direct, direct / VENV_DIR,
                             python, layout, mapped_by)
    for env in discover_legacy(root, explicit):
        if env.model_id == model_id:
            return env
    return None
