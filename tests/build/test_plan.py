"""The plan: decided from the lock and the home's state, before anything is written."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from provisioner import fsops
from provisioner.build.ensure import ensure
from provisioner.build.fingerprint import fingerprint_path, mark_in_progress
from provisioner.build.layout import GENERATION_LENGTH, HomeLayout, generation_name, python_path
from provisioner.build.plan import env_is_ready, locked_hash, make_plan, stale_staging_dirs
from provisioner.config import Config, load_config
from provisioner.errors import InvalidKeyError, LockfileError
from provisioner.lock import reader
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lock_header
from provisioner.sample.project import SampleProject, create_sample_project

CPU = "sample-cpu-transformers"
REAL_LOCKS = Path(__file__).resolve().parents[1] / "data" / "real-locks"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("planner") / "sp")


@pytest.fixture
def config(project: SampleProject, tmp_path: Path) -> Config:
    return load_config(project.path, home=tmp_path / "home", environ={})


def copy_project(project: SampleProject, tmp_path: Path) -> Config:
    dest = tmp_path / "sp"
    shutil.copytree(project.path, dest)
    return load_config(dest, home=tmp_path / "home", environ={})


def test_fresh_home_plans_a_build_and_writes_nothing(config: Config) -> None:
    plan = make_plan(config, CPU)
    layout = HomeLayout(config.home)
    assert plan.action == "build" and plan.reason == "no env for this key yet"
    assert plan.platform == host_platform()
    assert plan.lock_hash == locked_hash(config, CPU, plan.platform)
    assert plan.generation == generation_name(plan.lock_hash)
    assert len(plan.generation) == GENERATION_LENGTH
    assert plan.prefix == layout.generation_dir(CPU, plan.generation)
    assert plan.python == python_path(plan.prefix, plan.platform)
    assert plan.lockfile == config.locks_dir / f"{CPU}.conda-lock.yml"
    assert plan.active_generation is None and plan.stale_staging == ()
    assert not config.home.exists()
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["action"] == "build" and data["prefix"] == str(plan.prefix)
    assert data["stale_staging"] == [] and data["active_generation"] is None


def test_plan_for_another_platform(config: Config) -> None:
    plan = make_plan(config, CPU, platform="win-64")
    assert plan.platform == "win-64"
    assert plan.python == plan.prefix / "python.exe"
    assert plan.generation != make_plan(config, CPU, platform="linux-64").generation


def test_unlocked_platform_is_a_lockfile_error(config: Config) -> None:
    with pytest.raises(LockfileError, match="osx-arm64") as err:
        make_plan(config, CPU, platform="osx-arm64")
    assert err.value.hint is not None and f"provisioner lock {CPU}" in err.value.hint


def test_missing_lock_and_bad_key(config: Config) -> None:
    with pytest.raises(LockfileError, match="does not exist"):
        make_plan(config, "no-such-key")
    with pytest.raises(InvalidKeyError):
        make_plan(config, "../escape")
    assert not config.home.exists()


def test_lock_hash_covers_packages_not_only_the_spec(project: SampleProject,
                                                     tmp_path: Path) -> None:
    config = copy_project(project, tmp_path)
    lockfile = config.locks_dir / f"{CPU}.conda-lock.yml"
    before = locked_hash(config, CPU, "linux-64")
    assert locked_hash(config, CPU, "linux-64") == before  # stable
    header = read_lock_header(lockfile)
    text = lockfile.read_text()
    # Same metadata (so the same content hash), a different pinned package.
    assert text.count("version: 1.26.4") == 2  # numpy, linux-64 and win-64
    lockfile.write_text(text.replace("version: 1.26.4", "version: 1.26.5"))
    assert read_lock_header(lockfile) == header
    assert locked_hash(config, CPU, "linux-64") != before
    lockfile.write_text(text)
    assert locked_hash(config, CPU, "linux-64") == before


def test_lock_hash_is_fast_on_a_large_real_lock(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The reuse path re-plans on every call: it must not parse thousands of packages."""
    key = "eotles-ai-research-env-cpu-5plat"
    (tmp_path / "lockfiles").mkdir()
    shutil.copy(REAL_LOCKS / f"{key}.conda-lock.yml", tmp_path / "lockfiles")
    config = load_config(tmp_path, home=tmp_path / "home", environ={})
    hashes = read_lock_header(config.locks_dir / f"{key}.conda-lock.yml")["content_hash"]
    assert isinstance(hashes, dict) and "linux-64" in hashes
    platform = "linux-64"
    parsed: list[bytes] = []
    load = reader._load

    def spy(raw: bytes, name: str) -> dict[str, Any]:
        parsed.append(raw)
        return load(raw, name)

    monkeypatch.setattr(reader, "_load", spy)
    plan = make_plan(config, key, platform=platform)
    assert plan.action == "build"
    # Fast because cheap: one YAML parse, of the header with the package block cut away
    # (the lock has thousands of entries; the whole file is only hashed as bytes).
    assert len(parsed) == 1
    assert b"package: []\n" in parsed[0] and b"- name:" not in parsed[0]
    lock_bytes = (config.locks_dir / f"{key}.conda-lock.yml").stat().st_size
    assert len(parsed[0]) < lock_bytes // 10


