"""The state file: a versioned JSON cache, written atomically, never fatal."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from provisioner.models.state import STATE_SCHEMA, StateFile, stat_signature


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "state.json"


def test_missing_file_is_empty_and_not_written(path: Path) -> None:
    state = StateFile(path)
    assert state.data["schema"] == STATE_SCHEMA
    assert state.section("models") == {} and not state.dirty
    state.save()
    assert not path.exists()


def test_round_trip(path: Path) -> None:
    state = StateFile(path)
    state.put("models", "org/m", {"env_key": "k", "source": "shared", "last_used": 1.5})
    state.put("health", "/v", {"sig": [1, 2, 3], "result": {"status": "healthy"}})
    assert state.dirty
    state.save()
    assert not state.dirty and path.is_file()
    again = StateFile(path)
    assert again.data == state.data
    assert again.section("models")["org/m"]["source"] == "shared"
    assert json.loads(path.read_text(encoding="utf-8"))["schema"] == STATE_SCHEMA


def test_section_is_created_on_demand(path: Path) -> None:
    state = StateFile(path)
    state.section("new")["x"] = 1
    assert state.data["new"] == {"x": 1}


def test_save_is_atomic(path: Path, monkeypatch: pytest.MonkeyPatch,
                        caplog: pytest.LogCaptureFixture) -> None:
    state = StateFile(path)
    state.put("models", "a", {"env_key": "k1"})
    state.save()
    before = path.read_bytes()

    def fail(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    state.put("models", "b", {"env_key": "k2"})
    with caplog.at_level(logging.WARNING, logger="provisioner.models.state"):
        state.save()  # not fatal
    assert "could not save state file" in caplog.text
    assert state.dirty, "a failed save keeps the change for the next save"
    assert path.read_bytes() == before, "the old state file is intact"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json", "state.json.lock"], \
        "no temp left over (the lock file stays, as OS lock files must)"
    monkeypatch.undo()
    state.save()
    assert set(StateFile(path).section("models")) == {"a", "b"}


@pytest.mark.parametrize("content", [
    b"\x00\xff\xfegarbage",
    b"{truncated",
    b"[]",
    b'{"schema": 0, "models": {}}',
    b'{"models": {"a": 1}}',
])
def test_corrupt_file_is_rebuilt_with_a_warning(path: Path, content: bytes,
                                                caplog: pytest.LogCaptureFixture) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="provisioner.models.state"):
        state = StateFile(path)
    assert "corrupt or of another version" in caplog.text
    assert state.section("models") == {}
    state.put("models", "m", {"env_key": "k"})
    state.save()
    assert StateFile(path).section("models") == {"m": {"env_key": "k"}}
    (aside,) = path.parent.glob("state.json.corrupt-*")
    assert aside.read_bytes() == content, "the old bytes are kept, not overwritten"


def test_newer_schema_is_never_overwritten(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.parent.mkdir(parents=True)
    newer = json.dumps({"schema": STATE_SCHEMA + 1, "models": {"x": {"v": 2}}}).encode()
    path.write_bytes(newer)
    with caplog.at_level(logging.WARNING, logger="provisioner.models.state"):
        for _ in range(3):
            state = StateFile(path)
            assert state.read_only and state.section("models") == {}
            state.put("models", "m", {"env_key": "k"})
            state.save()
    assert path.read_bytes() == newer
    assert caplog.text.count("written by a newer provisioner") == 1, "warned once"
    assert list(path.parent.glob("state.json.corrupt-*")) == []


def test_a_file_that_turns_newer_before_the_save_is_left_alone(path: Path) -> None:
    state = StateFile(path)
    state.put("models", "m", {"env_key": "k"})
    path.parent.mkdir(parents=True, exist_ok=True)
    newer = json.dumps({"schema": STATE_SCHEMA + 5}).encode()
    path.write_bytes(newer)  # a newer provisioner wrote it meanwhile
    state.save()
    assert path.read_bytes() == newer


_WRITER = """
import sys
from pathlib import Path
from provisioner.models.state import StateFile
path, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(count):
    state = StateFile(path)
    state.put("models", f"{name}-{i}", {"i": i})
    state.save()
