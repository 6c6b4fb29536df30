"""The pip layer: uv locks ``pip:`` requirements on top of what conda already installs.

Every uv run here is real and offline: ``--no-index`` with ``--find-links`` to wheels
built by :func:`provisioner.sample.stack.build_wheel`. The one network test relocks the
committed ``torch-cu121-transformers-bnb`` key against PyPI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from provisioner.config import PipSettings, load_config
from provisioner.errors import EXIT_USER_ERROR, PipLayerError
from provisioner.lock.check import HASH_FIELD, check_locks, content_hash, lockfile_path
from provisioner.lock.lockfile import LockedPackage
from provisioner.lock.pip_layer import (
    conda_provided,
    install_pip_layer,
    lock_pip_layer,
    parse_compile_output,
    parse_pylock_wheels,
    python_platform_for,
)
from provisioner.lock.platforms import virtual_packages_for
from provisioner.lock.reader import read_lockfile
from provisioner.lock.spec import load_spec
from provisioner.lock.write import lock_envs
from provisioner.sample.project import sample_platforms, write_sample_project
from provisioner.sample.stack import build_wheel

REPO = Path(__file__).resolve().parents[2]
PROVISIONER = Path(sysconfig.get_path("scripts")) / (
    "provisioner.exe" if sys.platform == "win32" else "provisioner"
)
CONDA_MIRROR = REPO / "tests" / "data" / "conda-mirror"
COMMITTED_KEYS = ("torch-cu121-transformers", "torch-cu121-transformers-bnb")
BNB_KEY = "torch-cu121-transformers-bnb"
CPU = "sample-cpu-transformers"
DEAD_PROXY = "http://127.0.0.1:9"

network = pytest.mark.skipif(
    os.environ.get("PROVISIONER_NETWORK_TESTS") != "1",
    reason="needs the package index; set PROVISIONER_NETWORK_TESTS=1",
)


def conda_pkg(name: str, version: str, build: str = "0") -> LockedPackage:
    url = f"https://conda.anaconda.org/pytorch/linux-64/{name}-{version}-{build}.tar.bz2"
    return LockedPackage(name, version, "conda", "linux-64", url, "0" * 64)


#: What a conda solve of python + pytorch-cuda 12.1 provides (the names that matter here).
CONDA_LAYER = [
    conda_pkg("_openmp_mutex", "4.5", "2_gnu"),
    conda_pkg("cuda-cudart", "12.1.105"),
    conda_pkg("numpy", "1.26.4", "py311h64a7726_0"),
    conda_pkg("pip", "24.0", "pyhd8ed1ab_0"),
    conda_pkg("python", "3.11.8", "hab00c5b_0_cpython"),
    conda_pkg("pytorch", "2.2.1", "py3.11_cuda12.1_cudnn8.9.2_0"),
    conda_pkg("pytorch-cuda", "12.1", "ha16c6d3_5"),
    conda_pkg("pytorch-mutex", "1.0", "cuda"),
]


def pip_settings(*links: Path) -> PipSettings:
    return PipSettings(no_index=True, find_links=tuple(str(p) for p in links))


def lock_layer(
    requirements: list[str],
    wheels: Path,
    platform: str = "linux-64",
    conda: list[LockedPackage] = CONDA_LAYER,
) -> list[LockedPackage]:
    return lock_pip_layer(
        key="trap", requirements=requirements, platform=platform,
        virtual_packages=virtual_packages_for(platform, "12.1"),
        conda_packages=conda, settings=pip_settings(wheels),
    )


def names(entries: list[LockedPackage]) -> list[str]:
    return [e.name for e in entries]


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trap_wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PyPI's shape of the trap: bitsandbytes needs torch, and torch pulls nvidia wheels."""
    out = tmp_path_factory.mktemp("trap-wheels")
    return {
        "torch": build_wheel(out, "torch", "2.2.1", requires=[
            "nvidia-cublas-cu12==12.1.3.1; platform_system == 'Linux'", "numpy"]),
        "nvidia": build_wheel(out, "nvidia-cublas-cu12", "12.1.3.1"),
        "numpy": build_wheel(out, "numpy", "1.26.4"),
        "bitsandbytes": build_wheel(out, "bitsandbytes", "0.43.1", requires=["torch", "numpy"]),
    }


