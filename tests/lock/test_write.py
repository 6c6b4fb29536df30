"""``lock``: real rattler solves of the sample project, written with conda-lock's writer."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from conda_lock.lockfile import parse_conda_lock_file

from provisioner.config import load_config
from provisioner.errors import EXIT_USER_ERROR, LockfileError, SolveError, UserError
from provisioner.lock.check import HASH_FIELD, check_locks, content_hash, lockfile_path
from provisioner.lock.spec import load_spec
from provisioner.lock.write import LockOutcome, lock_envs
from provisioner.sample.project import sample_platforms, write_sample_project
from provisioner.sample.stack import SAMPLE_CHANNEL, PackageFile, build_conda_package, index_channel

CANONICAL = f"https://conda.anaconda.org/{SAMPLE_CHANNEL}/"
CU121 = "sample-cu121-transformers"
CU121_BNB = "sample-cu121-transformers-bnb"
CPU = "sample-cpu-transformers"
ALL_KEYS = [CPU, CU121, CU121_BNB]
SHA256_RE = re.compile(r"[0-9a-f]{64}")


class Locked(NamedTuple):
    root: Path
    outcomes: list[LockOutcome]


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Locked:
    """A sample project locked once for the module. Copy it before changing anything."""
    root = tmp_path_factory.mktemp("locker") / "project"
    write_sample_project(root)
    return Locked(root, lock_envs(load_config(root, environ={})))


def copy_project(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def lock_bytes(project: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((project / "lockfiles").iterdir())}


def edit_spec(project: Path, key: str, **changes: object) -> None:
    path = project / "environment-specs" / f"{key}.yml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def spec_data(project: Path, key: str) -> dict[str, object]:
    data = yaml.safe_load((project / "environment-specs" / f"{key}.yml").read_text())
    assert isinstance(data, dict)
    return data


def versions(project: Path, key: str) -> dict[tuple[str, str], str]:
    """(platform, name) -> URL (which names version and build) of every locked package."""
    lock = parse_conda_lock_file(lockfile_path(project / "lockfiles", key))
    return {(dep.platform, dep.name): dep.url for dep in lock.package}


def build_of(url: str) -> str:
    return url.rsplit("/", 1)[-1].removesuffix(".tar.bz2").rsplit("-", 1)[-1]


# --- a two-platform lock ---------------------------------------------------------------------


def test_first_lock_writes_every_key(locked: Locked) -> None:
    assert [o.key for o in locked.outcomes] == ALL_KEYS
    for outcome in locked.outcomes:
        assert outcome.changed
        assert outcome.old is None
        assert outcome.lockfile == locked.root / "lockfiles" / f"{outcome.key}.conda-lock.yml"
        assert outcome.lockfile.is_file()
        assert set(outcome.counts) == set(sample_platforms())
        assert all(n > 0 for n in outcome.counts.values())
        assert outcome.pip_counts == {}
    assert sorted(lock_bytes(locked.root)) == sorted(f"{k}.conda-lock.yml" for k in ALL_KEYS)


@pytest.mark.parametrize(("key", "flavour"), [(CU121, "cuda12.1"), (CPU, "cpu")])
def test_lock_reads_back_with_conda_lock(
    locked: Locked, key: str, flavour: str, host_python_xy: str
) -> None:
    lock = parse_conda_lock_file(lockfile_path(locked.root / "lockfiles", key))
    assert {"linux-64", "win-64"} <= set(lock.metadata.platforms)
    assert list(lock.metadata.platforms) == sample_platforms()
    assert [c.url for c in lock.metadata.channels] == [SAMPLE_CHANNEL]
    assert list(lock.metadata.sources) == [f"environment-specs/{key}.yml"]
    for platform in lock.metadata.platforms:
        pkgs = {d.name: d for d in lock.package if d.platform == platform}
        assert {"python", "pytorch", "numpy", "transformers", "pytorch-mutex"} <= set(pkgs)
        torch = pkgs["pytorch"]
        assert torch.version == "2.2.1"
        if flavour == "cpu":
            assert build_of(torch.url) == f"py{host_python_xy}_cpu_0"
            assert build_of(pkgs["pytorch-mutex"].url) == "cpu"
            assert "pytorch-cuda" not in pkgs
        else:
            assert build_of(torch.url) == f"py{host_python_xy}_cuda12.1_cudnn8.9.2_0"
            assert build_of(pkgs["pytorch-mutex"].url) == "cuda"
            assert pkgs["pytorch-cuda"].version == "12.1"
            assert pkgs["cuda-cudart"].version == "12.1.105"
        assert pkgs["transformers"].url.startswith(f"{CANONICAL}noarch/")
        assert torch.url.startswith(f"{CANONICAL}{platform}/")


@pytest.mark.parametrize("key", ALL_KEYS)
def test_urls_are_canonical_and_hashes_match_the_archives(locked: Locked, key: str) -> None:
    path = lockfile_path(locked.root / "lockfiles", key)
    raw = path.read_bytes()
    assert b"file://" not in raw
    assert str(locked.root).encode() not in raw
    lock = parse_conda_lock_file(path)
    assert lock.package
    for dep in lock.package:
        assert dep.manager == "conda"
        assert dep.url.startswith(CANONICAL), dep.url
        archive = locked.root / "channel" / dep.url.removeprefix(CANONICAL)
        assert archive.is_file(), dep.url
        data = archive.read_bytes()
        assert dep.hash.sha256 is not None
        assert SHA256_RE.fullmatch(dep.hash.sha256), dep.name
        assert dep.hash.sha256 == hashlib.sha256(data).hexdigest(), dep.name
        assert dep.hash.md5 == hashlib.md5(data).hexdigest(), dep.name


@pytest.mark.parametrize("key", ALL_KEYS)
def test_content_hash_per_platform(locked: Locked, key: str) -> None:
    lock = parse_conda_lock_file(lockfile_path(locked.root / "lockfiles", key))
    spec = load_spec(locked.root / "environment-specs", key)
    assert set(lock.metadata.content_hash) == set(spec.platforms)
    custom = lock.metadata.custom_metadata or {}
    for platform, value in lock.metadata.content_hash.items():
        assert SHA256_RE.fullmatch(value)
        assert custom[HASH_FIELD.format(platform=platform)] == content_hash(spec, platform)
    assert len(set(lock.metadata.content_hash.values())) == len(spec.platforms)


# --- determinism ----------------------------------------------------------------------------


def test_relocking_is_byte_identical_and_unchanged(locked: Locked, tmp_path: Path) -> None:
    project = copy_project(locked.root, tmp_path / "again")
    before = lock_bytes(project)
    outcomes = lock_envs(load_config(project, environ={}))
    assert [o.changed for o in outcomes] == [False, False, False]
    assert [o.old is not None for o in outcomes] == [True, True, True]
    assert lock_bytes(project) == before == lock_bytes(locked.root)


def test_fresh_lock_elsewhere_from_the_same_channel_is_byte_identical(
    locked: Locked, tmp_path: Path
) -> None:
    project = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(locked.root / "environment-specs", project / "environment-specs")
    mirror = json.dumps(str(locked.root / "channel"))  # a valid TOML basic string
    (project / "provisioner.toml").write_text(f"[channels]\n{SAMPLE_CHANNEL} = {mirror}\n")
    outcomes = lock_envs(load_config(project, environ={}))
    assert all(o.changed and o.old is None for o in outcomes)
    assert lock_bytes(project) == lock_bytes(locked.root)


def test_channel_root_instead_of_a_mirror_gives_the_same_bytes(
    locked: Locked, tmp_path: Path
) -> None:
    root = tmp_path / "mirrors"
    shutil.copytree(locked.root / "channel", root / SAMPLE_CHANNEL)
    project = tmp_path / "project"
    shutil.copytree(locked.root / "environment-specs", project / "environment-specs")
    lock_envs(load_config(project, channel_root=root, environ={}), [CU121])
    assert lock_bytes(project) == {
        f"{CU121}.conda-lock.yml": lock_bytes(locked.root)[f"{CU121}.conda-lock.yml"]
    }


# --- --update -------------------------------------------------------------------------------


@pytest.fixture()
def newer_channel(locked: Locked, tmp_path: Path) -> Path:
    """A copy of the locked project; its channel gained transformers 4.41.0, accelerate 0.27.0."""
    project = copy_project(locked.root, tmp_path / "newer")
    channel = project / "channel"
    for name, version, deps in [
        ("transformers", "4.41.0", ["numpy >=1.17", "python >=3.8"]),
        ("accelerate", "0.27.0", ["numpy >=1.17", "python >=3.8", "pytorch >=1.10"]),
    ]:
        build_conda_package(
            channel, "noarch", name, version, "pyh_sample_0", depends=deps, noarch="python",
            files=[PackageFile(f"site-packages/{name}/__init__.py",
                               f'__version__ = "{version}"\n'.encode())],
        )
    index_channel(channel)
    return project


def _locked_versions(project: Path, name: str) -> set[str]:
    lock = parse_conda_lock_file(lockfile_path(project / "lockfiles", CU121))
    return {d.version for d in lock.package if d.name == name}


def test_plain_lock_prefers_the_locked_versions(newer_channel: Path, locked: Locked) -> None:
    assert _locked_versions(newer_channel, "transformers") == {"4.40.0"}
    [outcome] = lock_envs(load_config(newer_channel, environ={}), [CU121])
    assert not outcome.changed
    assert lock_bytes(newer_channel) == lock_bytes(locked.root)


def test_fresh_lock_sees_the_newer_packages(newer_channel: Path) -> None:
    """The control for the test above: without a lock the solver does pick the new versions."""
    lockfile_path(newer_channel / "lockfiles", CU121).unlink()
    lock_envs(load_config(newer_channel, environ={}), [CU121])
    assert _locked_versions(newer_channel, "transformers") == {"4.41.0"}
    assert _locked_versions(newer_channel, "accelerate") == {"0.27.0"}


def test_update_moves_only_the_named_package(newer_channel: Path) -> None:
    before = versions(newer_channel, CU121)
    [outcome] = lock_envs(load_config(newer_channel, environ={}), [CU121], update=["transformers"])
    assert outcome.changed
    after = versions(newer_channel, CU121)
    assert set(after) == set(before)
    moved = {k for k in before if before[k] != after[k]}
    assert moved == {(p, "transformers") for p in sample_platforms()}
    assert _locked_versions(newer_channel, "transformers") == {"4.41.0"}
    assert _locked_versions(newer_channel, "accelerate") == {"0.26.1"}
    assert outcome.old is not None
    assert {p.version for p in outcome.old.packages if p.name == "transformers"} == {"4.40.0"}
    # The spec did not change, so the lock is still current.
    assert all(r.ok for r in check_locks(load_config(newer_channel, environ={}), [CU121]))


def test_update_all_lets_every_package_move(newer_channel: Path) -> None:
    [outcome] = lock_envs(load_config(newer_channel, environ={}), [CU121], update_all=True)
    assert outcome.changed
    assert _locked_versions(newer_channel, "transformers") == {"4.41.0"}
    assert _locked_versions(newer_channel, "accelerate") == {"0.27.0"}


def test_update_of_a_package_not_in_the_lock_is_a_user_error(newer_channel: Path) -> None:
    before = lock_bytes(newer_channel)
    with pytest.raises(UserError, match="bitsandbytes") as info:
        lock_envs(load_config(newer_channel, environ={}), [CU121], update=["bitsandbytes"])
    assert "not in the lock" in info.value.message
    assert info.value.exit_code == EXIT_USER_ERROR
    assert lock_bytes(newer_channel) == before


def test_update_needs_an_existing_lock(newer_channel: Path) -> None:
    lockfile_path(newer_channel / "lockfiles", CU121).unlink()
    with pytest.raises(LockfileError, match="needs an existing lock"):
        lock_envs(load_config(newer_channel, environ={}), [CU121], update=["transformers"])
    assert not lockfile_path(newer_channel / "lockfiles", CU121).exists()


def test_update_and_update_all_cannot_be_combined(newer_channel: Path) -> None:
    with pytest.raises(UserError, match="cannot be combined"):
        lock_envs(load_config(newer_channel, environ={}), [CU121],
                  update=["transformers"], update_all=True)


# --- unsatisfiable specs --------------------------------------------------------------------


def _replace_dep(project: Path, key: str, old: str, new: str) -> None:
    deps = spec_data(project, key)["dependencies"]
    assert isinstance(deps, list)
    edit_spec(project, key, dependencies=[new if d == old else d for d in deps])


def test_unsatisfiable_version_leaves_the_lock_untouched(locked: Locked, tmp_path: Path) -> None:
    project = copy_project(locked.root, tmp_path / "p")
    before = lock_bytes(project)
    _replace_dep(project, CPU, "pytorch=2.2.1=*cpu*", "pytorch=9.9")
    with pytest.raises(SolveError) as info:
        lock_envs(load_config(project, environ={}), [CPU])
    message = info.value.message
    assert message.startswith(f"{CPU} (linux-64): the spec cannot be solved")
    # rattler's own explanation is carried over.
    assert "No candidates were found for pytorch 9.9" in message
    assert info.value.exit_code == EXIT_USER_ERROR
    assert info.value.hint
    assert lock_bytes(project) == before


def test_conflict_explanation_is_rattlers(locked: Locked, tmp_path: Path) -> None:
    project = copy_project(locked.root, tmp_path / "p")
    before = lock_bytes(project)
    _replace_dep(project, CPU, "transformers", "pytorch-mutex=1.0=cuda")
    with pytest.raises(SolveError) as info:
        lock_envs(load_config(project, environ={}), [CPU])
    message = info.value.message
    assert "The following packages are incompatible" in message
    assert "pytorch-mutex" in message
    assert "conflicts" in message
    assert lock_bytes(project) == before


def test_unsatisfiable_new_key_writes_no_file(locked: Locked, tmp_path: Path) -> None:
    project = copy_project(locked.root, tmp_path / "p")
    before = lock_bytes(project)
    data = spec_data(project, CPU)
    data["name"] = "sample-broken"
    data["dependencies"] = ["python", "pytorch=9.9"]
    (project / "environment-specs" / "sample-broken.yml").write_text(yaml.safe_dump(data))
    with pytest.raises(SolveError, match=r"pytorch 9\.9"):
        lock_envs(load_config(project, environ={}), ["sample-broken"])
    assert lock_bytes(project) == before
    assert sorted(p.name for p in (project / "lockfiles").iterdir()) == sorted(before)


def test_solve_failure_on_a_later_platform_writes_nothing(locked: Locked, tmp_path: Path) -> None:
    """Only win-64 lacks bitsandbytes, so linux-64 solves first and must not be written alone."""
    project = copy_project(locked.root, tmp_path / "p")
    before = lock_bytes(project)
    win_bnb = next((project / "channel" / "win-64").glob("bitsandbytes-*.tar.bz2"))
    win_bnb.unlink()
    index_channel(project / "channel")
    edit_spec(project, CU121_BNB, platforms=["linux-64", "win-64"])
    with pytest.raises(SolveError, match=r"\(win-64\)"):
        lock_envs(load_config(project, environ={}), [CU121_BNB], update_all=True)
    assert lock_bytes(project) == before


def test_a_failing_key_leaves_every_other_key_untouched(locked: Locked, tmp_path: Path) -> None:
    project = copy_project(locked.root, tmp_path / "p")
    _replace_dep(project, CU121, "transformers", "transformers >=4.40")  # solvable: moves
    _replace_dep(project, CU121_BNB, "pytorch=2.2.1", "pytorch=9.9")  # unsolvable
    before = lock_bytes(project)
    with pytest.raises(SolveError):
        lock_envs(load_config(project, environ={}), [CU121, CU121_BNB])
    assert lock_bytes(project) == before


def test_skip_pip_without_an_existing_pip_lock_is_an_error(locked: Locked, tmp_path: Path) -> None:
    project = copy_project(locked.root, tmp_path / "p")
    deps = list(spec_data(project, CPU)["dependencies"])  # type: ignore[call-overload]
    edit_spec(project, CPU, dependencies=[*deps, {"pip": ["tinywheel==1.0"]}])
    with pytest.raises(LockfileError, match="--skip-pip needs an existing"):
        lock_envs(load_config(project, environ={}), [CPU], skip_pip=True)
    assert not (project / "lockfiles" / f"{CPU}.linux-64.pip.txt").exists()


# --- channel::package --------------------------------------------------------------------------


def test_channel_qualified_dependency_solves_from_the_mirror(locked: Locked,
                                                             tmp_path: Path) -> None:
    """``<channel>::pkg`` is read from where the channel is mirrored, and locks the same."""
    project = copy_project(locked.root, tmp_path / "p")
    before = lock_bytes(project)[f"{CPU}.conda-lock.yml"]
    edit_spec(project, CPU, dependencies=["python", f"{SAMPLE_CHANNEL}::pytorch=2.2.1=*cpu*",
                                          "transformers"])
    [outcome] = lock_envs(load_config(project, environ={}), [CPU])
    after = lock_bytes(project)[f"{CPU}.conda-lock.yml"]
    assert outcome.changed  # the spec's hash changed, not the packages
    package_part = lambda b: b[b.index(b"\npackage:"):]  # noqa: E731
    assert package_part(after) == package_part(before)

    edit_spec(project, CPU, dependencies=["python", "elsewhere::pytorch", "transformers"])
    with pytest.raises(UserError) as info:
        lock_envs(load_config(project, environ={}), [CPU])
    assert "names channel 'elsewhere', which is not in the spec's channels" in info.value.message


# --- conda-lock is imported only to write ---------------------------------------------------

_PROBE = """
import atexit, sys
atexit.register(lambda: sys.__stderr__.write("CONDA_LOCK_MODULES=%d\\n" % len(
    [m for m in sys.modules if m.split(".")[0] == "conda_lock"])))
