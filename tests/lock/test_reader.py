"""Locks are read by structure: any key order, block or flow style, and no conda_lock import.

Every real lock (third-party ones and the committed ones) is read both with conda-lock's own
parser and with :mod:`provisioner.lock.reader`, and the two must agree entry by entry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner.config import load_config
from provisioner.errors import LockfileError
from provisioner.lock.check import check_key
from provisioner.lock.lockfile import LockData, LockedPackage
from provisioner.lock.reader import read_lock_header, read_lockfile
from provisioner.sample.project import create_sample_project

REPO = Path(__file__).resolve().parents[2]
REAL_LOCKS = sorted((REPO / "tests" / "data" / "real-locks").glob("*.conda-lock.yml"))
COMMITTED = sorted((REPO / "lockfiles").glob("*.conda-lock.yml"))
CPU = "sample-cpu-transformers"


def _conda_lock_view(path: Path) -> LockData:
    """The same lock as conda-lock's own parser sees it."""
    from conda_lock.lockfile import parse_conda_lock_file

    lock = parse_conda_lock_file(path)
    return LockData(
        platforms=tuple(lock.metadata.platforms),
        channels=tuple(c.url for c in lock.metadata.channels),
        content_hash=dict(lock.metadata.content_hash),
        packages=tuple(
            LockedPackage(
                name=d.name, version=str(d.version), manager=d.manager, platform=d.platform,
                url=str(d.url), sha256=d.hash.sha256, md5=d.hash.md5,
                dependencies=tuple(sorted((str(k), str(v)) for k, v in d.dependencies.items())),
                categories=tuple(sorted(d.categories)),
            )
            for d in lock.package
        ),
        sources=tuple(lock.metadata.sources),
        extra=dict(lock.metadata.custom_metadata or {}),
    )


@pytest.mark.parametrize("path", REAL_LOCKS + COMMITTED, ids=lambda p: p.name)
def test_reader_agrees_with_conda_lock(path: Path) -> None:
    ours = read_lockfile(path, check_hashes=False)
    theirs = _conda_lock_view(path)
    assert ours.platforms == theirs.platforms
    assert ours.channels == theirs.channels
    assert ours.content_hash == theirs.content_hash
    assert ours.sources == theirs.sources
    assert ours.extra == theirs.extra
    key = lambda p: (p.platform, p.manager, p.name, p.url)  # noqa: E731
    assert sorted(ours.packages, key=key) == sorted(theirs.packages, key=key)
    assert len(ours.packages) > 100


def _rewrite(src: Path, dest: Path, *, flow: bool) -> None:
    """The same lock with ``package`` first, then ``metadata``, then ``version``."""
    data = yaml.safe_load(src.read_text(encoding="utf-8"))
    reordered = {"package": data["package"], "metadata": data["metadata"],
                 "version": data["version"]}
    dest.write_text(yaml.safe_dump(reordered, default_flow_style=flow, sort_keys=False,
                                   width=100_000), encoding="utf-8")


@pytest.mark.parametrize("flow", [False, True], ids=["block", "flow"])
def test_package_first_and_flow_style_read_the_same(tmp_path: Path, flow: bool) -> None:
    src = COMMITTED[0]
    dest = tmp_path / src.name
    _rewrite(src, dest, flow=flow)
    assert dest.read_text(encoding="utf-8").lstrip().startswith("{" if flow else "package:")
    assert read_lockfile(dest) == read_lockfile(src)
    assert read_lock_header(dest) == read_lock_header(src)
    assert _conda_lock_view(dest) == _conda_lock_view(src)  # conda-lock agrees it is valid


