"""``gc --cache`` on real envs built from the sample channel: what no generation uses goes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jsonschema
import pytest

from provisioner.build.ensure import ensure
from provisioner.build.key_lock import hold_key_lock
from provisioner.build.layout import HomeLayout
from provisioner.build.maintenance import GcReport, collect_garbage, verify_env
from provisioner.build.package_cache import cache_lock
from provisioner.config import Config, load_config
from provisioner.lock.lockfile import LockedPackage
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lockfile

# package_cache.cache_lock has no exclusive mode on Windows: gc --cache removes nothing there.
posix_cache_lock = pytest.mark.skipif(
    sys.platform == "win32", reason="the package cache has no exclusive lock on Windows")

CPU = "sample-cpu-transformers"
BNB = "sample-cu121-transformers-bnb"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")


def packages(config: Config, key: str) -> list[LockedPackage]:
    lock = read_lockfile(config.locks_dir / f"{key}.conda-lock.yml")
    return lock.for_platform(host_platform(), "conda")


def stem(pkg: LockedPackage) -> str:
    return pkg.file_name.removesuffix(".conda").removesuffix(".tar.bz2")


@pytest.fixture
def two_keys(shared_project: Path, tmp_path: Path) -> Config:
    """CPU and BNB built in one home, then BNB's env dropped: its own entries are unused."""
    config = load_config(shared_project, home=tmp_path / "home", environ={})
    ensure(config, CPU)
    ensure(config, BNB)
    shutil.rmtree(HomeLayout(config.home).key_dir(BNB))
    return config


def only_bnb(config: Config) -> set[str]:
    return {stem(p) for p in packages(config, BNB)} - {stem(p) for p in packages(config, CPU)}


def files_size(paths: list[Path]) -> int:
    """Regular files and links under ``paths``, each inode once (the test's own count)."""
    seen: dict[tuple[int, int], int] = {}
    for top in paths:
        walk = [top] if not top.is_dir() else [
            Path(r, n) for r, ds, fs in os.walk(top) for n in fs + [d for d in ds
                                                                    if Path(r, d).is_symlink()]]
        for p in walk:
            st = p.lstat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def removed(report: GcReport, kind: str) -> set[str]:
    return {i.path.name for i in report.removed if i.kind == kind}


@posix_cache_lock
def test_unused_entries_go_and_used_ones_stay(two_keys: Config) -> None:
    config = two_keys
    cache = HomeLayout(config.home).package_cache
    gone = only_bnb(config)
    assert gone  # the bnb stack has packages of its own (pytorch cu121, bitsandbytes, ...)
    expected = files_size([cache / s for s in gone] + [cache / f"{s}.lock" for s in gone])
    dry = collect_garbage(config, dry_run=True, cache=True)
    assert all((cache / s).is_dir() for s in gone)  # a dry run removes nothing
    report = collect_garbage(config, cache=True)
    assert removed(report, "cache-entry") == gone | {f"{s}.lock" for s in gone}
    assert [(i.kind, i.path, i.bytes) for i in dry.removed] == \
        [(i.kind, i.path, i.bytes) for i in report.removed]
    assert report.bytes_freed == expected > 0
    for pkg in packages(config, CPU):
        assert (cache / stem(pkg)).is_dir()
    assert verify_env(config, CPU, deep=True).ok
    # Nothing else is left to collect, and BNB builds again (rattler extracts anew).
    assert collect_garbage(config, cache=True).removed == ()
    assert ensure(config, BNB).action == "build"
    assert all((cache / s).is_dir() for s in gone)


@posix_cache_lock
def test_hard_links_are_counted_once_and_only_when_all_go(two_keys: Config,
                                                          tmp_path: Path) -> None:
    config = two_keys
    cache = HomeLayout(config.home).package_cache
    gone = sorted(only_bnb(config))
    files = sorted(p for s in gone for p in (cache / s).rglob("*")
                   if p.is_file() and not p.is_symlink())
    kept_outside, twin = files[0], files[1]
    os.link(kept_outside, tmp_path / "outside-link")  # still linked elsewhere: frees nothing
    os.link(twin, cache / gone[0] / "twin-link")  # two links, both removed: counted once
    every = [cache / s for s in gone] + [cache / f"{s}.lock" for s in gone]
    expected = files_size(every) - kept_outside.stat().st_size
    report = collect_garbage(config, cache=True)
    assert report.bytes_freed == expected
    assert (tmp_path / "outside-link").is_file()