@pytest.fixture(scope="module")
def scipy_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bitsandbytes here also needs scipy, which the conda layer does not provide."""
    out = tmp_path_factory.mktemp("scipy-wheels")
    build_wheel(out, "torch", "2.2.1")
    build_wheel(out, "numpy", "1.26.4")
    build_wheel(out, "scipy", "1.12.0", requires=["numpy>=1.22"])
    build_wheel(out, "bitsandbytes", "0.43.1", requires=["torch", "numpy", "scipy"])
    return out


# --- the trap -------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["linux-64", "win-64"])
def test_conda_torch_is_not_pulled_again(trap_wheels: dict[str, Path], platform: str) -> None:
    wheels = trap_wheels["torch"].parent
    [entry] = lock_layer(["bitsandbytes>=0.43"], wheels, platform)
    assert (entry.name, entry.version, entry.manager, entry.platform) == (
        "bitsandbytes", "0.43.1", "pip", platform)
    assert entry.sha256 == file_sha(trap_wheels["bitsandbytes"])
    assert entry.url == trap_wheels["bitsandbytes"].as_uri()
    # What the wheel requires, with any version ('' : rattler rejects conda-lock's '*')
    assert entry.dependencies == (("numpy", ""), ("torch", ""))


def test_the_entries_install_with_require_hashes(
    trap_wheels: dict[str, Path], tmp_path: Path
) -> None:
    """Installing from the lock entries alone, by version and sha256, with --no-deps."""
    wheels = trap_wheels["torch"].parent
    entries = lock_layer(["bitsandbytes>=0.43"], wheels)
    target = tmp_path / "target"
    count = install_pip_layer(
        entries=entries, site_packages=target, python_version="3.11", platform="linux-64",
        virtual_packages=virtual_packages_for("linux-64", "12.1"), settings=pip_settings(wheels))
    assert count == 1
    installed = sorted(p.name for p in target.iterdir() if p.name.endswith(".dist-info"))
    assert installed == ["bitsandbytes-0.43.1.dist-info"]
    bad = [replace(entries[0], sha256="0" * 64)]
    with pytest.raises(PipLayerError, match="could not install the pip layer"):
        install_pip_layer(
            entries=bad, site_packages=tmp_path / "t2", python_version="3.11",
            platform="linux-64", virtual_packages=virtual_packages_for("linux-64", "12.1"),
            settings=pip_settings(wheels))


def test_dependency_conda_lacks_must_be_pinned(scipy_wheels: Path) -> None:
    with pytest.raises(PipLayerError) as info:
        lock_layer(["bitsandbytes>=0.43"], scipy_wheels)
    message = info.value.message
    assert "scipy==1.12.0 (needed by bitsandbytes)" in message
    assert "conda does not provide" in message
    assert "torch" not in message and "numpy" not in message
    assert info.value.hint
    assert info.value.exit_code == EXIT_USER_ERROR

    entries = lock_layer(["bitsandbytes>=0.43", "scipy==1.12.0"], scipy_wheels)
    assert names(entries) == ["bitsandbytes", "scipy"]
    assert entries[1].version == "1.12.0"
    assert entries[0].dependencies == (("numpy", ""), ("scipy", ""), ("torch", ""))
    assert all(e.sha256 and len(e.sha256) == 64 for e in entries)


BNB_URL = ("https://pypi.invalid/packages/f8/1a/x/"
           "bitsandbytes-0.43.3-py3-none-manylinux_2_24_x86_64.whl")
BNB_SHA = "cc99507c352be0715098b2c7577b690dd158972dc4ea10c7495bac104c7c79f0"
PYLOCK = f"""\
lock-version = "1.0"
created-by = "uv"
requires-python = ">=3.11"

[[packages]]
name = "BitsAndBytes"
version = "0.43.3"
wheels = [{{ url = "{BNB_URL}", size = 1, hashes = {{ sha256 = "{BNB_SHA}" }} }}]