from provisioner.cli import main
sys.argv = ["provisioner", *sys.argv[1:]]
main()
"""


def _lock_cli(project: Path, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    result = subprocess.run([sys.executable, "-c", _PROBE, "lock", "--project", str(project),
                             *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    [count] = re.findall(r"CONDA_LOCK_MODULES=(\d+)", result.stderr)
    return int(count), result.stdout


def test_unchanged_locks_need_no_conda_lock(locked: Locked, tmp_path: Path) -> None:
    project = copy_project(locked.root, tmp_path / "p")
    before = lock_bytes(project)
    imported, out = _lock_cli(project)
    assert imported == 0 and out.count("unchanged") == len(ALL_KEYS)
    assert lock_bytes(project) == before
    assert _lock_cli(project, "--check")[0] == 0
    # A changed spec is hashed and written by conda-lock itself.
    deps = spec_data(project, CPU)["dependencies"]
    assert isinstance(deps, list)
    edit_spec(project, CPU, dependencies=[*deps, "numpy"])
    imported, out = _lock_cli(project, CPU)
    assert imported > 0 and "unchanged" not in out
    assert lock_bytes(project)[f"{CPU}.conda-lock.yml"] != before[f"{CPU}.conda-lock.yml"]


def test_skipping_the_writer_is_sound(locked: Locked, tmp_path: Path) -> None:
    # What is skipped for an unchanged lock: conda-lock would write the same bytes again.
    from provisioner.lock.conda_lock_io import write_lockfile
    from provisioner.lock.reader import read_lockfile

    committed = Path(__file__).resolve().parents[2] / "lockfiles"  # real size, with pip entries
    for path in [*sorted((locked.root / "lockfiles").iterdir()), *sorted(committed.iterdir())]:
        again = tmp_path / path.name
        write_lockfile(again, read_lockfile(path))
        assert again.read_bytes() == path.read_bytes(), path.name


def test_a_tampered_lock_is_rewritten(locked: Locked, tmp_path: Path) -> None:
    project = copy_project(locked.root, tmp_path / "p")
    path = lockfile_path(project / "lockfiles", CPU)
    original = path.read_bytes()
    first = SHA256_RE.search(original.decode())
    assert first is not None
    path.write_bytes(original.replace(first.group().encode(), b"0" * 64, 1))
    [outcome] = lock_envs(load_config(project, environ={}), [CPU])
    assert outcome.changed and path.read_bytes() == original
