"""The host interpreter behind the sample python, and the Windows ``python.exe`` chain.

What can be checked off Windows is checked here for real: where the launcher is
looked for, the files of the win-64 python package, and (with a POSIX interpreter
standing in for the launcher) that a venv python in ``Scripts/`` with its
``pyvenv.cfg`` beside it gets the prefix as ``sys.prefix``, which a python at the
prefix root would not. On windows-latest the full chain runs in
``tests/sample/test_stack.py::test_install_relocated_env_imports``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from provisioner.errors import UserError
from provisioner.sample.host_python import (
    STAND_IN,
    HostPython,
    host_python,
    venv_launcher_candidates,
    windows_python_files,
)

posix_only = pytest.mark.skipif(sys.platform == "win32",
                                reason="runs a POSIX interpreter in place of the venv launcher")


def facts(version: str, base: str = "/py/python.exe", **more: object) -> dict[str, object]:
    return {"version": version, "base_executable": base, "scripts_nt": "/lib/venv/scripts/nt",
            **more}


@pytest.mark.parametrize("version", ["3.10.11", "3.11.9", "3.12.7"])
def test_before_3_13_venv_copies_scripts_nt_python_exe_else_venvlauncher(version: str) -> None:
    # Lib/venv/__init__.py 3.10-3.12, symlink_or_copy: scripts/nt/<python.exe> if it is a file,
    # else (source build, or missing) <dir of the interpreter>/venvlauncher.exe
    j = os.path.join
    assert venv_launcher_candidates(facts(version)) == [
        j("/lib/venv/scripts/nt", "python.exe"), j("/py", "venvlauncher.exe")]
    assert venv_launcher_candidates(facts(version, python_build=True)) == [
        j("/py", "venvlauncher.exe")]
    assert venv_launcher_candidates(facts(version, base="/py/python_d.exe")) == [
        j("/lib/venv/scripts/nt", "python_d.exe"), j("/py", "venvlauncher_d.exe")]


def test_from_3_13_venv_copies_venvlauncher_from_scripts_nt() -> None:
    # Lib/venv/__init__.py 3.13 setup_python (nt): scripts = venv/scripts/nt, or the
    # interpreter's dir in a source build; venvlaunchert.exe when Py_GIL_DISABLED
    j = os.path.join
    assert venv_launcher_candidates(facts("3.13.1")) == [
        j("/lib/venv/scripts/nt", "venvlauncher.exe"), j("/py", "venvlauncher.exe")]
    assert venv_launcher_candidates(facts("3.13.1", gil_disabled=True)) == [
        j("/lib/venv/scripts/nt", "venvlaunchert.exe"), j("/py", "venvlaunchert.exe")]
    assert venv_launcher_candidates(facts("3.14.0", python_build=True)) == [
        j("/py", "venvlauncher.exe")]


def test_host_python_of_this_interpreter() -> None:
    py = host_python()
    assert py.version == ".".join(str(n) for n in sys.version_info[:3])
    base = getattr(sys, "_base_executable", "") or sys.executable
    assert py.home == os.path.dirname(os.path.abspath(base))
    if sys.platform == "win32":
        assert py.venv_launcher is not None and Path(py.venv_launcher).is_file()
        assert Path(py.venv_launcher).read_bytes()[:2] == b"MZ"  # a Windows executable
    else:
        assert py.venv_launcher is None
        off_windows = host_python(windows=True)
        assert off_windows.venv_launcher is None  # there is none to find
        assert os.path.dirname(os.__file__) in off_windows.stdlib_path
        assert not any("site-packages" in p for p in off_windows.stdlib_path)


def test_host_python_of_another_interpreter_and_a_broken_one(tmp_path: Path) -> None:
    other = host_python(str(Path(sys.executable).resolve()))
    assert other.version == host_python().version
    assert Path(other.executable) == Path(sys.executable).resolve()
    # POSIX 3.10 reports a venv's own python as _base_executable; 3.11+ and Windows the base
    assert (Path(other.home) / Path(other.base_executable).name).is_file()
    with pytest.raises(UserError, match="cannot run"):
        host_python(str(tmp_path / "no-such-python"))


def test_win_64_python_files_off_windows_are_stand_ins() -> None:
    py = HostPython("3.12.7", "/host/bin/python3.12", "/host/bin/python3.12",
                    stdlib_path=("/host/lib/python312.zip", "/host/lib/python3.12"))
    files = {f.path: f for f in windows_python_files(py)}
    assert sorted(files) == ["Scripts/python.exe", "python._pth", "python.exe", "pyvenv.cfg"]
    for f in files.values():
        assert not f.executable and not f.text_placeholder  # nothing names the prefix
    assert files["python.exe"].content == files["Scripts/python.exe"].content == STAND_IN
    assert files["pyvenv.cfg"].content.decode().splitlines() == [
        "home = /host/bin", "include-system-site-packages = false", "version = 3.12.7",
        "executable = /host/bin/python3.12"]
    assert files["python._pth"].content.decode().splitlines() == [
        "Lib\\site-packages", "/host/lib/python312.zip", "/host/lib/python3.12"]


def test_win_64_python_files_copy_the_launcher_bytes(tmp_path: Path) -> None:
    launcher = tmp_path / "venvlauncher.exe"
    launcher.write_bytes(b"MZ\x90\x00 a launcher")
    py = HostPython("3.13.1", r"C:\Py\python.exe", r"C:\Py\python.exe", str(launcher))
    files = {f.path: f.content for f in windows_python_files(py)}
    assert files["python.exe"] == files["Scripts/python.exe"] == launcher.read_bytes()


def _windows_like_prefix(prefix: Path) -> Path:
    """The win-64 python package's files, POSIX interpreters in place of the launchers.

    A symlink named ``python`` is found by CPython as the executable, as the launcher's
    path is on Windows (``__PYVENV_LAUNCHER__``); ``python._pth`` and ``pyvenv.cfg`` are
    the package's own bytes (with ``/`` for ``\\``). The site-packages dir is the Windows
    one, ``Lib/site-packages``.
    """
    py = host_python(windows=True)
    real = Path(py.base_executable).resolve()
    prefix.mkdir(parents=True)
    for f in windows_python_files(py):
        if f.path.endswith(".exe"):
            dest = prefix / f.path.removesuffix(".exe")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(real)
        else:  # "Lib\\site-packages" is a relative path on Windows, one odd name on POSIX
            content = f.content.replace(b"Lib\\site-packages", b"Lib/site-packages")
            (prefix / f.path).write_bytes(content)
    pkg = prefix / "Lib" / "site-packages" / "sample_mod"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 42\n", encoding="utf-8")
    return prefix


_PROBE = ("import sys\nimport sample_mod\ntry:\n    import yaml\nexcept ImportError:\n"
          "    yaml = None\nprint(sys.prefix, sample_mod.__file__, sys.flags.isolated, yaml)\n")


def _run(python: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = "/nowhere"  # ignored: a ._pth implies isolated mode
    out = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True,
                         check=True, env=env)
    return out.stdout.split()


@posix_only
@pytest.mark.skipif(sys.version_info < (3, 11),
                    reason="POSIX CPython reads ._pth files from 3.11 (Windows: 3.10 too)")
def test_the_root_python_runs_from_its_pth_in_staging_and_after_the_move(tmp_path: Path) -> None:
    staging = _windows_like_prefix((tmp_path / ".staging-x1").resolve())
    prefix, module, isolated, yaml = _run(staging / "python")
    assert (prefix, isolated, yaml) == (str(staging), "1", "None")
    assert module == str(staging / "Lib" / "site-packages" / "sample_mod" / "__init__.py")
    final = tmp_path / "envs" / "key"
    final.parent.mkdir()
    os.replace(staging, final)  # promotion: nothing in the files named the staging dir
    final = final.resolve()
    prefix, module, isolated, yaml = _run(final / "python")
    assert (prefix, isolated, yaml) == (str(final), "1", "None")
    assert Path(module).is_relative_to(final)


@posix_only
def test_the_venv_python_in_scripts_has_the_prefix_as_sys_prefix(tmp_path: Path) -> None:
    # site.venv(): sys.prefix = dirname(dirname(sys.executable)) -- which is also why the root
    # python.exe needs its ._pth: without one, its sys.prefix would be the prefix's parent.
    prefix = _windows_like_prefix((tmp_path / "envs" / "key").resolve())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    code = "import sys; print(sys.prefix, sys.flags.isolated)"
    out = subprocess.run([str(prefix / "Scripts" / "python"), "-c", code], capture_output=True,
                         text=True, check=True, env=env).stdout.split()
    assert out == [str(prefix), "0"]
    (prefix / "python._pth").unlink()
    out = subprocess.run([str(prefix / "python"), "-c", code], capture_output=True,
                         text=True, check=True, env=env).stdout.split()
    assert out == [str(prefix.parent), "0"]


@pytest.mark.windows_only
@pytest.mark.skipif(sys.platform != "win32", reason="runs the real venvlauncher.exe")
def test_the_real_launchers_on_windows(tmp_path: Path) -> None:
    staging = tmp_path / ".staging-x1"
    for f in windows_python_files(host_python()):
        (staging / f.path).parent.mkdir(parents=True, exist_ok=True)
        (staging / f.path).write_bytes(f.content)
    pkg = staging / "Lib" / "site-packages" / "sample_mod"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 42\n", encoding="utf-8")
    final = tmp_path / "envs" / "key"
    for prefix in (staging, final):
        if prefix == final:
            final.parent.mkdir()
            os.replace(staging, final)
        for python in (prefix / "python.exe", prefix / "Scripts" / "python.exe"):
            out = _run(python)
            assert Path(out[0]).resolve() == prefix.resolve(), python
            assert Path(out[1]).resolve().is_relative_to(prefix.resolve())
            assert out[3] == "None"  # the host's own site-packages stay out
        argv = subprocess.run([str(prefix / "python.exe"), "-c",
                               "import sys; print(sys.argv[1:]); sys.exit(7)", "a b", "c"],
                              capture_output=True, text=True)
        assert (argv.returncode, argv.stdout.strip()) == (7, "['a b', 'c']")
