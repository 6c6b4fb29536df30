"""What differs on Windows, for tests: script folders, fake executables, the long-paths leg.

CI runs the suite on a default Windows leg (``LongPathsEnabled=1``, as GitHub's runners
ship) and on one with ``LongPathsEnabled=0`` set in the registry first; that leg sets
``PROVISIONER_TEST_LONG_PATHS=off`` so tests know which outcome to expect.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

IS_WINDOWS = sys.platform == "win32"
#: the environment variable the CI legs set: ``off`` on the ``LongPathsEnabled=0`` leg
LONG_PATHS_VAR = "PROVISIONER_TEST_LONG_PATHS"
#: where a conda prefix (or an extracted package) keeps its site-packages, as a glob
SITE_GLOB = "Lib/site-packages" if IS_WINDOWS else "lib/python*/site-packages"
#: the exit status of a process that killed itself with SIGKILL: Windows has no signals, and
#: os.kill there is TerminateProcess with the number as exit code (SIGTERM: SIGKILL is absent)
SELF_KILLED_RC = 15 if IS_WINDOWS else -9


def venv_scripts(venv: Path) -> Path:
    """A venv's script folder: ``Scripts`` on Windows, ``bin`` elsewhere."""
    return venv / ("Scripts" if IS_WINDOWS else "bin")


def long_paths_off() -> bool:
    """Whether this run is the CI leg with Windows long paths turned off."""
    return os.environ.get(LONG_PATHS_VAR, "").strip().lower() == "off"


def fake_executable(folder: Path, name: str, source: str) -> Path:
    """A program ``name`` in ``folder`` that runs the Python ``source`` with this interpreter.

    POSIX: one file with a ``#!`` line. Windows runs no ``#!`` files, so there it is
    ``name.py`` plus ``name.bat`` calling this interpreter on it (``%*`` passes the
    arguments on); :func:`shutil.which` finds ``name`` through ``PATHEXT``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if not IS_WINDOWS:
        exe = folder / name
        exe.write_text(f"#!{sys.executable}\n{source}", encoding="utf-8", newline="\n")
        exe.chmod(0o755)
        return exe
    script = folder / f"{name}.py"
    script.write_text(source, encoding="utf-8")
    exe = folder / f"{name}.bat"
    # The last command's exit status is the batch file's (cmd /c returns it).
    exe.write_text(f'@"{sys.executable}" "%~dp0{name}.py" %*\r\n', encoding="utf-8",
                   newline="")
    return exe


def venv_interpreter(venv: Path) -> Path:
    """A venv's python: ``Scripts\\python.exe`` on Windows, ``bin/python`` elsewhere."""
    return venv_scripts(venv) / ("python.exe" if IS_WINDOWS else "python")


def _symlinks_work() -> bool:
    if not IS_WINDOWS:
        return True
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            os.symlink(tmp, os.path.join(tmp, "link"), target_is_directory=True)
        except OSError:  # no SeCreateSymbolicLinkPrivilege: neither admin nor Developer Mode
            return False
    return True


#: Windows creates symlinks only as an administrator or in Developer Mode (GitHub's
#: runners have it on); a test that needs one is skipped, with that reason, elsewhere.
needs_symlinks = pytest.mark.skipif(
    not _symlinks_work(), reason="symlinks need Developer Mode or an administrator on Windows")
