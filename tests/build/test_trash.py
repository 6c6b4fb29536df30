"""Envs, staging dirs and legacy venvs leave by one rename into ``.trash/``, never half-deleted.

Files another process holds open are the one injected fault (an OS boundary:
``os.unlink`` / ``os.rename`` raise what Windows raises, ``PermissionError`` with
``winerror`` 32, for chosen paths). The running-python test is real: a child
python holds a file of an old generation open while ``gc`` runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from winsupport import needs_symlinks

from provisioner import fsops
from provisioner.build.ensure import ensure
from provisioner.build.layout import FINGERPRINT_NAME, HomeLayout, read_pointer
from provisioner.build.maintenance import collect_garbage, verify_env
from provisioner.build.trash import cleanup, discard, move_to_trash, purge
from provisioner.config import Config, load_config
from provisioner.fsops import MARKER_NAME, InUseError
from provisioner.lock.spec import spec_path
from provisioner.lock.write import lock_envs

CPU = "sample-cpu-transformers"
GEN = "0123456789ab"
SCHEMA = Path(__file__).parents[2] / "docs" / "schemas" / "gc.schema.json"


def windows_error(path: str) -> PermissionError:
    exc = PermissionError(errno.EACCES, "The process cannot access the file", path)
    exc.winerror = 32  # type: ignore[attr-defined]
    return exc


def hold(monkeypatch: pytest.MonkeyPatch, name: str, paths: set[str]) -> list[str]:
    """``os.<name>`` fails with a sharing violation for ``paths`` (names or full paths)."""
    real = getattr(os, name)
    attempts: list[str] = []

    def fake(src: str, *args: object, **kwargs: object) -> None:
        name = os.fspath(src).removeprefix("\\\\?\\")  # as provisioner spells it on Windows
        if name in paths or os.path.basename(name) in paths:
            attempts.append(name)
            raise windows_error(name)
        real(src, *args, **kwargs)

    monkeypatch.setattr(os, name, fake)
    monkeypatch.setattr(fsops, "DELETE_RETRY_BUDGET_S", 0.1)
    return attempts


def make_env(path: Path) -> Path:
    """A marked tree shaped like a generation: a fingerprint, a python, a package dir."""
    (path / "Lib" / "site-packages" / "pkg").mkdir(parents=True)
    (path / "Lib" / "site-packages" / "pkg" / "core.dll").write_bytes(b"x" * 1000)
    (path / "python.exe").write_bytes(b"exe")
    (path / "pyvenv.cfg").write_text("home = C:\\Python311\n", encoding="utf-8")
    (path / FINGERPRINT_NAME).write_text("{}", encoding="utf-8")
    fsops.write_marker(path, "env")
    return path


@pytest.fixture
def layout(tmp_path: Path) -> HomeLayout:
    return HomeLayout(tmp_path / "home")


def test_discard_renames_into_the_trash_then_deletes(layout: HomeLayout,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_env(layout.generation_dir(CPU, GEN))
    moves: list[tuple[str, str]] = []
    real_rename = os.rename
    def rename(a: str, b: str) -> None:
        moves.append((a.removeprefix("\\\\?\\"), b.removeprefix("\\\\?\\")))
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    gone = discard(layout, env)
    assert not env.exists() and gone.in_use == ()
    assert gone.trashed.parent == layout.trash and gone.trashed.name.startswith(f"{CPU}.{GEN}.")
    assert moves == [(str(env), str(gone.trashed))]  # one rename, out of envs/, first
    assert not gone.trashed.exists() and list(layout.trash.iterdir()) == []


def test_files_in_use_stay_in_the_trash_whole_enough_for_the_next_gc(
        layout: HomeLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_env(layout.generation_dir(CPU, GEN))
    hold(monkeypatch, "unlink", {"python.exe"})
    gone = discard(layout, env)
    assert not env.exists(), "envs/ never holds a half-deleted generation"
    assert [Path(p).name for p in gone.in_use] == ["python.exe"]
    for name in (MARKER_NAME, FINGERPRINT_NAME, "pyvenv.cfg", "python.exe"):
        assert (gone.trashed / name).is_file(), name
    assert not (gone.trashed / "Lib").exists()


def test_a_refused_rename_moves_nothing(layout: HomeLayout,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_env(layout.generation_dir(CPU, GEN))
    hold(monkeypatch, "rename", {str(env)})
    with pytest.raises(InUseError) as info:
        discard(layout, env)
    assert info.value.in_use == (str(env),) and info.value.exit_code == 2
    assert (env / "Lib" / "site-packages" / "pkg" / "core.dll").is_file()
    assert (env / MARKER_NAME).is_file() and list(layout.trash.iterdir()) == []


@needs_symlinks
def test_discard_refuses_what_is_not_provisioners(layout: HomeLayout, tmp_path: Path) -> None:
    foreign = tmp_path / "home" / "envs" / CPU / GEN
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(fsops.UnsafeDeleteError, match="marker"):
        discard(layout, foreign)
    link = foreign.with_name("fedcba987654")
    link.symlink_to(foreign, target_is_directory=True)
    with pytest.raises(fsops.UnsafeDeleteError, match="not a directory"):
        discard(layout, link, require_marker=False)
    assert (foreign / "notes.txt").is_file() and link.is_symlink()


def test_cleanup_logs_and_never_raises(layout: HomeLayout, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    foreign = layout.staging / f"{CPU}.{GEN}.abc123"
    foreign.mkdir(parents=True)
    held = make_env(layout.staging / f"{CPU}.{GEN}.def456")
    hold(monkeypatch, "unlink", {"core.dll"})
    with caplog.at_level(logging.WARNING, logger="provisioner.build.trash"):
        cleanup(layout, foreign, "removing a leftover")
        cleanup(layout, held, "cleaning up a failed build")
        cleanup(layout, tmp_path / "missing", "nothing there")
    assert foreign.is_dir(), "an unmarked dir is never deleted"
    assert "could not remove" in caplog.text and "marker" in caplog.text
    assert "in use" in caplog.text and not held.exists()


def test_gc_reports_files_in_use_and_the_next_gc_finishes(
        config: Config, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    layout = HomeLayout(config.home)
    stale = make_env(layout.staging / f"{CPU}.{GEN}.a1b2c3")
    real_unlink = os.unlink
    attempts = hold(monkeypatch, "unlink", {"core.dll"})
    with caplog.at_level(logging.WARNING, logger="provisioner.build.trash"):
        report = collect_garbage(config)
    [held] = report.in_use
    assert (held.kind, held.key) == ("staging", CPU) and held.path.parent == layout.trash
    assert [Path(f).name for f in held.files] == ["core.dll"] and len(attempts) > 1
    assert (held.path / MARKER_NAME).is_file() and (held.path / FINGERPRINT_NAME).is_file()
    assert not stale.exists() and report.removed == ()
    data = report.to_dict()
    jsonschema.validate(data, json.loads(SCHEMA.read_text(encoding="utf-8")))
    assert data["in_use"] == [{"kind": "staging", "key": CPU, "path": str(held.path),
                               "files": list(held.files)}]
    lines = [r for r in caplog.records if "in use" in r.getMessage()]
    assert len(lines) == 1 and str(held.path) in lines[0].getMessage()

    from click.testing import CliRunner

    from provisioner.cli import cli

    text = CliRunner().invoke(cli, ["--home", str(config.home), "gc", "--project",
                                    str(config.project)])
    assert text.exit_code == 0, text.output
    assert f"in use  {held.path}: 1 file(s) held open by another process" in text.output
    assert (held.path / MARKER_NAME).is_file()

    monkeypatch.setattr(os, "unlink", real_unlink)  # the program that held it exited
    again = collect_garbage(config)
    assert [(i.kind, i.path) for i in again.removed] == [("trash", held.path)]
    assert again.in_use == () and list(layout.trash.iterdir()) == []


def relock_with(config: Config, key: str, python_spec: str) -> None:
    """Change ``key``'s spec (same packages, new content hash) and relock it."""
    path = spec_path(config.specs_dir, key)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["dependencies"] = [python_spec if d.startswith("python") else d
                            for d in data["dependencies"]]
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    (outcome,) = lock_envs(config, [key])
    assert outcome.changed


