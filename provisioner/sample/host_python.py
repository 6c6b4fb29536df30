r"""The host interpreter behind the sample ``python`` package, and its files per platform.

On POSIX the sample ``python`` is a ``/bin/sh`` launcher that runs the host
interpreter with the prefix's ``site-packages`` first on ``sys.path``.

On Windows it is a real ``python.exe``: a copy of the host's venv launcher
(``venvlauncher.exe``, taken where CPython's :mod:`venv` takes it) with a
``pyvenv.cfg`` whose ``home`` is the host interpreter's directory, as
``python -m venv`` writes it. The package is a venv as ``venv`` makes one
(``pyvenv.cfg`` at the root, the launcher at ``Scripts\python.exe``), plus the
conda-layout ``python.exe`` at the root, a second copy of the launcher. For that
one, ``site.py`` would take the *parent* of the launcher's directory as
``sys.prefix`` (it does for any venv python), so a ``python._pth`` beside it
lists ``Lib\site-packages`` (relative: the prefix wherever it is, in staging or
promoted) and the host's standard library; CPython reads a ``._pth`` next to
the launcher that started it (``getpath.py`` 3.11+, ``getpathp.c`` 3.10), takes
its directory as ``sys.prefix`` and runs isolated. Nothing in these files names
the install prefix, so a staged env runs before it is promoted.

A win-64 channel built on Linux or macOS has no launcher to copy: its
``python.exe`` files are text stand-ins, not executable, and nothing runs them
(envs are only built for the host platform).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from provisioner import processes
from provisioner.errors import ToolMissingError, UserError
from provisioner.sample.packages import PackageFile

STAND_IN = b"provisioner-sample stand-in for python.exe: built off Windows, never executed\n"

# Run with -I -S: what CPython's venv module looks at to pick the launcher
# (Lib/venv/__init__.py, 3.10-3.13), and sys.path without site: the standard library.
_PROBE = (
    "import json, os, sys, sysconfig, venv\n"
    "print(json.dumps({'version': '%d.%d.%d' % sys.version_info[:3],\n"
    "    'base_executable': os.path.abspath(getattr(sys, '_base_executable', '')\n"
    "                                       or sys.executable),\n"
    "    'scripts_nt': os.path.join(os.path.dirname(venv.__file__), 'scripts', 'nt'),\n"
    "    'python_build': sysconfig.is_python_build(),\n"
    "    'gil_disabled': bool(sysconfig.get_config_var('Py_GIL_DISABLED')),\n"
    "    'stdlib_path': [p for p in sys.path if p]}))\n"
)


@dataclass(frozen=True)
class HostPython:
    """The interpreter that the sample ``python`` package launches."""

    version: str  # X.Y.Z
    executable: str
    base_executable: str = ""  # the interpreter behind a venv's python; "" = executable
    venv_launcher: str | None = None  # Windows: the venvlauncher.exe to copy
    stdlib_path: tuple[str, ...] = ()  # sys.path without site (for python._pth)

    @property
    def xy(self) -> str:
        return ".".join(self.version.split(".")[:2])

    @property
    def home(self) -> str:
        """The directory ``pyvenv.cfg``'s ``home`` names: the base interpreter's."""
        return os.path.dirname(self.base_executable or self.executable)


def venv_launcher_candidates(facts: dict[str, object]) -> list[str]:
    """Where ``python -m venv`` takes the Windows launcher from, in its order of preference.

    3.13+: ``venvlauncher.exe`` (``venvlaunchert.exe`` when free-threaded) from venv's
    ``scripts/nt``, or next to the interpreter (a source build; other layouts may too).
    3.10-3.12: venv's ``scripts/nt/python.exe`` (the launcher under its installed name), else
    ``venvlauncher.exe`` next to the interpreter. ``_d`` for debug builds.
    """
    base = str(facts["base_executable"])
    home, scripts = os.path.dirname(base), str(facts["scripts_nt"])
    debug = "_d" if os.path.splitext(os.path.basename(base))[0].endswith("_d") else ""
    major, minor = (int(n) for n in str(facts["version"]).split(".")[:2])
    if (major, minor) >= (3, 13):
        name = f"venvlauncher{'t' if facts.get('gil_disabled') else ''}{debug}.exe"
        # venv itself has no fallback here; a launcher next to the interpreter is a last resort
        found = [] if facts.get("python_build") else [os.path.join(scripts, name)]
        return [*found, os.path.join(home, name)]
    found = [] if facts.get("python_build") else [os.path.join(scripts, f"python{debug}.exe")]
    return [*found, os.path.join(home, f"venvlauncher{debug}.exe")]


def _facts_of(python_executable: str) -> dict[str, object]:
    try:
        result = processes.run([python_executable, "-I", "-S", "-c", _PROBE], timeout=60)
    except ToolMissingError:
        result = None
    facts: object = None
    if result is not None and result.returncode == 0:
        try:
            facts = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            facts = None
    if not isinstance(facts, dict):
        raise UserError(
            f"cannot run the python interpreter {python_executable!r}",
            hint="pass the path of a working python 3 interpreter",
        )
    return facts


def host_python(python_executable: str | None = None, *,
                windows: bool | None = None) -> HostPython:
    """Version and path of ``python_executable`` (default: this interpreter).

    With ``windows`` (default: on Windows) also its venv launcher and standard library
    path, which the Windows sample ``python`` needs; that takes one child process.
    """
    windows = sys.platform == "win32" if windows is None else windows
    current = python_executable is None or python_executable == sys.executable
    if current and not windows:
        base = getattr(sys, "_base_executable", "") or sys.executable
        return HostPython(".".join(str(n) for n in sys.version_info[:3]),
                          os.path.abspath(sys.executable), os.path.abspath(base))
    executable = os.path.abspath(python_executable or sys.executable)
    facts = _facts_of(executable)
    launcher = None
    if windows:
        launcher = next((c for c in venv_launcher_candidates(facts) if os.path.isfile(c)), None)
    stdlib = facts.get("stdlib_path")
    return HostPython(str(facts["version"]), executable, str(facts["base_executable"]), launcher,
                      tuple(str(p) for p in stdlib) if isinstance(stdlib, list) else ())


def _pyvenv_cfg(py: HostPython) -> bytes:
    lines = [f"home = {py.home}", "include-system-site-packages = false",
             f"version = {py.version}", f"executable = {py.base_executable or py.executable}"]
    return ("\n".join(lines) + "\n").encode()


def windows_python_files(py: HostPython) -> list[PackageFile]:
    """A venv (``pyvenv.cfg``, ``Scripts\\python.exe``) plus the root ``python.exe`` and
    its ``python._pth`` (see the module doc)."""
    if py.venv_launcher is not None:
        with open(py.venv_launcher, "rb") as fh:
            launcher = fh.read()
    elif sys.platform == "win32":
        raise UserError(
            f"{py.executable} has no venv launcher (venvlauncher.exe) to copy",
            hint="use a CPython 3.10+ whose `python -m venv` works (the python.org one does)",
        )
    else:
        launcher = STAND_IN
    pth = "\n".join(["Lib\\site-packages", *py.stdlib_path]) + "\n"
    return [
        PackageFile("python.exe", launcher),
        PackageFile("python._pth", pth.encode()),
        PackageFile("pyvenv.cfg", _pyvenv_cfg(py)),
        PackageFile("Scripts/python.exe", launcher),
    ]