[[packages]]
name = "sdist-only"
version = "1.0"
sdist = {{ url = "https://pypi.invalid/s.tar.gz", hashes = {{ sha256 = "00" }} }}
"""


def test_parse_pylock_wheels() -> None:
    assert parse_pylock_wheels(PYLOCK) == {
        "bitsandbytes": [(BNB_URL, BNB_SHA)],
        "sdist-only": [],
    }


def test_version_conflict_with_conda_is_an_error(tmp_path: Path) -> None:
    build_wheel(tmp_path, "torch", "2.2.1")
    build_wheel(tmp_path, "torch", "2.3.0")  # pip could pick it, but conda holds 2.2.1
    build_wheel(tmp_path, "numpy", "1.26.4")
    build_wheel(tmp_path, "bitsandbytes", "0.44.1", requires=["torch>=2.3", "numpy"])
    with pytest.raises(PipLayerError) as info:
        lock_layer(["bitsandbytes"], tmp_path)
    message = info.value.message
    assert message.startswith("trap (linux-64): uv could not lock the pip layer")
    assert "torch" in message
    assert "bitsandbytes" in message


# pytorch-mutex is a conda metapackage with no PyPI twin; conda's pip is PyPI's pip.
@pytest.mark.parametrize("requirement", ["torch>=2", "NumPy", "pip"])
def test_requirement_already_provided_by_conda(requirement: str, tmp_path: Path) -> None:
    with pytest.raises(PipLayerError, match="already provided by conda") as info:
        lock_layer([requirement], tmp_path)
    assert info.value.hint


def test_pip_layer_needs_python_in_conda(tmp_path: Path) -> None:
    no_python = [p for p in CONDA_LAYER if p.name != "python"]
    with pytest.raises(PipLayerError, match="needs python"):
        lock_layer(["bitsandbytes"], tmp_path, conda=no_python)


def test_conda_provided_maps_names() -> None:
    provided = conda_provided(CONDA_LAYER)
    assert provided["torch"] == "2.2.1"
    assert provided["numpy"] == "1.26.4"
    assert "pytorch" not in provided
    assert "python" not in provided and "pytorch-cuda" not in provided
    assert provided["pip"] == "24.0"  # conda's pip is PyPI's pip
    assert "-openmp-mutex" not in provided and "_openmp_mutex" not in provided


# --- uv output and platforms ----------------------------------------------------------------

UV_OUTPUT = """\
# This file was autogenerated by uv via the following command:
#    uv pip compile /tmp/provisioner-pip-x/requirements.in --constraint /tmp/c.txt --generate-hashes
bitsandbytes==0.43.1 \\
    --hash=sha256:4c3e7f5559fcf605f49a5cdcc85de21e1aae4db0b5109e3e4bb1f09625c8d311
    # via -r /tmp/provisioner-pip-x/requirements.in
Filelock==3.13.1 \\
    --hash=sha256:1aa5ef5c87d72c31770103b375a9f94ba38be2f4181a3643448b843595458c5a \\
    --hash=sha256:5ffa845303983e7a0b7ae17636509bc97997d58afeafa72fb141a17b152284cb
    # via torch
numpy==1.26.4 \\
    --hash=sha256:8e27f8a7424758f2eccc6bf3afadb8b43040c1dfb109bf4325fbc5e755a7fcbc
    # via
    #   -c /tmp/c.txt
    #   bitsandbytes
    #   scipy
nvidia-cublas-cu12==12.1.3.1 \\
    --hash=sha256:057d2262584924435991dfb3af2fe83897d7e6d6e392eea087ee6cef3f773012
    # via torch
scipy==1.12.0 \\
    --hash=sha256:c1ceb27f9a6ba52de98178858bd24fb28f9a08cd1b21d19ee30b716b8c437a4e
    # via
    #   -r /tmp/provisioner-pip-x/requirements.in
    #   bitsandbytes
torch==2.2.1 \\
    --hash=sha256:9bc5075534fae251b25865f48f15e5cc7db89eb2e3b33678170330eb933ed1fa
    # via
    #   -c /tmp/c.txt
    #   bitsandbytes
