"""Filesystem mutations: atomic writes, guarded deletes, retried renames, safe copies."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from provisioner import fsops
from provisioner.errors import BuildError
from provisioner.fsops import (
    MARKER_NAME,
    UnsafeDeleteError,
    atomic_write_bytes,
    atomic_write_text,
    copy_tree_into,
    free_disk_bytes,
    has_marker,
    read_marker,
    read_pointer,
    rename_with_retry,
    replace_pointer,
    safe_rmtree,
    to_extended_path,
    tree_size,
    write_marker,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX modes and symlinks")


# --- atomic writes -----------------------------------------------------------


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_text(target, "one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["state.json"]


@posix_only
def test_atomic_write_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640


def test_failed_replace_keeps_old_content_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state"
    target.write_text("old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state"]


def test_failed_flush_keeps_old_content_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state"
    target.write_text("old")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "simulated full disk")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="full disk"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state"]


def test_atomic_write_with_a_failing_writer_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pack.tar"
    target.write_bytes(b"old")

    def writer(fh: object) -> None:
        fh.write(b"half")  # type: ignore[attr-defined]
        raise OSError(errno.EIO, "the tar writer failed")

    with pytest.raises(OSError, match="tar writer failed"):
        fsops.atomic_write_with(target, writer)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["pack.tar"]


def test_pointer_round_trip(tmp_path: Path) -> None:
    pointer = tmp_path / "active"
    assert read_pointer(pointer) is None
    replace_pointer(pointer, "gen-0001")
    replace_pointer(pointer, "gen-0002")
    assert read_pointer(pointer) == "gen-0002"
    with pytest.raises(ValueError):
        replace_pointer(pointer, "two\nlines")
    with pytest.raises(ValueError):
        replace_pointer(pointer, "")


def test_marker_round_trip(tmp_path: Path) -> None:
    assert not has_marker(tmp_path)
    assert read_marker(tmp_path) is None
    write_marker(tmp_path, "staging")
    assert has_marker(tmp_path)
    assert read_marker(tmp_path) == "staging"
    data = json.loads((tmp_path / MARKER_NAME).read_text())
    assert data == {"owner": "provisioner", "role": "staging"}


# --- safe_rmtree -------------------------------------------------------------


def _marked(path: Path) -> Path:
    path.mkdir(parents=True)
    write_marker(path, "env")
    return path


def test_rmtree_refuses_unmarked_dir(tmp_path: Path) -> None:
    victim = tmp_path / "user-data"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    with pytest.raises(UnsafeDeleteError, match="marker") as info:
        safe_rmtree(victim)
    assert isinstance(info.value, BuildError)
    assert (victim / "precious").read_text() == "keep"


def test_rmtree_missing_path_is_noop(tmp_path: Path) -> None:
    safe_rmtree(tmp_path / "nothing-here")


def test_rmtree_refuses_file_root(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UnsafeDeleteError, match="not a directory"):
        safe_rmtree(f, require_marker=False)
    assert f.exists()


@posix_only
def test_rmtree_refuses_symlink_root(tmp_path: Path) -> None:
    real = _marked(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(UnsafeDeleteError, match="link"):
        safe_rmtree(link)
    assert link.is_symlink()
    assert has_marker(real)


@posix_only
def test_rmtree_refuses_marker_that_is_a_symlink(tmp_path: Path) -> None:
    elsewhere = _marked(tmp_path / "elsewhere")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / MARKER_NAME).symlink_to(elsewhere / MARKER_NAME)
    with pytest.raises(UnsafeDeleteError):
        safe_rmtree(victim)
    assert victim.exists()


def test_rmtree_refuses_root_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    write_marker(home, "env")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    with pytest.raises(UnsafeDeleteError, match="home"):
        safe_rmtree(home)
    with pytest.raises(UnsafeDeleteError, match="home"):
        safe_rmtree(home.parent, require_marker=False)
    with pytest.raises(UnsafeDeleteError, match="root"):
        safe_rmtree(Path(Path.cwd().anchor), require_marker=False)
    assert has_marker(home)


@posix_only
def test_rmtree_unlinks_inner_symlinks_but_keeps_targets(tmp_path: Path) -> None:
    outside_dir = tmp_path / "outside"
    outside_dir.mkdir()
    (outside_dir / "keep.txt").write_text("keep")
    outside_file = tmp_path / "outside.txt"
    outside_file.write_text("keep too")
    env = _marked(tmp_path / "env")
    (env / "lib").mkdir()
    (env / "lib" / "dirlink").symlink_to(outside_dir, target_is_directory=True)
    (env / "filelink").symlink_to(outside_file)
    (env / "dangling").symlink_to(tmp_path / "does-not-exist")

    safe_rmtree(env)

    assert not os.path.lexists(env)
    assert (outside_dir / "keep.txt").read_text() == "keep"
    assert outside_file.read_text() == "keep too"


def test_rmtree_deep_tree(tmp_path: Path) -> None:
    env = _marked(tmp_path / "env")
    deep = env
    for _ in range(300):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("x")
    safe_rmtree(env)
    assert not env.exists()


@posix_only
def test_rmtree_refuses_to_cross_a_mount_point(tmp_path: Path) -> None:
    env = _marked(tmp_path / "env")
    mnt = env / "lib" / "mnt"
    mnt.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "provisioner-test", str(mnt)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "foreign").write_text("not ours")
        with pytest.raises(UnsafeDeleteError, match="mounted"):
            safe_rmtree(env)
        assert (mnt / "foreign").read_text() == "not ours"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _build_read_only_tree(root: Path) -> None:
    _marked(root)
    (root / "bin").mkdir()
    tool = root / "bin" / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o555)
    ro = root / "lib" / "ro"
    ro.mkdir(parents=True)
    (ro / "data").write_text("y")
    (ro / "data").chmod(0o400)
    ro.chmod(0o555)
    sealed = root / "sealed"
    sealed.mkdir()
    (sealed / "secret").write_text("z")
    sealed.chmod(0)
    (root / "lib").chmod(0o500)
    root.chmod(0o555)


def test_rmtree_read_only_files_and_dirs(tmp_path: Path) -> None:
    env = tmp_path / "env"
    _build_read_only_tree(env)
    safe_rmtree(env)
    assert not env.exists()


@pytest.fixture
def unprivileged_dir() -> Iterator[Path]:
    """A directory the 'nobody' user may write, for permission tests run as root."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    base = Path(tempfile.mkdtemp(prefix="provisioner-fsops-"))
    try:
        base.chmod(0o755)
        os.chown(base, 65534, 65534)
        yield base
    finally:
        shutil.rmtree(base)


