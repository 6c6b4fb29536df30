"""``verify`` and ``gc`` on real envs built from the offline sample project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from provisioner import fsops
from provisioner.build.ensure import ensure
from provisioner.build.layout import HomeLayout, read_pointer
from provisioner.build.maintenance import collect_garbage, verify_env
from provisioner.config import Config, load_config
from provisioner.errors import EXIT_CHECK_FAILED, EXIT_USER_ERROR
from provisioner.lock.spec import spec_path
from provisioner.lock.write import lock_envs

CPU = "sample-cpu-transformers"
BNB = "sample-cu121-transformers-bnb"


@pytest.fixture(autouse=True)
def _cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")


@pytest.fixture
def config(shared_project: Path, tmp_path: Path) -> Config:
    """The shared project with a fresh home."""
    return load_config(shared_project, home=tmp_path / "home", environ={})


@pytest.fixture
def own_config(shared_project: Path, tmp_path: Path) -> Config:
    """A private copy of the project (its specs and locks may change) with a fresh home."""
    project = tmp_path / "project"
    shutil.copytree(shared_project, project)
    return load_config(project, home=tmp_path / "home", environ={})


def relock_with(config: Config, key: str, python_spec: str) -> None:
    """Change ``key``'s spec (same packages, new content hash) and relock it."""
    path = spec_path(config.specs_dir, key)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["dependencies"] = [python_spec if d.startswith("python") else d
                            for d in data["dependencies"]]
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    (outcome,) = lock_envs(config, [key])
    assert outcome.changed


def recorded_file(prefix: Path, package: str, suffix: str) -> Path:
    """A file that ``package``'s conda-meta record lists, ending with ``suffix``."""
    (meta,) = (prefix / "conda-meta").glob(f"{package}-*.json")
    paths = json.loads(meta.read_text(encoding="utf-8"))["paths_data"]["paths"]
    return prefix / next(p["_path"] for p in paths if p["_path"].endswith(suffix))


# --------------------------------------------------------------------------- verify


def test_verify_fresh_env_is_ok(config: Config) -> None:
    built = ensure(config, BNB)
    report = verify_env(config, BNB, deep=True)
    assert report.ok, report.problems
    assert report.generation == built.generation
    assert report.prefix == built.prefix
    assert report.built_from == report.lock_hash
    assert report.packages_checked > 5 and report.files_checked > 10
    data = report.to_dict()
    assert data["ok"] is True and data["counts"] == {
        "packages_checked": report.packages_checked, "files_checked": report.files_checked,
        "missing": 0, "altered": 0,
    }


def test_verify_reports_a_missing_file(config: Config) -> None:
    prefix = ensure(config, CPU).prefix
    victim = recorded_file(prefix, "transformers", "transformers/__init__.py")
    victim.unlink()
    report = verify_env(config, CPU)
    assert not report.ok
    rel = victim.relative_to(prefix).as_posix()
    assert report.missing_files == (f"transformers: {rel}",)
    assert any("missing" in p for p in report.problems)
    assert report.altered_files == ()


def test_altered_file_passes_quick_and_fails_deep(config: Config) -> None:
    prefix = ensure(config, CPU).prefix
    victim = recorded_file(prefix, "numpy", "numpy/__init__.py")
    data = victim.read_bytes()
    # A new inode with the same size: the package cache it was hard-linked from stays intact.
    victim.unlink()
    victim.write_bytes(data[:-1] + (b"#" if data[-1:] != b"#" else b"!"))
    assert verify_env(config, CPU).ok
    deep = verify_env(config, CPU, deep=True)
    assert not deep.ok
    assert deep.altered_files == (f"numpy: {victim.relative_to(prefix).as_posix()}",)
    assert deep.missing_files == ()


def test_verify_unbuilt_key(config: Config) -> None:
    report = verify_env(config, CPU)
    assert not report.ok
    assert report.problems == ("not built",)
    assert report.generation is None and report.prefix is None


def test_verify_after_relock_reports_fingerprint_mismatch(own_config: Config) -> None:
    ensure(own_config, CPU)
    relock_with(own_config, CPU, "python >=3")
    report = verify_env(own_config, CPU)
    assert not report.ok
    assert any(p.startswith("fingerprint mismatch") for p in report.problems), report.problems
    assert report.built_from != report.lock_hash


# --------------------------------------------------------------------------- gc


def three_generations(config: Config) -> list[Path]:
    prefixes = [ensure(config, CPU).prefix]
    relock_with(config, CPU, "python >=3")
    prefixes.append(ensure(config, CPU).prefix)
    relock_with(config, CPU, "python >=3.1")
    prefixes.append(ensure(config, CPU).prefix)
    assert len(set(prefixes)) == 3 and all(p.is_dir() for p in prefixes)
    return prefixes


