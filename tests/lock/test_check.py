"""``lock --check``: content hashes tell whether each lock is current, without solving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from provisioner.config import load_config
from provisioner.errors import InvalidKeyError, UserError
from provisioner.lock.check import (
    HASH_FIELD,
    CheckResult,
    check_key,
    check_locks,
    content_hash,
    lockfile_path,
)
from provisioner.lock.reader import read_lockfile
from provisioner.lock.spec import load_spec
from provisioner.lock.write import lock_envs
from provisioner.sample.project import sample_platforms, write_sample_project
from provisioner.sample.stack import build_wheel

REPO = Path(__file__).resolve().parents[2]
PROVISIONER = Path(sysconfig.get_path("scripts")) / (
    "provisioner.exe" if sys.platform == "win32" else "provisioner"
)
CU121 = "sample-cu121-transformers"
CU121_BNB = "sample-cu121-transformers-bnb"
CPU = "sample-cpu-transformers"
ALL_KEYS = [CPU, CU121, CU121_BNB]
PIP_TOML = '\n[pip]\nno-index = true\nfind-links = ["wheels"]\n'
# `lock --check` is cheap (its stated budget is 2 s) because it neither solves nor imports
# conda-lock while the seal holds: the tests assert that path, by the modules imported.
HEAVY_MODULES = {"conda_lock", "rattler"}


@pytest.fixture(scope="module")
def locked_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sample project locked once for the module. Copy it before changing anything."""
    root = tmp_path_factory.mktemp("lockcheck") / "project"
    write_sample_project(root)
    lock_envs(load_config(root, environ={}))
    return root


@pytest.fixture()
def project(locked_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(locked_root, tmp_path / "project", symlinks=True))


def spec_file(project: Path, key: str) -> Path:
    return project / "environment-specs" / f"{key}.yml"


def edit_spec(project: Path, key: str, **changes: object) -> None:
    path = spec_file(project, key)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def deps_of(project: Path, key: str) -> list[object]:
    deps = yaml.safe_load(spec_file(project, key).read_text(encoding="utf-8"))["dependencies"]
    assert isinstance(deps, list)
    return deps


def check(project: Path, keys: list[str] | None = None) -> dict[str, CheckResult]:
    return {r.key: r for r in check_locks(load_config(project, environ={}), keys)}


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROVISIONER_", "XDG_"))}
    env.update(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "xdg-data"),
               XDG_CACHE_HOME=str(tmp_path / "xdg-cache"))
    return env