"""


def test_parse_compile_output_builds_the_via_graph() -> None:
    pins, parents = parse_compile_output(UV_OUTPUT)
    assert {name: pin.version for name, pin in pins.items()} == {
        "bitsandbytes": "0.43.1", "filelock": "3.13.1", "numpy": "1.26.4",
        "nvidia-cublas-cu12": "12.1.3.1", "scipy": "1.12.0", "torch": "2.2.1",
    }
    assert pins["filelock"].hashes == (
        "sha256:1aa5ef5c87d72c31770103b375a9f94ba38be2f4181a3643448b843595458c5a",
        "sha256:5ffa845303983e7a0b7ae17636509bc97997d58afeafa72fb141a17b152284cb",
    )
    assert pins["torch"].hashes == (
        "sha256:9bc5075534fae251b25865f48f15e5cc7db89eb2e3b33678170330eb933ed1fa",
    )
    assert parents == {
        "bitsandbytes": {"<root>"},
        "filelock": {"torch"},
        "numpy": {"bitsandbytes", "scipy"},  # the -c constraint source is dropped
        "nvidia-cublas-cu12": {"torch"},
        "scipy": {"<root>", "bitsandbytes"},
        "torch": {"bitsandbytes"},
    }


def test_parse_compile_output_of_nothing() -> None:
    assert parse_compile_output("") == ({}, {})
    assert parse_compile_output("# only a header\n") == ({}, {})


def test_python_platform_for() -> None:
    assert python_platform_for("linux-64", virtual_packages_for("linux-64", "12.1")) == (
        "x86_64-manylinux_2_28"
    )
    old_glibc = virtual_packages_for("linux-64", None, {"__glibc": "2.17"})
    assert python_platform_for("linux-64", old_glibc) == "x86_64-manylinux_2_17"
    assert python_platform_for("win-64", virtual_packages_for("win-64", "12.1")) == (
        "x86_64-pc-windows-msvc"
    )
    assert python_platform_for("osx-arm64", virtual_packages_for("osx-arm64", None)) == (
        "aarch64-apple-darwin"
    )


# --- end to end through lock_envs -----------------------------------------------------------


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A locked sample project; copy it before changing anything."""
    root = tmp_path_factory.mktemp("piplayer") / "project"
    write_sample_project(root)
    lock_envs(load_config(root, environ={}))
    return root


def _spec_deps(project: Path, key: str) -> list[object]:
    data = yaml.safe_load((project / "environment-specs" / f"{key}.yml").read_text())
    deps = data["dependencies"]
    assert isinstance(deps, list)
    return deps


def _set_deps(project: Path, key: str, deps: list[object]) -> None:
    path = project / "environment-specs" / f"{key}.yml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["dependencies"] = deps
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@pytest.fixture()
def pip_project(sample_root: Path, tmp_path: Path) -> Path:
    """The cpu key with ``pip: [peft>=0.10]``, wheels in <project>/wheels, locked by uv."""
    project = Path(shutil.copytree(sample_root, tmp_path / "project", symlinks=True))
    wheels = project / "wheels"
    # What PyPI would offer for the conda-provided packages, plus the one pip package.
    build_wheel(wheels, "torch", "2.2.1", requires=[
        "nvidia-cublas-cu12==12.1.3.1; platform_system == 'Linux'", "numpy"])
    build_wheel(wheels, "nvidia-cublas-cu12", "12.1.3.1")
    build_wheel(wheels, "numpy", "1.26.4")
    build_wheel(wheels, "transformers", "4.40.0", requires=["numpy>=1.17"])
    build_wheel(wheels, "peft", "0.10.0", requires=["torch>=1.13", "transformers", "numpy"])
    with (project / "provisioner.toml").open("a", encoding="utf-8") as fh:
        fh.write('\n[pip]\nno-index = true\nfind-links = ["wheels"]\n')
    _set_deps(project, CPU, [*_spec_deps(project, CPU), {"pip": ["peft>=0.10"]}])
    return project


def test_lock_envs_writes_pip_entries_per_platform(pip_project: Path) -> None:
    config = load_config(pip_project, environ={})
    [outcome] = lock_envs(config, [CPU])
    locks = pip_project / "lockfiles"
    platforms = sample_platforms()
    assert {"linux-64", "win-64"} <= set(platforms)
    assert outcome.changed
    assert outcome.pip_counts == dict.fromkeys(platforms, 1)
    assert not list(locks.glob("*.pip.txt"))  # the layer lives in the conda-lock file
    peft = pip_project / "wheels" / "peft-0.10.0-py3-none-any.whl"
    spec = load_spec(config.specs_dir, CPU)
    lock = read_lockfile(lockfile_path(locks, CPU))
    for platform in platforms:
        [entry] = lock.for_platform(platform, "pip")
        assert (entry.name, entry.version, entry.sha256) == ("peft", "0.10.0", file_sha(peft))
        assert entry.url == peft.resolve().as_uri()
        assert entry.dependencies == (("numpy", ""), ("torch", ""), ("transformers", ""))
        assert lock.extra[HASH_FIELD.format(platform=platform)] == content_hash(spec, platform)
    assert all(r.ok for r in check_locks(config))

    # Locking twice gives the same bytes.
    before = lockfile_path(locks, CPU).read_bytes()
    [again] = lock_envs(config, [CPU])
    assert not again.changed
    assert lockfile_path(locks, CPU).read_bytes() == before