def test_gc_keeps_active_and_previous_generation(own_config: Config) -> None:
    oldest, previous, active = three_generations(own_config)
    layout = HomeLayout(own_config.home)

    dry = collect_garbage(own_config, dry_run=True)
    assert oldest.is_dir() and previous.is_dir() and active.is_dir()
    assert [(i.kind, i.path) for i in dry.removed] == [("generation", oldest)]
    assert dry.bytes_freed > 0 and dry.dry_run

    report = collect_garbage(own_config)
    assert [(i.kind, i.path, i.bytes) for i in report.removed] == [
        (i.kind, i.path, i.bytes) for i in dry.removed
    ]
    assert report.bytes_freed == dry.bytes_freed > 0
    assert not oldest.exists() and previous.is_dir() and active.is_dir()
    assert set(report.kept) == {previous, active}
    assert read_pointer(layout, CPU) == active.name
    assert verify_env(own_config, CPU).ok
    assert collect_garbage(own_config).removed == ()


@pytest.fixture
def lock_holder(config: Config) -> Iterator[str]:
    """Another process holding the file lock of ``CPU`` until the test ends."""
    lock = HomeLayout(config.home).lock_file(CPU)
    lock.parent.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys\n"
        "from filelock import FileLock\n"
        "lock = FileLock(sys.argv[1])\n"
        "lock.acquire()\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield CPU
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def make_dir(path: Path, *, marker: bool = True) -> Path:
    path.mkdir(parents=True)
    if marker:
        fsops.write_marker(path, "env")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"x" * 1000)
    return path


def test_gc_staging_only_when_its_lock_is_free(config: Config, lock_holder: str) -> None:
    layout = HomeLayout(config.home)
    busy = make_dir(layout.staging / f"{lock_holder}.{'a' * 12}.abc123")
    stale = make_dir(layout.staging / f"{BNB}.{'b' * 12}.def456")

    dry = collect_garbage(config, dry_run=True)
    assert [i.path for i in dry.removed] == [stale] and stale.is_dir()

    report = collect_garbage(config)
    assert busy.is_dir() and not stale.exists()
    assert [(i.kind, i.key, i.path) for i in report.removed] == [("staging", BNB, stale)]
    assert report.removed[0].bytes >= 1000
    assert [(s.path, s.key) for s in report.skipped] == [(busy, lock_holder)]
    assert "locked" in report.skipped[0].reason


def test_gc_empties_the_trash(config: Config) -> None:
    layout = HomeLayout(config.home)
    keyed = make_dir(layout.trash / f"{CPU}.{'c' * 12}.0123abcd")
    unmarked = make_dir(layout.trash / "leftover", marker=False)
    report = collect_garbage(config)
    assert not keyed.exists() and not unmarked.exists()
    assert layout.trash.is_dir() and not any(layout.trash.iterdir())
    assert {(i.kind, i.path) for i in report.removed} == {("trash", keyed), ("trash", unmarked)}
    assert report.bytes_freed >= 2000 and report.skipped == ()


# --------------------------------------------------------------------------- CLI


def run_cli(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONDA_OVERRIDE_CUDA": "12.1", "PROVISIONER_HOME": str(config.home)}
    return subprocess.run(
        [sys.executable, "-m", "provisioner", *args, "--project", str(config.project)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )


def test_cli_verify_exit_codes(config: Config) -> None:
    unbuilt = run_cli(config, "verify", CPU, "--json")
    assert unbuilt.returncode == EXIT_CHECK_FAILED, unbuilt.stderr
    assert json.loads(unbuilt.stdout)["problems"] == ["not built"]

    ensure(config, CPU)
    ok = run_cli(config, "verify", CPU, "--deep", "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["ok"] is True and data["deep"] is True and data["key"] == CPU

    bad = run_cli(config, "verify", "Not A Key", "--json")
    assert bad.returncode == EXIT_USER_ERROR
    assert "error:" in bad.stderr


def test_cli_gc_json(config: Config) -> None:
    layout = HomeLayout(config.home)
    stale = make_dir(layout.staging / f"{CPU}.{'d' * 12}.a1b2c3")
    dry = run_cli(config, "gc", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["removed"][0]["path"] == str(stale) and stale.is_dir()
    done = run_cli(config, "gc", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["dry_run"] is False and data["bytes_freed"] >= 1000
    assert [r["kind"] for r in data["removed"]] == ["staging"] and not stale.exists()