def run_check(
    project: Path, tmp_path: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the real CLI; returns its result (stderr without the import log) and the
    top-level packages it imported (Python's own -X importtime log, on stderr)."""
    env = {**cli_env(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}
    result = subprocess.run(
        [str(PROVISIONER), "lock", "--check", *args], cwd=project, env=env,
        capture_output=True, text=True, timeout=60,
    )
    lines = result.stderr.splitlines(keepends=True)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in lines if line.startswith("import time:") and "|" in line}
    assert "provisioner" in imported, "the import log was not captured"
    result.stderr = "".join(line for line in lines if not line.startswith("import time:"))
    return result, imported


# --- the library ----------------------------------------------------------------------------


def test_check_passes_right_after_locking(locked_root: Path) -> None:
    results = check(locked_root)
    assert list(results) == ALL_KEYS
    for key, r in results.items():
        assert r.ok, r.reasons
        assert r.reasons == ()
        assert r.lockfile == f"lockfiles/{key}.conda-lock.yml"
        assert r.platforms == tuple(sample_platforms())
        assert r.to_dict() == {"key": key, "ok": True, "reasons": [],
                               "lockfile": r.lockfile, "platforms": list(r.platforms)}


def test_editing_one_dependency_makes_only_that_key_stale(project: Path) -> None:
    deps = deps_of(project, CU121)
    edit_spec(project, CU121, dependencies=[
        "transformers>=4.40" if d == "transformers" else d for d in deps
    ])
    results = check(project)
    assert results[CPU].ok and results[CU121_BNB].ok
    stale = results[CU121]
    assert not stale.ok
    assert len(stale.reasons) == len(sample_platforms())
    for platform, reason in zip(sample_platforms(), stale.reasons, strict=True):
        assert reason.startswith(f"{platform}: ")
        assert "content hash differs" in reason


def test_reordering_and_comments_do_not_make_a_lock_stale(project: Path) -> None:
    path = spec_file(project, CU121)
    deps = deps_of(project, CU121)
    own = yaml.safe_load(path.read_text(encoding="utf-8"))["x-provisioner"]
    own["imports"] = ["torch"]  # not a lock input
    edit_spec(project, CU121, dependencies=list(reversed(deps)), **{"x-provisioner": own})
    path.write_text("# a comment\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    assert check(project, [CU121])[CU121].ok


def test_adding_a_platform_is_reported_as_not_locked(project: Path) -> None:
    edit_spec(project, CPU, platforms=[*sample_platforms(), "osx-arm64"])
    result = check(project, [CPU])[CPU]
    assert not result.ok
    assert "platform osx-arm64 is not locked" in result.reasons
    assert result.platforms == (*sample_platforms(), "osx-arm64")


def test_dropping_a_platform_is_reported(project: Path) -> None:
    edit_spec(project, CPU, platforms=["linux-64"])
    result = check(project, [CPU])[CPU]
    assert not result.ok
    extra = sorted(set(sample_platforms()) - {"linux-64"})
    assert f"lock has platforms the spec no longer lists: {', '.join(extra)}" in result.reasons


def test_removed_lockfile_is_a_reason(project: Path) -> None:
    lockfile_path(project / "lockfiles", CU121_BNB).unlink()
    results = check(project)
    assert results[CPU].ok and results[CU121].ok
    assert not results[CU121_BNB].ok
    assert results[CU121_BNB].reasons == (
        f"lockfile {CU121_BNB}.conda-lock.yml does not exist",
    )


def test_missing_or_broken_spec_is_a_reason_not_a_crash(project: Path) -> None:
    spec_file(project, CPU).write_text("name: [unclosed\n", encoding="utf-8")
    results = check(project)
    assert not results[CPU].ok
    assert "malformed YAML" in results[CPU].reasons[0]
    assert results[CU121].ok
    unknown = check_key(load_config(project, environ={}), "no-such-key")
    assert not unknown.ok
    assert "no spec for env key 'no-such-key'" in unknown.reasons[0]


def test_corrupt_lock_metadata_is_a_reason(project: Path) -> None:
    path = lockfile_path(project / "lockfiles", CPU)
    path.write_text(path.read_text(encoding="utf-8").replace("version: 1\n", "version: 2\n", 1))
    result = check(project, [CPU])[CPU]
    assert not result.ok
    assert "lockfile version 2 is not 1" in result.reasons[0]


def test_check_of_a_dir_without_specs_is_an_error(tmp_path: Path) -> None:
    """A check that finds nothing to check must not pass (CI in the wrong directory)."""
    with pytest.raises(UserError, match="no specs found") as info:
        check_locks(load_config(tmp_path, environ={}))
    assert info.value.hint and "--project" in info.value.hint


def test_invalid_key_is_rejected_before_any_file_access(project: Path) -> None:
    with pytest.raises(InvalidKeyError):
        check_locks(load_config(project, environ={}), ["../lockfiles/x"])


# --- the pip layer is part of the content hash ----------------------------------------------


@pytest.fixture()
def pip_project(project: Path) -> Path:
    """The cpu key gains a pip: layer, locked by uv from a local wheel."""
    build_wheel(project / "wheels", "tinyextra", "1.0")
    with (project / "provisioner.toml").open("a", encoding="utf-8") as fh:
        fh.write(PIP_TOML)
    edit_spec(project, CPU, dependencies=[*deps_of(project, CPU), {"pip": ["tinyextra>=1"]}])
    [outcome] = lock_envs(load_config(project, environ={}), [CPU])
    assert outcome.pip_counts == dict.fromkeys(sample_platforms(), 1)
    assert not list((project / "lockfiles").glob("*.pip.txt"))
    return project


def test_both_hashes_are_in_the_lock(pip_project: Path) -> None:
    from provisioner.lock.conda_lock_io import conda_lock_content_hashes

    assert check(pip_project)[CPU].ok
    spec = load_spec(pip_project / "environment-specs", CPU)
    lock = read_lockfile(lockfile_path(pip_project / "lockfiles", CPU))
    theirs = conda_lock_content_hashes(spec_file(pip_project, CPU), spec.cuda)
    for platform in sample_platforms():
        assert lock.content_hash[platform] == theirs[platform]
        assert lock.extra[HASH_FIELD.format(platform=platform)] == content_hash(spec, platform)
        assert [p.name for p in lock.for_platform(platform, "pip")] == ["tinyextra"]


def test_edited_provisioner_hash_makes_the_lock_stale(pip_project: Path) -> None:
    path = lockfile_path(pip_project / "lockfiles", CPU)
    field = HASH_FIELD.format(platform="linux-64")
    text = path.read_text(encoding="utf-8")
    assert f"{field}: " in text
    path.write_text(text.replace(f"{field}: ", f"{field}: 0"), encoding="utf-8")
    result = check(pip_project, [CPU])[CPU]
    assert not result.ok
    assert len(result.reasons) == 1
    assert result.reasons[0].startswith("linux-64: ") and field in result.reasons[0]


def test_edited_conda_lock_hash_makes_the_lock_stale(pip_project: Path) -> None:
    path = lockfile_path(pip_project / "lockfiles", CPU)
    old = read_lockfile(path).content_hash["win-64"]
    path.write_text(path.read_text(encoding="utf-8").replace(old, "0" * 64), encoding="utf-8")
    result = check(pip_project, [CPU])[CPU]
    assert result.reasons == ("win-64: spec changed since the lock was made"
                              " (conda-lock's content_hash differs)",)
    # ensure's quick check reads provisioner's hash only, and imports no conda-lock
    assert check_key(load_config(pip_project, environ={}), CPU).ok


def test_changed_pip_requirement_makes_the_lock_stale(pip_project: Path) -> None:
    deps = [d for d in deps_of(pip_project, CPU) if not isinstance(d, dict)]
    edit_spec(pip_project, CPU, dependencies=[*deps, {"pip": ["tinyextra>=1,<2"]}])
    result = check(pip_project, [CPU])[CPU]
    assert not result.ok
    assert len(result.reasons) == len(sample_platforms())


# --- the CLI --------------------------------------------------------------------------------


def test_cli_check_on_stale_copy_exits_1_fast(project: Path, tmp_path: Path) -> None:
    for key in (CPU, CU121_BNB):
        edit_spec(project, key, dependencies=[*deps_of(project, key), "numpy>=1.20"])
    result, imported = run_check(project, tmp_path)
    assert result.returncode == 1, result.stderr
    assert not imported & HEAVY_MODULES, "lock --check solved or imported conda-lock"
    lines = result.stdout.splitlines()
    assert len(lines) == len(ALL_KEYS)
    stale = [line for line in lines if line.startswith("STALE")]
    assert [line.split()[1] for line in stale] == [f"{CPU}:", f"{CU121_BNB}:"]
    assert all("content hash differs" in line for line in stale)
    assert f"ok      {CU121}" in lines
    assert "Traceback" not in result.stderr


def test_cli_check_json_is_machine_readable(project: Path, tmp_path: Path) -> None:
    edit_spec(project, CPU, platforms=[*sample_platforms(), "osx-64"])
    lockfile_path(project / "lockfiles", CU121).unlink()
    result, _imported = run_check(project, tmp_path, "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False
    by_key = {k["key"]: k for k in data["keys"]}
    assert list(by_key) == ALL_KEYS
    assert by_key[CU121_BNB] == {
        "key": CU121_BNB, "ok": True, "reasons": [],
        "lockfile": str(project / "lockfiles" / f"{CU121_BNB}.conda-lock.yml"),
        "platforms": sample_platforms(),
    }
    assert "platform osx-64 is not locked" in by_key[CPU]["reasons"]
    assert by_key[CU121]["ok"] is False
    assert by_key[CU121]["reasons"] == [f"lockfile {CU121}.conda-lock.yml does not exist"]


def test_cli_check_of_named_keys(project: Path, tmp_path: Path) -> None:
    lockfile_path(project / "lockfiles", CU121).unlink()
    ok, _ = run_check(project, tmp_path, CPU, CU121_BNB)
    assert ok.returncode == 0
    assert ok.stdout.splitlines() == [f"ok      {CPU}", f"ok      {CU121_BNB}"]
    stale, _ = run_check(project, tmp_path, CU121)
    assert stale.returncode == 1


def test_cli_check_on_the_committed_locks(tmp_path: Path) -> None:
    result, imported = run_check(REPO, tmp_path, "--project", str(REPO))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines
    assert all(line.startswith("ok      ") for line in lines), lines
    # Every committed lock is sealed, so conda-lock's hash needs no conda-lock import.
    assert not imported & HEAVY_MODULES, imported & HEAVY_MODULES


# --- conda-lock's own content hash ------------------------------------------------------------


COMMITTED_SPECS = sorted(p.stem for p in (REPO / "environment-specs").glob("*.yml")
                         if p.name != "models.yml")


@pytest.mark.parametrize("key", COMMITTED_SPECS)
def test_committed_lock_content_hash_is_conda_locks(key: str, tmp_path: Path) -> None:
    """conda-lock's own code, run on a copy of the spec, computes the committed hash."""
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.src_parser import make_lock_spec
    from conda_lock.virtual_package import default_virtual_package_repodata

    spec_copy = tmp_path / f"{key}.yml"
    shutil.copy(REPO / "environment-specs" / f"{key}.yml", spec_copy)
    mapping = tmp_path / "mapping.json"
    mapping.write_text("{}", encoding="utf-8")
    spec = load_spec(REPO / "environment-specs", key)
    assert spec.cuda  # the committed specs lock CUDA: conda-lock --with-cuda <it>
    theirs = compute_content_hashes(
        make_lock_spec(src_files=[spec_copy], mapping_url=str(mapping)),
        default_virtual_package_repodata(cuda_version=spec.cuda),
    )
    lock = read_lockfile(REPO / "lockfiles" / f"{key}.conda-lock.yml")
    assert lock.content_hash == theirs
    assert lock.extra[HASH_FIELD.format(platform="linux-64")] == content_hash(spec, "linux-64")


def test_sample_lock_without_cuda_uses_conda_locks_default(locked_root: Path) -> None:
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.src_parser import make_lock_spec
    from conda_lock.virtual_package import default_virtual_package_repodata

    from provisioner.lock.conda_lock_io import MAPPING_PATH

    assert load_spec(locked_root / "environment-specs", CPU).cuda is None
    theirs = compute_content_hashes(
        make_lock_spec(src_files=[spec_file(locked_root, CPU)], mapping_url=str(MAPPING_PATH)),
        default_virtual_package_repodata(),
    )
    assert read_lockfile(lockfile_path(locked_root / "lockfiles", CPU)).content_hash == theirs
