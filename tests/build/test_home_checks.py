"""Hostile homes: links and files where the home's own dirs belong, broken pointers.

Each case builds a real env, then vandalises the home and points links at a
canary directory outside it (holding provisioner-marked dirs named like
staging dirs and generations, the most tempting targets). Every case must be
refused (exit 2, one line naming the path) or healed, the canary untouched, and
the host process alive: a ``get_env_for_model`` call in this process returns or
raises a ``ProvisionerError``, never anything else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from winsupport import needs_symlinks

from provisioner import fsops
from provisioner.build.ensure import ensure
from provisioner.build.home_checks import heal_pointer, pointer_problem
from provisioner.build.layout import HomeLayout, read_pointer
from provisioner.build.maintenance import collect_garbage
from provisioner.config import Config
from provisioner.errors import EXIT_USER_ERROR, HomeLayoutError, ProvisionerError
from provisioner.models.resolve import get_env_for_model

CPU = "sample-cpu-transformers"
MODEL = "gpt2"


@pytest.fixture(autouse=True)
def _cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """Outside the home: plain files, and marked dirs named like provisioner's own."""
    root = tmp_path / "canary"
    (root / "plain" / "deep").mkdir(parents=True)
    (root / "plain" / "deep" / "f.txt").write_text("keep", encoding="utf-8")
    for name in (f"{CPU}.{'a' * 12}.abc123", "a" * 12, f"{CPU}.{'b' * 12}.0123abcd"):
        (root / name).mkdir()
        fsops.write_marker(root / name, "env")
        (root / name / "data").write_text("keep", encoding="utf-8")
    return root


def snapshot(root: Path) -> list[tuple[str, str]]:
    return sorted((str(p.relative_to(root)), p.read_text(encoding="utf-8") if p.is_file()
                   else "<dir>") for p in root.rglob("*"))


