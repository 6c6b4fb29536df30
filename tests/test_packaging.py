"""The distribution: its metadata, and the built wheel installed outside the source tree.

The wheel test builds the wheel from a copy of the sources (offline, with this
environment's setuptools), installs it with ``--no-deps`` into a fresh venv that
borrows this environment's third-party packages through a ``.pth`` file, and runs
``provisioner demo`` from a temp directory: a test of the wheel, not of the
editable install. ``.ci/wheel-check`` does the same with a full install from the
package index.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
DIST = "gpu-env-provisioner"


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{argv}\n{result.stdout}\n{result.stderr}"
    return result


def _clean_env() -> dict[str, str]:
    """This environment without anything that would point a child at the source tree."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith("PROVISIONER_")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


# --- metadata ------------------------------------------------------------------------------


def test_distribution_name_is_not_the_taken_one_and_the_command_stays() -> None:
    assert PROJECT["name"] == DIST  # "provisioner" belongs to another project on PyPI
    assert PROJECT["scripts"] == {"provisioner": "provisioner.cli:main"}
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["provisioner*"]


def test_license_is_an_spdx_expression_with_the_mit_text_shipped() -> None:
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text
    # PEP 639 (SPDX string + license-files) needs setuptools 77; older ones reject the string.
    [backend] = PYPROJECT["build-system"]["requires"]
    assert backend == "setuptools>=77"
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # PEP 639


def test_classifiers_are_known_and_match_the_supported_pythons() -> None:
    import trove_classifiers as trove  # the test extra

    classifiers = PROJECT["classifiers"]
    assert classifiers == sorted(classifiers)
    unknown = [c for c in classifiers if c not in trove.classifiers]
    assert not unknown
    versions = {c.rsplit(" ", 1)[1] for c in classifiers
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert versions == {"3.10", "3.11", "3.12", "3.13"}
    assert PROJECT["requires-python"] == ">=3.10"
    assert "Typing :: Typed" in classifiers


def test_py_typed_is_package_data() -> None:
    assert (REPO / "provisioner" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["provisioner"]


def test_project_urls_if_any_are_absolute_https() -> None:
    for label, url in PROJECT.get("urls", {}).items():
        assert re.match(r"https://[^/\s]+\.[a-z]{2,}/", url), f"{label}: {url}"


# --- the wheel -----------------------------------------------------------------------------


def _subpackages() -> set[str]:
    return {str(p.parent.relative_to(REPO).as_posix())
            for p in (REPO / "provisioner").rglob("__init__.py") if "__pycache__" not in p.parts}


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel, built offline from a copy of the sources (the tree stays untouched)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "provisioner", src / "provisioner",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)], cwd=tmp_path,
         env=_clean_env())
    [wheel] = (tmp_path / "dist").glob("*.whl")
    return wheel


def _venv_with_wheel(tmp_path: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel installed; returns its python."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    scripts = venv / ("Scripts" if sys.platform == "win32" else "bin")
    python = scripts / ("python.exe" if sys.platform == "win32" else "python")
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp_path, env=_clean_env()).stdout.strip())
    # The dependencies come from this environment: one directory per line, which a .pth file
    # appends to sys.path without running the editable-install hooks that live there.
    ours = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (site / "_deps_of_the_test_env.pth").write_text("\n".join(ours) + "\n", encoding="utf-8")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "-q", str(wheel)], cwd=tmp_path, env=_clean_env())
    return python


@pytest.mark.wheel
def test_the_wheel_installs_and_runs_the_demo_outside_the_source_tree(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    assert wheel.name == "gpu_env_provisioner-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read("gpu_env_provisioner-0.1.0.dist-info/METADATA").decode()
        entry_points = zf.read("gpu_env_provisioner-0.1.0.dist-info/entry_points.txt").decode()
    assert "provisioner/py.typed" in names
    assert "gpu_env_provisioner-0.1.0.dist-info/licenses/LICENSE" in names
    missing = {f"{pkg}/__init__.py" for pkg in _subpackages()} - names
    data = {p.relative_to(REPO).as_posix() for p in (REPO / "provisioner").rglob("*")
            if p.suffix in (".json", ".gz")}
    missing |= data - names  # data files the code reads at run time
    assert not missing, f"subpackages left out of the wheel: {sorted(missing)}"
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "provisioner").rglob("*.py")}
    assert sources <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert "Name: gpu-env-provisioner\n" in meta
    assert "License-Expression: MIT\n" in meta
    assert "provisioner = provisioner.cli:main" in entry_points

    python = _venv_with_wheel(tmp_path, wheel)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = _run([str(python), "-c", "import provisioner; print(provisioner.__file__)"],
                 cwd=cwd, env=_clean_env()).stdout.strip()
    assert Path(where).resolve().is_relative_to((tmp_path / "venv").resolve())
    table = _run([str(python), "-c", "from provisioner.lock.pypi_names import load_table; "
                  "print(load_table().channels['conda-forge']['python-xxhash'])"],
                 cwd=cwd, env=_clean_env())
    assert table.stdout.strip() == "xxhash"  # the conda -> PyPI table is package data

    exe = python.parent / ("provisioner.exe" if sys.platform == "win32" else "provisioner")
    home = tmp_path / "demo-home"
    demo = _run([str(exe), "demo", "--home", str(home), "--json"], cwd=cwd, env=_clean_env())
    report = json.loads(demo.stdout)
    assert len(report["scenarios"]) == 4
    assert any(home.iterdir()), "the demo wrote nothing under --home"