@pytest.mark.parametrize("flow", [False, True], ids=["block", "flow"])
def test_committed_locks_rewritten_check_clean(tmp_path: Path, flow: bool) -> None:
    project = tmp_path / "p"
    shutil.copytree(REPO / "environment-specs", project / "environment-specs")
    shutil.copytree(REPO / "lockfiles", project / "lockfiles")
    for lock in (project / "lockfiles").glob("*.conda-lock.yml"):
        _rewrite(lock, lock, flow=flow)
    config = load_config(project, home=tmp_path / "home", environ={})
    for lock in COMMITTED:
        key = lock.name.removesuffix(".conda-lock.yml")
        result = check_key(config, key)
        assert result.ok, result.reasons


def test_sample_lock_rewritten_in_flow_style_builds(tmp_path: Path) -> None:
    from provisioner.build.ensure import ensure

    project = create_sample_project(tmp_path / "sample").path
    lock = project / "lockfiles" / f"{CPU}.conda-lock.yml"
    before = read_lockfile(lock)
    _rewrite(lock, lock, flow=True)
    config = load_config(project, home=tmp_path / "home", environ={})
    assert check_key(config, CPU).ok
    result = ensure(config, CPU)
    assert result.action == "build"
    assert read_lockfile(lock) == before
    assert (result.prefix / "conda-meta").is_dir()


@pytest.mark.parametrize(("text", "message"), [
    ("version: 1\nmetadata: {}\n", "no 'metadata' and 'package' keys"),
    ("- a\n- b\n", "top level is not a mapping"),
    ("version: 3\nmetadata: {}\npackage: []\n", "lockfile version 3 is not 1"),
    ("version: 1\nmetadata: {platforms: []}\npackage: [{name: x}]\n", "package #1 has no"),
    ("version: 1\nmetadata: {}\npackage:\n- {name: x, version: '1', manager: npm, platform: "
     "linux-64, url: u, hash: {sha256: a}}\n", "unknown manager 'npm'"),
    ("version: 1\nmetadata: [\n", "malformed YAML at line"),
])
def test_malformed_locks_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "x.conda-lock.yml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LockfileError) as info:
        read_lockfile(path)
    assert message in info.value.message
    assert "\n" not in info.value.message


# --- no conda_lock on the build and resolve paths --------------------------------------------

_PROBE = """
import atexit, sys
def report():
    names = sorted(m for m in sys.modules if m.split('.')[0] == 'conda_lock')
    sys.__stderr__.write('CONDA_LOCK_MODULES=%d\\n' % len(names))
atexit.register(report)
from provisioner.cli import main
sys.argv = ['provisioner', *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("noimport")
    project = create_sample_project(root / "sample").path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROVISIONER_", "CONDA_"))}
    env["PROVISIONER_HOME"] = str(root / "home")
    return {"project": project, "env": env}


@pytest.mark.parametrize("args", [
    ["ensure", CPU], ["ensure", CPU, "--dry-run"], ["resolve", "gpt2"], ["verify", CPU],
    ["list", "--no-probe"], ["health", CPU], ["gc", "--dry-run"],
    ["run", "gpt2", "--", "python", "-c", "print(1)"],
], ids=lambda a: " ".join(a))
def test_no_conda_lock_import(built_project: dict[str, Any], args: list[str]) -> None:
    project = built_project["project"]
    # The first ensure builds; every command after it finds the env.
    subprocess.run([sys.executable, "-c", _PROBE, "ensure", CPU, "--project", str(project)],
                   env=built_project["env"], capture_output=True, text=True, timeout=300)
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, args[0], "--project", str(project), *args[1:]],
        env=built_project["env"], capture_output=True, text=True, timeout=300,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.stderr
    assert "CONDA_LOCK_MODULES=0" in result.stderr, result.stderr


def test_no_conda_lock_import_on_a_build(built_project: dict[str, Any], tmp_path: Path) -> None:
    """A build (fresh home, nothing cached) reads its lock without conda-lock too."""
    env = {**built_project["env"], "PROVISIONER_HOME": str(tmp_path / "fresh-home")}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, "ensure", CPU, "--project", str(built_project["project"]),
         "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["action"] == "build"
    assert "CONDA_LOCK_MODULES=0" in result.stderr, result.stderr