def relink(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        os.rename(path, path.with_name(path.name + ".orig"))
    elif os.path.lexists(path):
        path.unlink()
    path.symlink_to(target, target_is_directory=True)


def replace_with_file(path: Path) -> None:
    if path.is_dir():
        os.rename(path, path.with_name(path.name + ".orig"))
    path.write_text("not a directory", encoding="utf-8")


def host_call(config: Config) -> str:
    """What a host app sees: a resolution's source, or the error's exit code."""
    try:
        return get_env_for_model(MODEL, config=config, build=True).source
    except ProvisionerError as exc:
        return f"exit {exc.exit_code}"


HEALED: dict[str, Callable[[HomeLayout, Path], None]] = {
    "trash-link": lambda lay, c: relink(lay.trash, c),
    "staging-link": lambda lay, c: relink(lay.staging, c),
    "trash-file": lambda lay, c: replace_with_file(lay.trash),
    "staging-file": lambda lay, c: replace_with_file(lay.staging),
    "envs-file": lambda lay, c: replace_with_file(lay.envs),
    "key-file": lambda lay, c: replace_with_file(lay.key_dir(CPU)),
    "locks-file": lambda lay, c: replace_with_file(lay.locks),
}


def _cases(table: Mapping[str, object], *, links: tuple[str, ...] = ("link",)) -> list[object]:
    """The table's cases; those that make a symlink need Windows' symlink right."""
    return [pytest.param(c, marks=needs_symlinks) if any(w in c for w in links) else c
            for c in sorted(table)]


@pytest.mark.parametrize("case", _cases(HEALED))
def test_links_and_files_in_scratch_places_are_moved_aside(config: Config, canary: Path,
                                                           case: str) -> None:
    layout = HomeLayout(config.home)
    ensure(config, CPU)
    layout.trash.mkdir(exist_ok=True)
    before = snapshot(canary)
    HEALED[case](layout, canary)

    collect_garbage(config)
    result = ensure(config, CPU)
    assert result.python.exists()
    assert host_call(config) == "shared"
    collect_garbage(config)
    assert snapshot(canary) == before, "nothing outside the home changed"
    for path in (layout.trash, layout.staging, layout.envs, layout.locks):
        assert not path.is_symlink() and (path.is_dir() or not path.exists())
    assert list(config.home.glob("**/*.moved-aside-*")), "the odd thing was kept, aside"


REFUSED: dict[str, Callable[[HomeLayout, Path], Path]] = {
    "envs-link": lambda lay, c: (relink(lay.envs, c), lay.envs)[1],
    "key-link": lambda lay, c: (relink(lay.key_dir(CPU), c), lay.key_dir(CPU))[1],
    "locks-link": lambda lay, c: (relink(lay.locks, c), lay.locks)[1],
}


@pytest.mark.parametrize("case", _cases(REFUSED))
def test_links_in_data_places_are_refused_with_exit_2(config: Config, canary: Path,
                                                      case: str) -> None:
    layout = HomeLayout(config.home)
    ensure(config, CPU)
    before = snapshot(canary)
    path = REFUSED[case](layout, canary)

    calls: list[Callable[[], object]] = [lambda: ensure(config, CPU)]
    if case != "key-link":  # gc never walks a linked key dir: it is no key dir to gc
        calls.append(lambda: collect_garbage(config))
    for call in calls:
        with pytest.raises(HomeLayoutError) as info:
            call()
        assert str(path) in info.value.message and info.value.exit_code == EXIT_USER_ERROR
        assert info.value.hint
    assert host_call(config) in ("exit 2", "shared")  # the host app lives on
    env = {**os.environ, "PROVISIONER_HOME": str(config.home)}
    for args in (["ensure", CPU], ["gc"]):
        cli = subprocess.run([sys.executable, "-m", "provisioner", *args, "--project",
                              str(config.project)], capture_output=True, text=True, env=env,
                             timeout=120, check=False)
        if case == "key-link" and args == ["gc"]:
            assert cli.returncode == 0, cli.stderr  # gc never walks it: it is not a key dir
            continue
        assert cli.returncode == EXIT_USER_ERROR, cli.stderr
        assert f"error: {path} is a link" in cli.stderr and "hint:" in cli.stderr
    assert snapshot(canary) == before


POINTERS: dict[str, Callable[[Path, Path], None]] = {
    "a directory": lambda p, c: (p.unlink(), p.mkdir(), (p / "x").write_text("x"))[0],
    "a dangling link": lambda p, c: (p.unlink(), p.symlink_to(c / "missing"))[0],
    "a link outside": lambda p, c: (p.unlink(), p.symlink_to(c / ("a" * 12)))[0],
    "a path outside": lambda p, c: p.write_text(f"../../../canary/{'a' * 12}\n"),
    "a missing generation": lambda p, c: p.write_text("0123456789ab\n"),
    "binary garbage": lambda p, c: p.write_bytes(b"\xff\xfe\x00"),
}


@pytest.mark.parametrize("case", _cases(POINTERS))
def test_a_broken_pointer_heals_from_the_newest_valid_fingerprint(config: Config,
                                                                  canary: Path,
                                                                  case: str) -> None:
    layout = HomeLayout(config.home)
    built = ensure(config, CPU)
    before = snapshot(canary)
    POINTERS[case](layout.pointer(CPU), canary)
    assert read_pointer(layout, CPU) != built.generation and pointer_problem(layout, CPU)

    dry = collect_garbage(config, dry_run=True, keep=0)
    assert all("pointer" in k.reason for k in dry.why_kept), "kept until healed"
    assert host_call(config) == "shared"  # heals on the way (ensure, under the key's lock)
    assert read_pointer(layout, CPU) == built.generation
    assert pointer_problem(layout, CPU) is None
    collect_garbage(config, keep=0)
    assert built.prefix.is_dir() and snapshot(canary) == before


def test_a_broken_pointer_without_any_ready_generation_is_removed(config: Config) -> None:
    layout = HomeLayout(config.home)
    built = ensure(config, CPU)
    (built.prefix / ".provisioner-fingerprint.json").unlink()
    layout.pointer(CPU).unlink()
    layout.pointer(CPU).mkdir()
    assert "no ready generation" in (heal_pointer(layout, CPU) or "")
    assert not os.path.lexists(layout.pointer(CPU))
    assert ensure(config, CPU).action == "repair"
    assert read_pointer(layout, CPU) == built.generation


@needs_symlinks
def test_a_generation_that_is_a_link_is_moved_aside(config: Config, canary: Path) -> None:
    built = ensure(config, CPU)
    before = snapshot(canary)
    real = built.prefix.with_name("real")
    os.rename(built.prefix, real)
    built.prefix.symlink_to(canary / ("a" * 12), target_is_directory=True)
    assert host_call(config) == "shared"
    assert built.prefix.is_dir() and not built.prefix.is_symlink()
    collect_garbage(config, keep=0)
    assert snapshot(canary) == before


def test_a_home_that_is_a_file_is_refused(config: Config) -> None:
    config.home.parent.mkdir(parents=True, exist_ok=True)
    config.home.write_text("x", encoding="utf-8")
    with pytest.raises(HomeLayoutError, match="not a directory"):
        collect_garbage(config)


# ------------------------------------------------------------------ full and read-only disks


def _unshare_reason() -> str | None:
    """Why a private tmpfs cannot be mounted here, or ``None`` when it can."""
    import shutil as _shutil

    if not sys.platform.startswith("linux") or _shutil.which("unshare") is None:
        return "needs Linux with unshare(1)"
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, text=True, check=False, timeout=60)
    if probe.returncode != 0:
        return f"cannot mount a private tmpfs (unshare -Urm): {probe.stderr.strip()[:120]}"
    return None


