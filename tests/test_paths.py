"""Readers that ride out Windows sharing violations (injected on Linux with ``winerror`` set)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import LongSpelling

from provisioner import fsops, paths
from provisioner.models.state import StateFile
from provisioner.paths import read_bytes_retrying


def sharing_violation(winerror: int = 32) -> PermissionError:
    """What Windows raises while another process replaces the file."""
    exc = PermissionError(13, "The process cannot access the file", "x")
    exc.winerror = winerror  # type: ignore[attr-defined]  # only Windows' OSError has it
    return exc


def violate(monkeypatch: pytest.MonkeyPatch, target: Path, times: int | None,
            winerror: int = 32) -> list[str]:
    """Make reads of ``target`` fail ``times`` times (None: always); other files read as usual."""
    real: Callable[[str], bytes] = paths._read_file
    failures: list[str] = []

    def read(path: str) -> bytes:
        if Path(path) == target and (times is None or len(failures) < times):
            failures.append(path)
            raise sharing_violation(winerror)
        return real(path)

    monkeypatch.setattr(paths, "_read_file", read)
    return failures


@pytest.mark.parametrize("winerror", [5, 32])
def test_a_passing_sharing_violation_is_ridden_out(tmp_path: Path, winerror: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"data")
    failures = violate(monkeypatch, target, 3, winerror)
    slept: list[float] = []
    assert read_bytes_retrying(target, sleep=slept.append) == b"data"
    assert len(failures) == 3
    assert len(slept) == 3 and slept == sorted(slept) and slept[0] < slept[-1]  # backoff


def test_a_lasting_violation_gives_up_after_the_budget(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"data")
    failures = violate(monkeypatch, target, None)
    slept: list[float] = []
    with pytest.raises(PermissionError) as info:
        read_bytes_retrying(target, budget=1.0, sleep=slept.append)
    assert getattr(info.value, "winerror", None) == 32  # the real error, kept
    assert sum(slept) == pytest.approx(1.0)  # bounded: never more than the budget
    assert len(failures) == len(slept) + 1


def test_other_errors_are_not_retried(tmp_path: Path) -> None:
    slept: list[float] = []
    with pytest.raises(FileNotFoundError):
        read_bytes_retrying(tmp_path / "missing", sleep=slept.append)
    with pytest.raises(IsADirectoryError):
        read_bytes_retrying(tmp_path, sleep=slept.append)
    assert slept == []


def test_a_posix_permission_error_is_not_retried(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f"

    def denied(path: str) -> bytes:
        raise PermissionError(13, "Permission denied", path)  # no winerror: POSIX

    monkeypatch.setattr(paths, "_read_file", denied)
    slept: list[float] = []
    with pytest.raises(PermissionError):
        read_bytes_retrying(target, sleep=slept.append)
    assert slept == []


def test_the_current_pointer_is_read_through_a_replace(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pointer = tmp_path / "current"
    fsops.replace_pointer(pointer, "g-0123")
    failures = violate(monkeypatch, pointer, 2)
    assert fsops.read_pointer(pointer) == "g-0123"
    assert len(failures) == 2


def test_the_home_pointer_reader_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner.build.layout import HomeLayout, generation_name, read_pointer

    layout = HomeLayout(tmp_path / "home")
    gen = generation_name("0" * 64)
    layout.pointer("k").parent.mkdir(parents=True)
    fsops.replace_pointer(layout.pointer("k"), gen)
    failures = violate(monkeypatch, layout.pointer("k"), 2)
    assert read_pointer(layout, "k") == gen
    assert len(failures) == 2


STATE = {"schema": 1, "models": {"org/m": {"key": "k"}}, "health": {}, "lock_hashes": {},
         "rules": {}, "migrations": {}}


def test_the_state_file_is_loaded_through_a_replace(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(STATE), encoding="utf-8")
    violate(monkeypatch, path, 2)
    assert StateFile(path).data["models"] == {"org/m": {"key": "k"}}


def test_a_failed_state_load_is_never_saved_over(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(STATE), encoding="utf-8")
    monkeypatch.setattr(paths, "READ_RETRY_BUDGET_S", 0.02)
    failures = violate(monkeypatch, path, None)
    state = StateFile(path)  # the load fails: an empty state in memory, with a warning
    assert state.data["models"] == {}
    state.put("models", "org/other", {"key": "k2"})
    before = path.read_bytes()
    state.save()  # the re-read under the lock fails too: nothing is written
    assert path.read_bytes() == before
    monkeypatch.undo()  # the other process's replace is done
    assert failures
    state.save()  # now the change is merged into what is on disk, not over it
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["models"] == {"org/m": {"key": "k"}, "org/other": {"key": "k2"}}


def test_tree_size_uses_the_extended_length_spelling(tmp_path: Path,
                                                     long_spelling: LongSpelling) -> None:
    real = tmp_path / "env"
    (real / "Lib" / "site-packages").mkdir(parents=True)
    (real / "Lib" / "site-packages" / "big.dll").write_bytes(b"x" * 300)
    (real / "python.exe").write_bytes(b"x" * 20)
    plain = long_spelling.route(real, paths)
    assert not plain.exists() and paths.tree_size(plain) == 320