def test_rmtree_read_only_tree_without_root_privileges(unprivileged_dir: Path) -> None:
    # Root ignores permission bits, so the chmod-and-retry path only runs unprivileged:
    # a forked child drops to 'nobody', builds the tree and deletes it.
    env = unprivileged_dir / "env"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        status = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            _build_read_only_tree(env)
            assert not os.access(env / "sealed", os.R_OK)
            safe_rmtree(env)
            assert not os.path.lexists(env)
            status = 0
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        report = fh.read().decode()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, report
    assert not env.exists()


# --- rename_with_retry -------------------------------------------------------


class FlakyRename:
    """Fails like Windows with a given WinError ``failures`` times, then renames nothing."""

    def __init__(self, failures: int, winerror: int = 32) -> None:
        self.failures = failures
        self.winerror = winerror
        self.calls: list[tuple[str, str]] = []

    def __call__(self, src: str, dst: str) -> None:
        self.calls.append((src, dst))
        if len(self.calls) <= self.failures:
            exc = PermissionError(13, "The process cannot access the file")
            exc.winerror = self.winerror  # type: ignore[attr-defined]
            raise exc


def test_rename_retries_sharing_violation_on_windows() -> None:
    rename = FlakyRename(failures=3)
    sleeps: list[float] = []
    rename_with_retry(Path("a"), Path("b"), sleep=sleeps.append, rename=rename, is_windows=True)
    assert len(rename.calls) == 4
    # Simulated time (the injected sleep records, it does not wait): the backoff doubles,
    # and three violations cost well under a second of the budget.
    assert len(sleeps) == 3
    assert sleeps == [sleeps[0], 2 * sleeps[0], 4 * sleeps[0]] and sleeps[0] > 0
    assert sum(sleeps) < 1.0


def test_rename_retries_access_denied_too() -> None:
    rename = FlakyRename(failures=1, winerror=5)
    sleeps: list[float] = []
    rename_with_retry(Path("a"), Path("b"), sleep=sleeps.append, rename=rename, is_windows=True)
    assert len(sleeps) == 1