@posix_cache_lock
def test_partial_downloads_and_extractions(two_keys: Config) -> None:
    config = two_keys
    cache = HomeLayout(config.home).package_cache
    (cache / "downloads").mkdir()
    partial_download = cache / "downloads" / ".pytorch-2.2.1-x_0.tar.bz2.123-456.partial"
    partial_download.write_bytes(b"x" * 1000)
    extracting = cache / ".pytorch-2.2.1-x_0Ab12Cd"
    (extracting / "lib").mkdir(parents=True)
    (extracting / "lib" / "half.so").write_bytes(b"y" * 300)
    plain = collect_garbage(config)  # plain gc: partial extractions only
    assert removed(plain, "cache-partial") == {extracting.name}
    assert plain.bytes_freed == 300 and partial_download.exists()
    report = collect_garbage(config, cache=True)
    assert removed(report, "cache-partial") == {partial_download.name}
    assert not partial_download.exists()


@posix_cache_lock
def test_downloaded_archives_no_generation_uses(two_keys: Config, shared_project: Path) -> None:
    config = two_keys
    downloads = HomeLayout(config.home).package_cache / "downloads"
    downloads.mkdir()
    channel = shared_project / "channel"
    cpu_pkg = packages(config, CPU)[0]
    bnb_pkg = next(p for p in packages(config, BNB) if stem(p) in only_bnb(config))
    for pkg in (cpu_pkg, bnb_pkg):
        shutil.copy(channel / pkg.subdir / pkg.file_name, downloads / pkg.file_name)
    report = collect_garbage(config, cache=True)
    assert removed(report, "cache-archive") == {bnb_pkg.file_name}
    assert (downloads / cpu_pkg.file_name).is_file()


@posix_cache_lock
def test_a_running_build_or_a_busy_cache_keeps_everything(two_keys: Config) -> None:
    config = two_keys
    layout = HomeLayout(config.home)
    gone = only_bnb(config)
    with hold_key_lock(CPU, layout.lock_file(CPU)):
        busy = collect_garbage(config, cache=True)
    assert [i for i in busy.removed if i.kind.startswith("cache")] == []
    assert any(s.key == CPU and "is running" in s.reason for s in busy.skipped)
    with cache_lock(layout.package_cache, exclusive=False):
        shared = collect_garbage(config, cache=True)
    assert [i for i in shared.removed if i.kind.startswith("cache")] == []
    assert any("in use by a build" in s.reason for s in shared.skipped)
    assert all((layout.package_cache / s).is_dir() for s in gone)


@posix_cache_lock
def test_an_unreadable_record_keeps_every_entry(two_keys: Config) -> None:
    config = two_keys
    layout = HomeLayout(config.home)
    prefix = layout.generation_dir(CPU, (layout.pointer(CPU)).read_text().strip())
    record = next((prefix / "conda-meta").glob("python-*.json"))
    record.write_text("{ not json", encoding="utf-8")
    report = collect_garbage(config, cache=True)
    assert removed(report, "cache-entry") == set()
    assert any("could not read the record" in s.reason for s in report.skipped)


def test_windows_keeps_the_whole_cache(two_keys: Config) -> None:
    report = collect_garbage(two_keys, cache=True)
    if sys.platform != "win32":
        assert removed(report, "cache-entry") == only_bnb(two_keys) | {
            f"{s}.lock" for s in only_bnb(two_keys)}
        return
    assert [i for i in report.removed if i.kind.startswith("cache")] == []
    assert any("in use by a build" in s.reason for s in report.skipped)


def test_cli_json_matches_its_schema(two_keys: Config) -> None:
    config = two_keys
    exe = Path(sysconfig.get_path("scripts")) / (
        "provisioner.exe" if sys.platform == "win32" else "provisioner")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    result = subprocess.run([str(exe), "gc", "--cache", "--json", "--home", str(config.home),
                             "--project", str(config.project)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    schema = json.loads((REPO / "docs" / "schemas" / "gc.schema.json").read_text())
    jsonschema.validate(data, schema, cls=jsonschema.Draft202012Validator)
    if sys.platform == "win32":  # no exclusive cache lock: nothing goes, and it says why
        assert data["removed"] == [] and data["skipped"]
        return
    assert {i["kind"] for i in data["removed"]} == {"cache-entry"}
    assert data["bytes_freed"] == sum(i["bytes"] for i in data["removed"]) > 0
    text = subprocess.run([str(exe), "gc", "--cache", "--home", str(config.home), "--project",
                           str(config.project)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert text.stdout.splitlines()[-1] == "freed 0 bytes in 0 path(s) (hard links counted once)"