HOLDER = """
import sys
held = open(sys.argv[1], "rb")
print("holding", flush=True)
sys.stdin.readline()
print(len(held.read()), flush=True)
"""


def test_gc_while_a_running_python_holds_a_file_of_an_old_generation(
        shared_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real on Windows (the open file and the running python.exe refuse deletion);
    on POSIX the open file does not, and gc's outcome must be as consistent either way."""
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")
    project = tmp_path / "project"
    shutil.copytree(shared_project, project)
    config = load_config(project, home=tmp_path / "home", environ={})
    old = ensure(config, CPU)
    relock_with(config, CPU, "python >=3")
    new = ensure(config, CPU)
    assert old.prefix != new.prefix
    held_file = next(p for p in (old.prefix / "conda-meta").iterdir() if p.suffix == ".json")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    child = subprocess.Popen([str(old.python), "-c", HOLDER, str(held_file)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        report = collect_garbage(config, keep=0)
        assert child.poll() is None, "gc never stops a program that uses an env"
        if report.removed:
            assert [(i.kind, i.path) for i in report.removed] == [("generation", old.prefix)]
            assert report.in_use == () and not old.prefix.exists()
        else:  # Windows: the open file and the running python.exe are refused
            [held] = report.in_use
            assert held.kind == "generation" and (held.path / MARKER_NAME).is_file()
            assert held.path == old.prefix or not old.prefix.exists()
        if sys.platform != "win32":
            assert report.removed and not report.in_use
        assert read_pointer(HomeLayout(config.home), CPU) == new.prefix.name
        assert verify_env(config, CPU).ok
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert int(child.stdout.readline()) > 0  # the file it held is still readable
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=60)
    assert child.returncode == 0
    after = collect_garbage(config, keep=0)
    assert after.in_use == () and not old.prefix.exists()
    layout = HomeLayout(config.home)
    assert not layout.trash.exists() or list(layout.trash.iterdir()) == []
    assert {p.name for p in layout.key_dir(CPU).iterdir()} >= {"current", new.prefix.name}
    assert not (layout.key_dir(CPU) / old.prefix.name).exists()


def test_purge_logs_every_failure_and_never_raises(layout: HomeLayout,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    trashed = move_to_trash(layout, make_env(layout.generation_dir(CPU, GEN)))
    real_unlink = os.unlink

    def read_only(path: str, *args: object, **kwargs: object) -> None:
        if os.path.basename(path) == "core.dll":
            raise OSError(errno.EROFS, "Read-only file system", path)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", read_only)
    with caplog.at_level(logging.WARNING, logger="provisioner.build.trash"):
        purge(trashed, "removing the old env")
    assert "could not remove" in caplog.text and "Read-only" in caplog.text
    assert (trashed / MARKER_NAME).is_file()  # the next gc tries again
    monkeypatch.setattr(os, "unlink", real_unlink)
    purge(trashed, "removing the old env")
    assert not trashed.exists()