def test_rename_denied_for_good_does_not_wait_the_full_budget() -> None:
    """Access denied (WinError 5) may be permanent: retried briefly, unlike a sharing violation."""
    rename = FlakyRename(failures=10_000, winerror=5)
    sleeps: list[float] = []
    with pytest.raises(PermissionError) as info:
        rename_with_retry(
            Path("a"), Path("b"), sleep=sleeps.append, rename=rename, is_windows=True
        )
    assert getattr(info.value, "winerror", None) == 5
    assert sum(sleeps) == pytest.approx(fsops.DENIED_RETRY_BUDGET_S)
    assert fsops.DENIED_RETRY_BUDGET_S < fsops.RENAME_RETRY_BUDGET_S / 10
    # A tree it has just written (promotion, a download) is what scanners hold: full budget.
    fresh: list[float] = []
    with pytest.raises(PermissionError):
        rename_with_retry(Path("a"), Path("b"), sleep=fresh.append, is_windows=True,
                          rename=FlakyRename(failures=10_000, winerror=5),
                          denied_budget=fsops.RENAME_RETRY_BUDGET_S)
    assert sum(fresh) == pytest.approx(fsops.RENAME_RETRY_BUDGET_S)


def test_rename_gives_up_after_budget() -> None:
    rename = FlakyRename(failures=10_000)
    sleeps: list[float] = []
    with pytest.raises(PermissionError) as info:
        rename_with_retry(
            Path("a"), Path("b"), sleep=sleeps.append, rename=rename, is_windows=True
        )
    assert getattr(info.value, "winerror", None) == 32
    assert sum(sleeps) == pytest.approx(25.0)
    assert max(sleeps) <= 2.0
    assert 10 <= len(sleeps) <= 40
    assert len(rename.calls) == len(sleeps) + 1


def test_rename_custom_budget() -> None:
    sleeps: list[float] = []
    with pytest.raises(PermissionError):
        rename_with_retry(
            Path("a"), Path("b"), budget=1.0, sleep=sleeps.append,
            rename=FlakyRename(failures=10_000), is_windows=True,
        )
    assert sum(sleeps) == pytest.approx(1.0)


def test_rename_does_not_retry_off_windows() -> None:
    rename = FlakyRename(failures=1)
    sleeps: list[float] = []
    with pytest.raises(PermissionError):
        rename_with_retry(
            Path("a"), Path("b"), sleep=sleeps.append, rename=rename, is_windows=False
        )
    assert sleeps == []
    assert len(rename.calls) == 1


@pytest.mark.parametrize("is_windows", [True, False])
def test_rename_exdev_propagates_at_once(is_windows: bool) -> None:
    calls: list[tuple[str, str]] = []
    sleeps: list[float] = []

    def cross_device(src: str, dst: str) -> None:
        calls.append((src, dst))
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with pytest.raises(OSError) as info:
        rename_with_retry(
            Path("a"), Path("b"), sleep=sleeps.append, rename=cross_device, is_windows=is_windows
        )
    assert info.value.errno == errno.EXDEV
    assert len(calls) == 1
    assert sleeps == []


def test_rename_other_winerror_not_retried() -> None:
    rename = FlakyRename(failures=1, winerror=2)
    with pytest.raises(PermissionError):
        rename_with_retry(
            Path("a"), Path("b"), sleep=lambda s: None, rename=rename, is_windows=True
        )
    assert len(rename.calls) == 1


def test_rename_real_directory(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    rename_with_retry(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst" / "f").read_text() == "x"
    assert not (tmp_path / "src").exists()


# --- to_extended_path --------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("C:\\a\\..\\b\\c", "\\\\?\\C:\\b\\c"),
        ("C:/x/y", "\\\\?\\C:\\x\\y"),
        ("C:\\x\\.\\y\\", "\\\\?\\C:\\x\\y"),
        ("C:\\", "\\\\?\\C:\\"),
        ("\\\\server\\share\\x", "\\\\?\\UNC\\server\\share\\x"),
        ("//server/share/x/../y", "\\\\?\\UNC\\server\\share\\y"),
        ("\\\\?\\C:\\already\\..\\kept", "\\\\?\\C:\\already\\..\\kept"),
        ("\\\\?\\UNC\\server\\share", "\\\\?\\UNC\\server\\share"),
        ("\\\\.\\pipe\\name", "\\\\.\\pipe\\name"),
    ],
)
def test_extended_path_windows(given: str, expected: str) -> None:
    assert to_extended_path(given, windows=True) == expected