def test_ready_env_is_reused(config: Config) -> None:
    built = ensure(config, CPU)
    plan = make_plan(config, CPU)
    assert plan.action == "reuse" and plan.reason == "a ready env matches the lock"
    assert plan.generation == built.generation == plan.active_generation
    assert env_is_ready(plan.prefix, plan.lock_hash, plan.platform)
    assert not env_is_ready(plan.prefix, "0" * 64, plan.platform)


def test_ready_generation_without_pointer_becomes_active(config: Config) -> None:
    built = ensure(config, CPU)
    HomeLayout(config.home).pointer(CPU).unlink()
    plan = make_plan(config, CPU)
    assert plan.action == "reuse" and plan.active_generation is None
    assert "becomes the active one" in plan.reason
    assert plan.generation == built.generation


@pytest.mark.parametrize("damage", ["missing", "corrupt", "other-schema", "other-lock",
                                    "in-progress", "no-python"])
def test_damaged_env_is_repaired(config: Config, damage: str) -> None:
    built = ensure(config, CPU)
    fp = fingerprint_path(built.prefix)
    if damage == "missing":
        fp.unlink()
    elif damage == "corrupt":
        fp.write_text("{not json")
    elif damage in ("other-schema", "other-lock"):
        data = json.loads(fp.read_text())
        data["schema" if damage == "other-schema" else "lock_hash"] = (
            99 if damage == "other-schema" else "f" * 64)
        fp.write_text(json.dumps(data))
    elif damage == "in-progress":
        mark_in_progress(built.prefix, "interrupted")
    else:
        built.python.unlink()
    plan = make_plan(config, CPU)
    assert plan.action == "repair"
    assert plan.generation == built.generation
    expected = "interrupted" if damage == "in-progress" else "fingerprint"
    assert expected in plan.reason
    assert not env_is_ready(plan.prefix, plan.lock_hash, plan.platform)


def test_changed_lock_plans_a_rebuild(project: SampleProject, tmp_path: Path) -> None:
    config = copy_project(project, tmp_path)
    built = ensure(config, CPU)
    lockfile = config.locks_dir / f"{CPU}.conda-lock.yml"
    text = lockfile.read_text(encoding="utf-8")
    # A relock that moved transformers: same spec (content hash), other package.
    lockfile.write_text(text.replace("transformers-4.40.0", "transformers-4.36.2")
                        .replace("version: 4.40.0", "version: 4.36.2"), encoding="utf-8",
                        newline="\n")
    plan = make_plan(config, CPU)
    assert plan.action == "rebuild"
    assert plan.active_generation == built.generation != plan.generation
    assert "lock changed" in plan.reason


def test_interrupted_first_build_plans_a_repair(config: Config) -> None:
    layout = HomeLayout(config.home)
    gen = make_plan(config, CPU).generation
    stale = layout.staging / f"{CPU}.{gen}.0a1b2c"
    stale.mkdir(parents=True)
    fsops.write_marker(stale, "env")
    plan = make_plan(config, CPU)
    assert plan.action == "repair" and plan.stale_staging == (stale,)
    assert plan.to_dict()["stale_staging"] == [str(stale)]


def test_stale_staging_belongs_to_exactly_one_key(tmp_path: Path) -> None:
    layout = HomeLayout(tmp_path / "home")
    assert stale_staging_dirs(layout, "m") == []
    names = ["m.0123456789ab.aaaaaa", "m.v2.0123456789ab.bbbbbb", "mm.0123456789ab.cccccc",
             "m.v2.x.0123456789ab.dddddd"]
    for name in names:
        (layout.staging / name).mkdir(parents=True)
    (layout.staging / "m.0123456789ab.eeeeee").mkdir()

    def names_of(key: str) -> list[str]:
        return [p.name for p in stale_staging_dirs(layout, key)]

    assert names_of("m") == ["m.0123456789ab.aaaaaa", "m.0123456789ab.eeeeee"]
    assert names_of("m.v2") == ["m.v2.0123456789ab.bbbbbb"]
    assert names_of("m.v2.x") == ["m.v2.x.0123456789ab.dddddd"]
    assert names_of("mm") == ["mm.0123456789ab.cccccc"]


def test_plan_with_replaced_home_is_independent(config: Config, tmp_path: Path) -> None:
    other = replace(config, home=tmp_path / "elsewhere")
    a, b = make_plan(config, CPU), make_plan(other, CPU)
    assert a.generation == b.generation
    assert a.prefix != b.prefix and b.prefix.is_relative_to(tmp_path / "elsewhere")


def test_lock_hash_is_the_same_for_a_crlf_checkout(project: SampleProject,
                                                   tmp_path: Path) -> None:
    # Git on Windows checks out CRLF: the same lock must not build a new generation.
    config = copy_project(project, tmp_path)
    lockfile = config.locks_dir / f"{CPU}.conda-lock.yml"
    before = locked_hash(config, CPU, "linux-64")
    raw = lockfile.read_bytes()
    assert b"\r\n" not in raw
    lockfile.write_bytes(raw.replace(b"\n", b"\r\n"))
    assert locked_hash(config, CPU, "linux-64") == before