def test_pip_entries_are_read_by_conda_lock_and_rattler(pip_project: Path) -> None:
    import rattler
    from conda_lock.lockfile import parse_conda_lock_file

    config = load_config(pip_project, environ={})
    lock_envs(config, [CPU])
    path = lockfile_path(pip_project / "lockfiles", CPU)
    theirs = parse_conda_lock_file(path)
    assert sorted((d.name, d.platform) for d in theirs.package if d.manager == "pip") == [
        ("peft", p) for p in sorted(sample_platforms())]
    env = rattler.LockFile.from_path(path).default_environment()
    pypi = {str(platform): [(p.name, p.version, sorted(p.requires_dist)) for p in pkgs]
            for platform, pkgs in env.pypi_packages().items()}
    assert pypi == {p: [("peft", "0.10.0", ["numpy", "torch", "transformers"])]
                    for p in sample_platforms()}


def test_skip_pip_keeps_the_locked_pip_entries(pip_project: Path) -> None:
    config = load_config(pip_project, environ={})
    lock_envs(config, [CPU])
    locks = pip_project / "lockfiles"
    before = {p.name: p.read_bytes() for p in locks.iterdir()}
    pip_before = read_lockfile(lockfile_path(locks, CPU)).for_platform("linux-64", "pip")
    shutil.rmtree(pip_project / "wheels")  # uv could no longer lock the layer

    [same] = lock_envs(config, [CPU], skip_pip=True)
    assert not same.changed
    assert {p.name: p.read_bytes() for p in locks.iterdir()} == before

    # A conda-side spec change relocks conda and keeps the pip entries as they are.
    deps = _spec_deps(pip_project, CPU)
    _set_deps(pip_project, CPU, ["transformers>=4.36" if d == "transformers" else d
                                 for d in deps])
    assert not check_locks(config, [CPU])[0].ok
    [relocked] = lock_envs(config, [CPU], skip_pip=True)
    assert relocked.changed
    assert relocked.pip_counts == dict.fromkeys(sample_platforms(), 1)
    after = read_lockfile(lockfile_path(locks, CPU))
    assert after.for_platform("linux-64", "pip") == pip_before
    assert check_locks(config, [CPU])[0].ok

    # Without --skip-pip the missing wheels are an error, and nothing is written.
    snapshot = {p.name: p.read_bytes() for p in locks.iterdir()}
    with pytest.raises(PipLayerError, match="uv could not lock the pip layer"):
        lock_envs(config, [CPU])
    assert {p.name: p.read_bytes() for p in locks.iterdir()} == snapshot


def test_skip_pip_without_locked_pip_entries_is_an_error(pip_project: Path) -> None:
    from provisioner.errors import LockfileError

    with pytest.raises(LockfileError, match="--skip-pip needs an existing lock with pip"):
        lock_envs(load_config(pip_project, environ={}), [CPU], skip_pip=True)


def test_unlockable_pip_layer_writes_nothing(pip_project: Path) -> None:
    deps = [d for d in _spec_deps(pip_project, CPU) if not isinstance(d, dict)]
    _set_deps(pip_project, CPU, [*deps, {"pip": ["not-on-the-find-links>=1"]}])
    locks = pip_project / "lockfiles"
    before = {p.name: p.read_bytes() for p in locks.iterdir()}
    with pytest.raises(PipLayerError, match="not-on-the-find-links"):
        lock_envs(load_config(pip_project, environ={}), [CPU])
    assert {p.name: p.read_bytes() for p in locks.iterdir()} == before


# --- the committed locks reproduce ----------------------------------------------------------


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROVISIONER_", "XDG_"))}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_DATA_HOME=str(tmp_path / "data"), UV_OFFLINE="1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy"):
        env[var] = DEAD_PROXY
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    return env


def _copy_committed(dest: Path, *, conda_locks: bool) -> Path:
    shutil.copytree(REPO / "environment-specs", dest / "environment-specs")
    (dest / "lockfiles").mkdir()
    if conda_locks:
        for path in (REPO / "lockfiles").iterdir():
            shutil.copy2(path, dest / "lockfiles" / path.name)
    return dest


def _committed(name: str) -> bytes:
    return (REPO / "lockfiles" / name).read_bytes()