def test_extended_path_accepts_pure_windows_path() -> None:
    assert to_extended_path(PureWindowsPath("D:/envs/k"), windows=True) == "\\\\?\\D:\\envs\\k"


def test_extended_path_long_windows_path() -> None:
    parts = [f"segment{i:03d}" for i in range(30)]
    given = "C:\\" + "\\".join(parts)
    assert len(given) > 300
    result = to_extended_path(given, windows=True)
    assert result == "\\\\?\\" + given
    assert len(result) == len(given) + 4


@pytest.mark.skipif(sys.platform == "win32", reason="relative paths get made absolute there")
def test_extended_path_relative_windows_path_is_only_normalised() -> None:
    assert to_extended_path("a/./b/../c", windows=True) == "a\\c"


@pytest.mark.parametrize("given", ["/opt/envs/k", "relative/../x", "C:\\not\\special"])
def test_extended_path_posix_unchanged(given: str) -> None:
    assert to_extended_path(given, windows=False) == given
    assert to_extended_path(PurePosixPath(given), windows=False) == str(PurePosixPath(given))


@pytest.mark.skipif(sys.platform == "win32", reason="default is POSIX behaviour")
def test_extended_path_defaults_to_host() -> None:
    assert to_extended_path("/opt/x/../y") == "/opt/x/../y"


# --- copy_tree_into ----------------------------------------------------------


def _source_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python3.11").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "python3.11").chmod(0o755)
    (root / "lib" / "pkg").mkdir(parents=True)
    (root / "lib" / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "lib" / "pkg" / "ro.txt").write_text("ro")
    (root / "lib" / "pkg" / "ro.txt").chmod(0o444)
    (root / "empty").mkdir()
    if os.name == "posix":
        (root / "bin" / "python").symlink_to("python3.11")
        (root / "lib" / "abs-link").symlink_to(root / "lib" / "pkg")
        (root / "lib" / "dangling").symlink_to("nowhere")
        (root / "lib" / "pkg").chmod(0o555)


@posix_only
def test_copy_tree_preserves_symlinks_and_modes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _source_tree(src)
    dst = tmp_path / "out" / "env"
    dst.parent.mkdir()
    copy_tree_into(src, dst)

    assert (dst / "lib" / "pkg" / "mod.py").read_text() == "x = 1\n"
    assert os.readlink(dst / "bin" / "python") == "python3.11"
    assert os.readlink(dst / "lib" / "abs-link") == str(src / "lib" / "pkg")
    assert os.readlink(dst / "lib" / "dangling") == "nowhere"
    assert stat.S_IMODE((dst / "bin" / "python3.11").stat().st_mode) == 0o755
    assert stat.S_IMODE((dst / "lib" / "pkg" / "ro.txt").stat().st_mode) == 0o444
    assert stat.S_IMODE((dst / "lib" / "pkg").stat().st_mode) == 0o555
    assert (dst / "empty").is_dir()
    assert subprocess.run([dst / "bin" / "python"], capture_output=True).stdout == b"hi\n"
    assert os.listdir(dst.parent) == ["env"]
    (src / "lib" / "pkg").chmod(0o755)


def test_copy_tree_refuses_existing_dst(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("new")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "f").write_text("old")
    with pytest.raises(BuildError, match="already exists"):
        copy_tree_into(src, dst)
    assert (dst / "f").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]


def test_copy_tree_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    for i in range(10):
        (src / f"d{i}").mkdir(parents=True)
        (src / f"d{i}" / "file").write_text(str(i))
    (src / "d3").chmod(0o500)
    real_copy2 = shutil.copy2
    copied: list[str] = []

    def copy2_failing_on_sixth(s: str, d: str, *, follow_symlinks: bool = True) -> object:
        if len(copied) == 5:
            raise OSError(errno.ENOSPC, "simulated full disk")
        copied.append(s)
        return real_copy2(s, d, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(shutil, "copy2", copy2_failing_on_sixth)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError, match="full disk"):
        copy_tree_into(src, out / "env")
    assert len(copied) == 5
    assert os.listdir(out) == []
    (src / "d3").chmod(0o755)


