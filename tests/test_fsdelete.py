"""Deletion that never half-deletes: the tree's identity last, files in use retried and reported.

Windows refuses to delete a running ``python.exe`` or a loaded DLL. That refusal is
an OS boundary, so it is injected here by making ``os.unlink`` / ``os.rmdir`` raise
what Windows raises (``PermissionError`` with ``winerror`` 32, 5 or 145) for chosen
paths; everything else is really deleted.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from provisioner import fsops
from provisioner.fsdelete import safe_rmtree
from provisioner.fsops import MARKER_NAME, InUseError, write_marker

LAST = (".provisioner-fingerprint.json", "pyvenv.cfg", ".venv/pyvenv.cfg")


def plain(path: str | os.PathLike[str]) -> str:
    """``path`` without the ``\\\\?\\`` prefix that provisioner hands the OS on Windows."""
    return os.fspath(path).removeprefix("\\\\?\\")


def windows_error(winerror: int, path: str) -> PermissionError:
    exc = PermissionError(errno.EACCES, "The process cannot access the file", path)
    exc.winerror = winerror  # type: ignore[attr-defined]
    return exc


class InUse:
    """Makes ``os.<name>`` fail like Windows for the given paths, ``times`` times each."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, paths: list[Path],
                 error: Callable[[str], OSError], times: int = 10**9) -> None:
        self.real = getattr(os, name)
        self.paths = {os.fspath(p) for p in paths}
        self.error = error
        self.left = dict.fromkeys(self.paths, times)
        self.attempts: list[str] = []
        monkeypatch.setattr(os, name, self)

    def __call__(self, path: str, *args: object, **kwargs: object) -> None:
        key = plain(path)
        if key in self.paths:
            self.attempts.append(key)
            if self.left[key] > 0:
                self.left[key] -= 1
                raise self.error(key)
        self.real(path, *args, **kwargs)


@pytest.fixture
def env(tmp_path: Path) -> Path:
    """A marked env-like tree: binaries, a package dir, a fingerprint, a venv's pyvenv.cfg."""
    root = tmp_path / "env"
    (root / "Lib" / "site-packages" / "torch").mkdir(parents=True)
    (root / "Lib" / "site-packages" / "torch" / "torch_cpu.dll").write_bytes(b"dll")
    (root / "Lib" / "site-packages" / "torch" / "__init__.py").write_text("", encoding="utf-8")
    (root / "python.exe").write_bytes(b"exe")
    (root / "python311.dll").write_bytes(b"dll")
    (root / ".venv").mkdir()
    for rel in LAST:
        (root / rel).write_text("identity\n", encoding="utf-8")
    write_marker(root, "env")
    return root


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    monkeypatch.setattr(fsops, "DELETE_RETRY_BUDGET_S", 0.4)
    yield []


def test_identity_goes_after_everything_and_the_marker_last(
        env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_unlink = os.unlink

    def spy(path: str, *args: object, **kwargs: object) -> None:
        order.append(os.path.relpath(plain(path), env).replace(os.sep, "/"))
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", spy)
    safe_rmtree(env, last=LAST)
    assert not env.exists()
    assert order[-1] == MARKER_NAME
    assert set(order[-1 - len(LAST):-1]) == set(LAST)
    assert {"python.exe", "python311.dll", "Lib/site-packages/torch/torch_cpu.dll"} <= set(
        order[:-1 - len(LAST)])


def test_a_file_in_use_is_retried_then_reported_and_the_identity_survives(
        env: Path, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]) -> None:
    held = env / "python.exe"
    fault = InUse(monkeypatch, "unlink", [held], lambda p: windows_error(32, p))
    with pytest.raises(InUseError) as info:
        safe_rmtree(env, last=LAST, sleep=sleeps.append)
    assert info.value.in_use == (str(held),)
    assert str(held) in info.value.message and info.value.hint
    assert info.value.exit_code == 2
    assert len(fault.attempts) > 2 and sum(sleeps) == pytest.approx(0.4)  # bounded retries
    # Everything else is gone; what makes it an env (and provisioner's) is still there.
    assert held.is_file() and (env / MARKER_NAME).is_file()
    assert all((env / rel).is_file() for rel in LAST)
    assert not (env / "Lib").exists() and not (env / "python311.dll").exists()

    monkeypatch.setattr(os, "unlink", fault.real)  # the program exited
    safe_rmtree(env, last=LAST)
    assert not env.exists()