"""


def test_concurrent_read_modify_writes_lose_nothing(path: Path) -> None:
    """8 processes x 50 updates, each a fresh load, put and save: all 400 survive."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"w{n}", "50"])
             for n in range(8)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 8
    models = StateFile(path).section("models")
    assert len(models) == 400
    assert all(models[f"w{n}-{i}"] == {"i": i} for n in range(8) for i in range(50))


def test_delete_is_saved(path: Path) -> None:
    state = StateFile(path)
    state.put("health", "a", {"x": 1})
    state.put("health", "b", {"x": 2})
    state.save()
    other = StateFile(path)
    other.delete("health", "a")
    other.save()
    assert StateFile(path).section("health") == {"b": {"x": 2}}


def test_wrong_section_types_are_reset(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema": STATE_SCHEMA, "models": [], "health": "x",
                                "rules": {"m": {"key": "k"}}}), encoding="utf-8")
    state = StateFile(path)
    assert state.section("models") == {} and state.section("health") == {}
    assert state.section("rules") == {"m": {"key": "k"}}


def test_unreadable_file_is_not_fatal(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.mkdir(parents=True)  # a directory where the file should be
    with caplog.at_level(logging.WARNING, logger="provisioner.models.state"):
        state = StateFile(path)
        state.put("models", "m", {})
        state.save()
    assert state.section("models") == {"m": {}}
    assert "state file" in caplog.text


def test_unchanged_state_is_not_rewritten(path: Path) -> None:
    state = StateFile(path)
    state.put("models", "m", {"env_key": "k", "n": [1, 2]})
    state.save()
    old = 1_000_000_000_000_000_000
    os.utime(path, ns=(old, old))
    signature = stat_signature(path)

    again = StateFile(path)
    again.put("models", "m", {"env_key": "k", "n": [1, 2]})  # equal value: no change
    assert not again.dirty
    again.save()
    assert stat_signature(path) == signature
    assert path.stat().st_mtime_ns == old

    again.put("models", "m", {"env_key": "k2"})
    again.save()
    assert path.stat().st_mtime_ns != old


def test_stat_signature(tmp_path: Path) -> None:
    assert stat_signature(tmp_path / "missing") is None
    f = tmp_path / "f"
    f.write_text("abc", encoding="utf-8")
    sig = stat_signature(f)
    assert sig is not None and sig[0] == 3
    f.write_text("abcd", encoding="utf-8")
    assert stat_signature(f) != sig


def test_a_failed_load_is_never_saved_over(path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Windows: another process's os.replace holds the file (WinError 32) past the retries."""
    import builtins

    from provisioner import paths

    first = StateFile(path)
    first.put("models", "kept", {"env_key": "k"})
    first.save()
    before = path.read_bytes()
    held = {"on": True}

    def sharing_violation(file: object, *args: object, **kwargs: object) -> object:
        if held["on"] and os.fspath(file) == str(path):  # type: ignore[call-overload]
            exc = PermissionError(13, "The process cannot access the file", str(path))
            exc.winerror = 32  # type: ignore[attr-defined]
            raise exc
        return builtins.open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(paths, "open", sharing_violation, raising=False)
    monkeypatch.setattr(paths, "READ_RETRY_BUDGET_S", 0.05)
    with caplog.at_level(logging.WARNING, logger="provisioner.models.state"):
        state = StateFile(path)
        assert state.section("models") == {}  # works from an empty state...
        state.put("models", "new", {"env_key": "n"})
        state.save()  # ...and its save re-reads, fails again, and writes nothing
    assert path.read_bytes() == before
    assert "cannot read state file" in caplog.text and "could not save" in caplog.text

    held["on"] = False  # the other process is done: the change merges into what is there
    state.save()
    merged = StateFile(path).section("models")
    assert merged == {"kept": {"env_key": "k"}, "new": {"env_key": "n"}}