def test_copy_tree_unreadable_source_fails_cleanly(unprivileged_dir: Path) -> None:
    src = unprivileged_dir / "src"
    (src / "sealed").mkdir(parents=True)
    (src / "sealed").chmod(0)
    out = unprivileged_dir / "out"
    out.mkdir()
    for p in (src, src / "sealed", out):
        os.chown(p, 65534, 65534)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                copy_tree_into(src, out / "env")
            except PermissionError:
                code = 0 if os.listdir(out) == [] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert stat.S_IMODE((src / "sealed").stat().st_mode) == 0, "the source must not be chmodded"


def test_copy_tree_rename_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    out = tmp_path / "out"
    out.mkdir()

    def cross_device(a: object, b: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", cross_device)
    with pytest.raises(OSError) as info:
        copy_tree_into(src, out / "env")
    assert info.value.errno == errno.EXDEV
    assert os.listdir(out) == []


def test_copy_tree_temp_name_is_hidden_sibling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    seen: list[tuple[str, str]] = []
    real_rename = os.rename

    def spy(a: str, b: str) -> None:
        seen.append((a, b))
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", spy)
    copy_tree_into(src, tmp_path / "env")
    (tmp_name, final), = seen
    assert Path(final) == tmp_path / "env"
    assert Path(tmp_name).parent == tmp_path
    assert Path(tmp_name).name.startswith(".env.copy-")


# --- sizes -------------------------------------------------------------------


def test_tree_size_counts_hardlinks_once_and_skips_symlinks(tmp_path: Path) -> None:
    big = tmp_path / "big-outside"
    big.write_bytes(b"x" * 10_000)
    env = tmp_path / "env"
    (env / "sub").mkdir(parents=True)
    (env / "a").write_bytes(b"a" * 100)
    (env / "sub" / "b").write_bytes(b"b" * 50)
    os.link(env / "a", env / "sub" / "a-again")
    if os.name == "posix":
        (env / "link-to-big").symlink_to(big)
    assert tree_size(env) == 150
    assert tree_size(env / "a") == 100
    assert tree_size(tmp_path / "missing") == 0


def test_free_disk_bytes_for_missing_path(tmp_path: Path) -> None:
    assert free_disk_bytes(tmp_path / "not" / "yet") > 0
    assert fsops.free_disk_bytes(tmp_path) > 0


def test_remove_file_removes_read_only_files_and_ignores_missing(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("x")
    target.chmod(0o444)
    fsops.remove_file(target)
    assert not target.exists()
    fsops.remove_file(target)  # already gone: no error


# --- the marker goes last ----------------------------------------------------


def _marked_tree(root: Path) -> Path:
    tree = root / "stage"
    (tree / "lib" / "deep").mkdir(parents=True)
    for i in range(5):
        (tree / "lib" / "deep" / f"f{i}").write_text("x")
    (tree / "top.txt").write_text("x")
    fsops.write_marker(tree, "env")
    return tree


def test_safe_rmtree_deletes_the_marker_last(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _marked_tree(tmp_path)
    order: list[str] = []
    real_unlink = os.unlink

    def spy(path: str, *args: object, **kwargs: object) -> None:
        order.append(os.path.basename(path))
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", spy)
    fsops.safe_rmtree(tree)
    assert not tree.exists()
    assert order[-1] == fsops.MARKER_NAME and order.count(fsops.MARKER_NAME) == 1
    assert len(order) == 7


def test_an_interrupted_removal_can_be_resumed(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _marked_tree(tmp_path)
    real_unlink = os.unlink
    calls = []

    def dies_on_third(path: str, *args: object, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as good as a kill for what is left on disk
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        fsops.safe_rmtree(tree)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert fsops.has_marker(tree)  # still provably ours
    fsops.safe_rmtree(tree)  # so the next attempt needs no help
    assert not tree.exists()


def test_a_write_during_removal_leaves_the_tree_marked(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _marked_tree(tmp_path)
    real_rmdir = os.rmdir

    def late_writer(path: str, *args: object, **kwargs: object) -> None:
        if os.path.abspath(path) == str(tree) and not (tree / "late.pyc").exists():
            (tree / "late.pyc").write_text("x")  # a process still writing into the tree
        real_rmdir(path)

    monkeypatch.setattr(os, "rmdir", late_writer)
    with pytest.raises(OSError):
        fsops.safe_rmtree(tree)
    assert fsops.read_marker(tree) == "env"
    monkeypatch.setattr(os, "rmdir", real_rmdir)
    fsops.safe_rmtree(tree)
    assert not tree.exists()
