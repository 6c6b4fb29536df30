"""Checks of built envs: records, files, imports and leaked staging paths, on real builds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import LongSpelling
from winsupport import IS_WINDOWS, fake_executable, needs_symlinks

from provisioner.build.ensure import EnsureResult, ensure
from provisioner.build.env_checks import (
    check_files,
    check_imports,
    check_records,
    find_staging_path,
    site_packages,
)
from provisioner.config import load_config
from provisioner.lock.lockfile import LockedPackage
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lockfile
from provisioner.sample.project import SampleProject, create_sample_project

CPU = "sample-cpu-transformers"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("envcheck") / "sp")


@pytest.fixture(scope="module")
def packages(project: SampleProject) -> list[LockedPackage]:
    lock = read_lockfile(project.path / "lockfiles" / f"{CPU}.conda-lock.yml")
    return lock.for_platform(host_platform(), "conda")


@pytest.fixture(scope="module")
def shared_env(project: SampleProject, tmp_path_factory: pytest.TempPathFactory
               ) -> EnsureResult:
    """A built env for read-only checks."""
    home = tmp_path_factory.mktemp("envcheck-home")
    return ensure(load_config(project.path, home=home, environ={}), CPU)


@pytest.fixture
def own_env(project: SampleProject, tmp_path: Path) -> EnsureResult:
    """A built env this test may damage."""
    return ensure(load_config(project.path, home=tmp_path / "home", environ={}), CPU)


def site(env: EnsureResult) -> Path:
    py = next(p for p in read_lockfile(env.plan.lockfile).for_platform(host_platform(), "conda")
              if p.name == "python")
    return site_packages(env.prefix, py.version, host_platform())


def test_site_packages_layout(tmp_path: Path) -> None:
    assert site_packages(tmp_path, "3.11.7", "linux-64") == \
        tmp_path / "lib" / "python3.11" / "site-packages"
    assert site_packages(tmp_path, "3.10", "osx-arm64") == \
        tmp_path / "lib" / "python3.10" / "site-packages"
    assert site_packages(tmp_path, "3.11.7", "win-64") == tmp_path / "Lib" / "site-packages"


def test_fresh_env_passes_every_check(shared_env: EnsureResult,
                                      packages: list[LockedPackage]) -> None:
    records = check_records(shared_env.prefix, packages)
    assert records.ok and records.checked == len(packages)
    quick = check_files(shared_env.prefix)
    deep = check_files(shared_env.prefix, deep=True)
    assert quick.ok and deep.ok, deep.problems
    assert deep.checked == quick.checked > len(packages)
    assert deep.details["deep"] is True and deep.details["altered"] == []
    imports = check_imports(shared_env.python, ["torch", "transformers", "numpy"])
    assert imports.ok, imports.problems
    info = imports.details["imports"]
    assert isinstance(info, dict)
    assert info["torch"] == {"ok": True, "version": "2.2.1"}
    assert find_staging_path(shared_env.prefix, str(shared_env.prefix.parent.parent.parent /
                                                    ".staging")) == []


def test_records_report_missing_and_foreign_packages(own_env: EnsureResult,
                                                     packages: list[LockedPackage]) -> None:
    meta = own_env.prefix / "conda-meta"
    numpy_record = next(meta.glob("numpy-*.json"))
    numpy_record.unlink()
    torch_record = next(meta.glob("pytorch-2.*.json"))
    data = json.loads(torch_record.read_text())
    data["sha256"] = "0" * 64
    torch_record.write_text(json.dumps(data))
    report = check_records(own_env.prefix, packages)
    assert not report.ok
    assert any(p.startswith("numpy 1.26.4 is not installed") for p in report.problems)
    torch_pkg = next(p for p in packages if p.name == "pytorch")
    assert any(p.startswith("pytorch: installed 2.2.1 sha256 " + "0" * 64)
               and str(torch_pkg.sha256) in p for p in report.problems)
    assert len(report.problems) == 2


def test_files_detect_a_deleted_and_an_altered_file(own_env: EnsureResult) -> None:
    torch_dir = site(own_env) / "torch"
    deleted = torch_dir / "version.py"
    deleted.unlink()
    altered = torch_dir / "__init__.py"
    original = altered.read_bytes()
    altered.unlink()  # a new file: the package cache's hardlink stays intact
    altered.write_bytes(original + b"\nraise SystemExit('tampered')\n")

    quick = check_files(own_env.prefix)
    assert not quick.ok
    rel_deleted = deleted.relative_to(own_env.prefix).as_posix()  # as paths.json spells it
    rel_altered = altered.relative_to(own_env.prefix).as_posix()
    assert quick.details["missing"] == [f"pytorch: {rel_deleted}"]
    assert quick.details["altered"] == []  # quick mode only checks existence

    deep = check_files(own_env.prefix, deep=True)
    assert deep.details["missing"] == [f"pytorch: {rel_deleted}"]
    assert deep.details["altered"] == [f"pytorch: {rel_altered}"]
    assert deep.problems == (f"missing file pytorch: {rel_deleted}",
                             f"altered file pytorch: {rel_altered}")


@pytest.mark.skipif(IS_WINDOWS, reason="no prefix-patched file on Windows: the sample's "
                    "python.exe is the venv launcher, copied unpatched")
def test_patched_launcher_is_checked_against_its_installed_hash(own_env: EnsureResult) -> None:
    launcher = own_env.python
    assert check_files(own_env.prefix, deep=True).ok  # the prefix-patched launcher matches
    text = launcher.read_text()
    launcher.unlink()
    launcher.write_text(text.replace("PYTHONNOUSERSITE=1", "PYTHONNOUSERSITE=0"))
    launcher.chmod(0o755)
    deep = check_files(own_env.prefix, deep=True)
    assert deep.details["altered"] == ["python: bin/python"]


def test_imports_report_failures(own_env: EnsureResult) -> None:
    broken = site(own_env) / "broken_mod.py"
    broken.write_text("raise RuntimeError('cannot initialise')\n")
    report = check_imports(own_env.python, ["torch", "no_such_module_xyz", "broken_mod"])
    assert not report.ok and report.checked == 3
    assert report.problems == (
        "import no_such_module_xyz: ModuleNotFoundError: No module named 'no_such_module_xyz'",
        "import broken_mod: RuntimeError: cannot initialise",
    )
    info = report.details["imports"]
    assert isinstance(info, dict) and info["torch"]["ok"] is True


def test_imports_see_only_the_env(shared_env: EnsureResult) -> None:
    # pytest is installed next to the host interpreter but not in the env.
    report = check_imports(shared_env.python, ["pytest"])
    assert not report.ok and "ModuleNotFoundError" in report.problems[0]


@pytest.mark.skipif(IS_WINDOWS, reason="the python._pth beside the Windows python.exe makes it "
                    "ignore PYTHONPATH (its relative paths need no extra path)")
def test_imports_with_extra_path(shared_env: EnsureResult, tmp_path: Path) -> None:
    (tmp_path / "extra_mod.py").write_text("__version__ = '7'\n")
    report = check_imports(shared_env.python, ["extra_mod"], extra_path=tmp_path)
    assert report.ok
    info = report.details["imports"]
    assert isinstance(info, dict) and info["extra_mod"]["version"] == "7"


def test_imports_of_a_missing_or_failing_interpreter(tmp_path: Path) -> None:
    assert check_imports(tmp_path / "nope" / "python", []).ok
    missing = check_imports(tmp_path / "nope" / "python", ["os"])
    assert missing.problems == (f"interpreter {tmp_path / 'nope' / 'python'} does not exist",)
    crashing = fake_executable(tmp_path, "python",
                               "import sys\nsys.stderr.write('fatal: no stdlib\\n')\nsys.exit(1)\n")
    report = check_imports(crashing, ["os"])
    assert report.problems == ("import probe failed: fatal: no stdlib",)
    silent = fake_executable(tmp_path, "silent", "print('hello')\n")
    assert check_imports(silent, ["os"]).problems == ("import probe printed no JSON",)


@needs_symlinks
def test_find_staging_path(tmp_path: Path) -> None:
    staging = "/home/u/.provisioner/.staging/k.0123456789ab.abcdef"
    prefix = tmp_path / "env"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "lib" / "__pycache__").mkdir(parents=True)
    (prefix / "bin" / "tool").write_text(f"#!{staging}/bin/python\n")
    (prefix / "lib" / "data.bin").write_bytes(b"\0\0" + staging.encode() + b"\0" * 20)
    (prefix / "lib" / "__pycache__" / "m.cpython-311.pyc").write_bytes(staging.encode())
    (prefix / "lib" / "clean.py").write_text("x = '/home/u/.provisioner/envs/k/gen'\n")
    os.symlink(prefix / "bin" / "tool", prefix / "bin" / "link")
    found = [p.replace(os.sep, "/") for p in find_staging_path(prefix, staging)]
    assert found == ["bin/tool", "lib/data.bin"]
    assert find_staging_path(prefix, "/elsewhere") == []


def test_find_staging_path_skips_hardlinked_cache_files_unless_told(tmp_path: Path) -> None:
    staging = "/x/.staging/k.0123456789ab.abcdef"
    cache = tmp_path / "pkgs" / "p-1-0"
    cache.mkdir(parents=True)
    (cache / "f.txt").write_text(staging)  # impossible in a real cache; proves what is read
    prefix = tmp_path / "env"
    prefix.mkdir()
    os.link(cache / "f.txt", prefix / "f.txt")
    (prefix / "own.txt").write_text(staging)
    assert find_staging_path(prefix, staging) == ["own.txt"]
    assert find_staging_path(prefix, staging, trust_hardlinks=False) == ["f.txt", "own.txt"]


def test_env_walks_use_the_extended_length_spelling(shared_env: EnsureResult,
                                                    long_spelling: LongSpelling) -> None:
    from provisioner.build import env_checks

    direct = check_files(shared_env.prefix, deep=True)
    leaks = find_staging_path(shared_env.prefix, CPU)
    plain = long_spelling.route(shared_env.prefix, env_checks)
    assert not plain.exists()
    through = check_files(plain, deep=True)
    assert through.ok, through.problems
    assert through.checked == direct.checked > 10
    assert find_staging_path(plain, CPU) == leaks != []