def test_a_file_released_during_the_retries_is_deleted(
        env: Path, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]) -> None:
    held = env / "Lib" / "site-packages" / "torch" / "torch_cpu.dll"
    fault = InUse(monkeypatch, "unlink", [held], lambda p: windows_error(5, p), times=2)
    safe_rmtree(env, last=LAST, sleep=sleeps.append)
    assert not env.exists()
    assert fault.attempts == [str(held)] * 3 and sleeps  # released while it waited


def test_a_directory_with_a_delete_pending_file_is_reported(
        env: Path, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]) -> None:
    pending = env / "Lib" / "site-packages" / "torch"
    InUse(monkeypatch, "rmdir", [pending], lambda p: windows_error(145, p))
    with pytest.raises(InUseError) as info:
        safe_rmtree(env, last=LAST, sleep=sleeps.append)
    assert info.value.in_use == (str(pending),)
    assert pending.is_dir() and not any(pending.iterdir())
    assert (env / MARKER_NAME).is_file() and (env / "pyvenv.cfg").is_file()


@pytest.mark.parametrize("code", [errno.EBUSY, errno.ETXTBSY, errno.EACCES])
def test_posix_busy_errors_count_as_in_use(env: Path, monkeypatch: pytest.MonkeyPatch,
                                           sleeps: list[float], code: int) -> None:
    if fsops._IS_WINDOWS:
        pytest.skip("Windows reports files in use by WinError, not errno")
    held = env / "python311.dll"
    InUse(monkeypatch, "unlink", [held], lambda p: OSError(code, os.strerror(code), p))
    with pytest.raises(InUseError):
        safe_rmtree(env, last=LAST, sleep=sleeps.append)
    assert held.is_file() and (env / MARKER_NAME).is_file()


def test_other_errors_propagate_at_once(env: Path, monkeypatch: pytest.MonkeyPatch,
                                        sleeps: list[float]) -> None:
    held = env / "python311.dll"
    fault = InUse(monkeypatch, "unlink", [held], lambda p: OSError(errno.EROFS, "read-only", p))
    with pytest.raises(OSError) as info:
        safe_rmtree(env, last=LAST, sleep=sleeps.append)
    assert info.value.errno == errno.EROFS and not isinstance(info.value, InUseError)
    assert sleeps == [] and len(fault.attempts) == 1
    assert (env / MARKER_NAME).is_file()


def test_unmarked_tree_keeps_its_last_paths_until_the_rest_is_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]) -> None:
    venv = tmp_path / "venv"
    (venv / "Scripts").mkdir(parents=True)
    (venv / "Scripts" / "python.exe").write_bytes(b"exe")
    (venv / "pyvenv.cfg").write_text("home = C:\\Python311\n", encoding="utf-8")
    fault = InUse(monkeypatch, "unlink", [venv / "Scripts" / "python.exe"],
                  lambda p: windows_error(32, p))
    with pytest.raises(InUseError):
        safe_rmtree(venv, require_marker=False, last=LAST, sleep=sleeps.append)
    assert (venv / "pyvenv.cfg").is_file(), "a venv that lost pyvenv.cfg no longer starts"
    monkeypatch.setattr(os, "unlink", fault.real)
    safe_rmtree(venv, require_marker=False, last=LAST)
    assert not venv.exists()


def test_is_in_use_reads_winerror_first() -> None:
    assert fsops.is_in_use(windows_error(32, "x"))
    assert fsops.is_in_use(windows_error(145, "x"))
    assert not fsops.is_in_use(windows_error(2, "x"))
    assert not fsops.is_in_use(OSError(errno.ENOENT, "missing"))