@pytest.mark.parametrize("conda_locks", [True, False], ids=["over-the-locks", "from-scratch"])
def test_committed_conda_locks_reproduce_offline(tmp_path: Path, conda_locks: bool) -> None:
    project = _copy_committed(tmp_path / "copy", conda_locks=conda_locks)
    # From scratch only the key without a pip layer can be locked offline.
    keys = list(COMMITTED_KEYS) if conda_locks else ["torch-cu121-transformers"]
    result = subprocess.run(
        [str(PROVISIONER), "lock", *keys, "--skip-pip", "--channel-root", str(CONDA_MIRROR)],
        cwd=project, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    state = "unchanged" if conda_locks else "updated"
    for key in keys:
        assert f"{key}: {state} lockfiles/{key}.conda-lock.yml" in result.stdout
        name = f"{key}.conda-lock.yml"
        assert (project / "lockfiles" / name).read_bytes() == _committed(name), key
    assert sorted(p.name for p in (project / "lockfiles").iterdir()) == sorted(
        f"{k}.conda-lock.yml" for k in keys)


def test_committed_bnb_lock_has_bitsandbytes_as_a_pip_entry(tmp_path: Path) -> None:
    import rattler

    path = REPO / "lockfiles" / f"{BNB_KEY}.conda-lock.yml"
    [entry] = read_lockfile(path).for_platform("linux-64", "pip")
    assert (entry.name, entry.version) == ("bitsandbytes", "0.43.3")
    assert entry.sha256 and len(entry.sha256) == 64
    assert entry.url.endswith("/bitsandbytes-0.43.3-py3-none-manylinux_2_24_x86_64.whl")
    env = rattler.LockFile.from_path(path).default_environment()
    assert [p.name for pkgs in env.pypi_packages().values() for p in pkgs] == ["bitsandbytes"]
    for kind, needle in (("explicit", f"# pip bitsandbytes @ {entry.url}#sha256={entry.sha256}"),
                         ("env", f"bitsandbytes == 0.43.3 --hash=sha256:{entry.sha256}")):
        result = subprocess.run(
            [str(PROVISIONER.with_name("conda-lock")), "render", "--kind", kind, "-p",
             "linux-64", "--filename-template", str(tmp_path / f"{kind}-{{platform}}"),
             str(path)],
            cwd=tmp_path, env=_offline_env(tmp_path), capture_output=True, text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        [out] = [p for p in tmp_path.iterdir() if p.name.startswith(f"{kind}-linux-64")]
        assert needle in out.read_text(encoding="utf-8")


@network
@pytest.mark.network
def test_committed_bnb_lock_reproduces(tmp_path: Path) -> None:
    project = _copy_committed(tmp_path / "copy", conda_locks=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    result = subprocess.run(
        [str(PROVISIONER), "lock", BNB_KEY, "--channel-root", str(CONDA_MIRROR)],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lock = read_lockfile(project / "lockfiles" / f"{BNB_KEY}.conda-lock.yml")
    committed = read_lockfile(REPO / "lockfiles" / f"{BNB_KEY}.conda-lock.yml")
    # The wheel's file name and sha256 reproduce; its host is the index the machine used.
    for ours, theirs in zip(lock.for_platform("linux-64", "pip"),
                            committed.for_platform("linux-64", "pip"), strict=True):
        assert (ours.name, ours.version, ours.sha256, ours.file_name) == (
            theirs.name, theirs.version, theirs.sha256, theirs.file_name)
    assert lock.for_platform("linux-64", "conda") == committed.for_platform("linux-64", "conda")


# --- real conda <-> PyPI names (parselmouth's table) ----------------------------------------


def _add_xxhash_stack(project: Path) -> None:
    """conda-forge's shape: python-xxhash (PyPI xxhash 3.4.1) on the C library xxhash 0.8.2."""
    from provisioner.sample.packages import build_conda_package, index_channel

    channel = project / "channel"
    for subdir in sample_platforms():
        build_conda_package(channel, subdir, "xxhash", "0.8.2", "h_sample_0")
        build_conda_package(channel, subdir, "libcurl", "8.8.0", "h_sample_0")
        build_conda_package(channel, subdir, "python-xxhash", "3.4.1", "py_h_sample_0",
                            depends=["python", "xxhash >=0.8.2,<0.8.3.0a0"])
        build_conda_package(channel, subdir, "brotli-python", "1.1.0", "py_h_sample_0",
                            depends=["python"])
    build_conda_package(channel, "noarch", "tzdata", "2026c", "h_sample_0", noarch="generic")
    build_conda_package(channel, "noarch", "python-tzdata", "2026.3", "pyh_sample_0",
                        depends=["python"], noarch="python")
    index_channel(channel)


@pytest.fixture()
def xxhash_project(sample_root: Path, tmp_path: Path) -> Path:
    """The cpu key plus python-xxhash, brotli-python, python-tzdata and their C twins."""
    project = Path(shutil.copytree(sample_root, tmp_path / "project", symlinks=True))
    _add_xxhash_stack(project)
    wheels = project / "wheels"
    # PyPI offers newer xxhash wheels than conda's; conda's version must win.
    build_wheel(wheels, "xxhash", "3.5.0")
    build_wheel(wheels, "needs-xxhash", "1.0", requires=[
        "xxhash>=3", "brotli>=1.1", "tzdata>=2026.1"])
    with (project / "provisioner.toml").open("a", encoding="utf-8") as fh:
        fh.write('\n[pip]\nno-index = true\nfind-links = ["wheels"]\n')
    conda = [*_spec_deps(project, CPU), "python-xxhash", "brotli-python", "python-tzdata",
             "tzdata", "libcurl"]
    _set_deps(project, CPU, [*conda, {"pip": ["needs-xxhash"]}])
    return project


def test_pip_requirement_needing_xxhash_3_locks_on_python_xxhash(xxhash_project: Path) -> None:
    """The committed lock's trap: conda xxhash 0.8.2 is a C library, python-xxhash is PyPI's."""
    config = load_config(xxhash_project, environ={})
    [outcome] = lock_envs(config, [CPU])
    assert outcome.pip_counts == dict.fromkeys(sample_platforms(), 1)
    lock = read_lockfile(lockfile_path(xxhash_project / "lockfiles", CPU))
    for platform in sample_platforms():
        conda = {p.name: p.version for p in lock.for_platform(platform, "conda")}
        assert (conda["xxhash"], conda["python-xxhash"]) == ("0.8.2", "3.4.1")
        assert (conda["tzdata"], conda["python-tzdata"]) == ("2026c", "2026.3")
        provided = conda_provided(lock.for_platform(platform, "conda"))
        assert (provided["xxhash"], provided["brotli"], provided["tzdata"]) == (
            "3.4.1", "1.1.0", "2026.3")
        assert "libcurl" not in provided
        [entry] = lock.for_platform(platform, "pip")
        assert (entry.name, entry.version) == ("needs-xxhash", "1.0")
        # what the wheel needs, all provided by conda under their PyPI names
        assert entry.dependencies == (("brotli", ""), ("tzdata", ""), ("xxhash", ""))
    assert all(r.ok for r in check_locks(config))


@pytest.mark.parametrize(("requirement", "conda_version"), [
    ("xxhash", "3.4.1"), ("Brotli", "1.1.0"), ("tzdata", "2026.3")])
def test_pypi_twins_of_conda_packages_are_already_provided(
    xxhash_project: Path, requirement: str, conda_version: str
) -> None:
    deps = [d for d in _spec_deps(xxhash_project, CPU) if not isinstance(d, dict)]
    _set_deps(xxhash_project, CPU, [*deps, {"pip": [requirement]}])
    with pytest.raises(PipLayerError, match=f"already provided by conda \\({conda_version}\\)"):
        lock_envs(load_config(xxhash_project, environ={}), [CPU])


def test_a_conda_c_library_does_not_hold_back_its_pypi_namesake(
    xxhash_project: Path,
) -> None:
    """Only libcurl (no PyPI twin) in conda: PyPI's libcurl-named wheel is the pip layer's own."""
    build_wheel(xxhash_project / "wheels", "libcurl", "9.0")
    deps = [d for d in _spec_deps(xxhash_project, CPU) if not isinstance(d, dict)]
    _set_deps(xxhash_project, CPU, [*deps, {"pip": ["libcurl>=9"]}])
    [outcome] = lock_envs(load_config(xxhash_project, environ={}), [CPU])
    lock = read_lockfile(lockfile_path(xxhash_project / "lockfiles", CPU))
    assert [(e.name, e.version) for e in lock.for_platform("linux-64", "pip")] == [
        ("libcurl", "9.0")]
    assert outcome.pip_counts == dict.fromkeys(sample_platforms(), 1)