_NO_UNSHARE = _unshare_reason()
needs_tmpfs = pytest.mark.skipif(_NO_UNSHARE is not None, reason=str(_NO_UNSHARE))

# Runs inside a private mount namespace; whatever it reports goes to $OUT (outside the tmpfs).
_IN_NAMESPACE = """
set -u
mount -t tmpfs -o size=$SIZE tmpfs "$MNT"
cli() { "$PY" -m provisioner -q --home "$MNT/home" "$@" --project "$PROJECT"; }
if [ "$PREBUILD" = 1 ]; then
  cli ensure sample-cpu-transformers >/dev/null 2>&1 || exit 90
  if [ "$READONLY" = 1 ]; then mount -o remount,ro "$MNT"
  else dd if=/dev/zero of="$MNT/home/filler" bs=65536 2>/dev/null; fi
fi
cli ensure "$KEY" >/dev/null 2>"$OUT/stderr"; echo $? >"$OUT/rc"
cli resolve gpt2 >"$OUT/resolved" 2>/dev/null; echo $? >"$OUT/resolve_rc"
"$PY" -c 'import json, os, sys
home = sys.argv[1]
def ls(p):
    return sorted(os.listdir(p)) if os.path.isdir(p) else None
envs = os.path.join(home, "envs")
json.dump({"staging": ls(os.path.join(home, ".staging")),
           "envs": {k: ls(os.path.join(envs, k)) for k in (ls(envs) or [])}},
          open(sys.argv[2], "w"))' "$MNT/home" "$OUT/tree.json"
"""


def _in_tmpfs(config: Config, tmp_path: Path, *, size: str, key: str, prebuild: bool,
              readonly: bool = False) -> tuple[int, str, dict[str, object], int]:
    import json

    out, mnt = tmp_path / "out", tmp_path / "mnt"
    out.mkdir()
    mnt.mkdir()
    env = {**os.environ, "CONDA_OVERRIDE_CUDA": "12.1", "SIZE": size, "MNT": str(mnt),
           "PY": sys.executable, "PROJECT": str(config.project), "KEY": key, "OUT": str(out),
           "PREBUILD": "1" if prebuild else "0", "READONLY": "1" if readonly else "0"}
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", _IN_NAMESPACE], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    tree = json.loads((out / "tree.json").read_text(encoding="utf-8"))
    return (int((out / "rc").read_text()), (out / "stderr").read_text(encoding="utf-8"), tree,
            int((out / "resolve_rc").read_text()))


@needs_tmpfs
def test_a_disk_full_build_exits_2_naming_the_path(config: Config, tmp_path: Path) -> None:
    rc, stderr, tree, _ = _in_tmpfs(config, tmp_path, size="64k", key=CPU, prebuild=False)
    assert rc == EXIT_USER_ERROR, stderr
    # The free-space check refuses before anything is written (ENOSPC inside the build,
    # should the estimate fall short, maps to the same exit 2 naming the path).
    assert "the build needs " in stderr and " free at " in stderr
    assert str(tmp_path / "mnt" / "home") in stderr and "hint:" in stderr
    assert "internal error" not in stderr and len(stderr.strip().splitlines()) == 2
    assert tree["staging"] in ([], None) and tree["envs"] in ({}, {CPU: []}, None), \
        "nothing half promoted"


@needs_tmpfs
def test_a_full_disk_leaves_the_working_env_serving(config: Config, tmp_path: Path) -> None:
    rc, stderr, tree, resolve_rc = _in_tmpfs(config, tmp_path, size="100m",
                                             key="sample-cu121-transformers", prebuild=True)
    assert rc == EXIT_USER_ERROR, stderr
    assert "the build needs " in stderr or "No space left on device at " in stderr, stderr
    assert str(tmp_path / "mnt" / "home") in stderr, "the error names where space is needed"
    assert tree["staging"] == []
    envs = tree["envs"]
    assert isinstance(envs, dict) and envs.get("sample-cu121-transformers") in (None, [])
    assert "current" in envs[CPU] and resolve_rc == 0, "the ready env still serves"


@needs_tmpfs
def test_a_read_only_home_exits_2_and_still_resolves(config: Config, tmp_path: Path) -> None:
    rc, stderr, _tree, resolve_rc = _in_tmpfs(config, tmp_path, size="100m",
                                              key="sample-cu121-transformers", prebuild=True,
                                              readonly=True)
    assert rc == EXIT_USER_ERROR and "Read-only file system at " in stderr, stderr
    assert "needs a writable filesystem" in stderr
    assert resolve_rc == 0
