"""``provisioner mirror``: a static channel subset, served by a plain HTTP server, builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from servers import static_server

from provisioner.build.ensure import ensure
from provisioner.build.maintenance import verify_env
from provisioner.build.mirror import make_mirror
from provisioner.config import load_config
from provisioner.errors import IntegrityError
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lockfile
from provisioner.sample.project import SampleProject, create_sample_project
from provisioner.sample.stack import SAMPLE_CHANNEL

CPU = "sample-cpu-transformers"
CU = "sample-cu121-transformers-bnb"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("mirror") / "sp")


def node(project: SampleProject, tmp_path: Path, toml: str) -> Path:
    dest = tmp_path / "node"
    for part in ("environment-specs", "lockfiles"):
        shutil.copytree(project.path / part, dest / part)
    (dest / "provisioner.toml").write_text(toml, encoding="utf-8")
    return dest


def archives(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")
            if p.name.endswith((".tar.bz2", ".conda"))}


def locked_archives(project: SampleProject, *keys: str) -> set[str]:
    names = set()
    for key in keys:
        lock = read_lockfile(project.path / "lockfiles" / f"{key}.conda-lock.yml")
        names |= {f"{SAMPLE_CHANNEL}/{p.subdir}/{p.file_name}"
                  for p in lock.packages if p.manager == "conda"}
    return names


def test_mirror_holds_exactly_the_locked_archives_indexed(project: SampleProject,
                                                          tmp_path: Path) -> None:
    config = load_config(project.path, home=tmp_path / "home", environ={})
    mirror = tmp_path / "mirror"
    first = make_mirror(config, [CPU], mirror)
    assert archives(mirror) == locked_archives(project, CPU)
    assert first.added == len(archives(mirror)) and first.present == 0
    assert first.platforms[CPU] == list(read_lockfile(
        project.path / "lockfiles" / f"{CPU}.conda-lock.yml").platforms)
    # Another key is added beside the first; what is there already is only checked.
    second = make_mirror(config, [CPU, CU], mirror)
    assert archives(mirror) == locked_archives(project, CPU, CU)
    assert second.present >= first.added and second.added == len(archives(mirror)) - first.added
    for subdir in ("noarch", host_platform()):
        repodata = json.loads((mirror / SAMPLE_CHANNEL / subdir / "repodata.json").read_text())
        listed = {f"{SAMPLE_CHANNEL}/{subdir}/{n}" for n in repodata["packages"]}
        assert listed == {a for a in archives(mirror) if a.split("/")[1] == subdir}
    assert second.channels == {SAMPLE_CHANNEL: len(archives(mirror))}


def test_a_mirror_served_over_http_builds(project: SampleProject, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    make_mirror(load_config(project.path, home=tmp_path / "h0", environ={}), [CPU], mirror,
                platforms=[host_platform()])
    with static_server(mirror) as (base, paths):
        where = node(project, tmp_path,
                     f'[channels]\n{SAMPLE_CHANNEL} = "{base}/{SAMPLE_CHANNEL}"\n')
        config = load_config(where, home=tmp_path / "home", environ={})
        result = ensure(config, CPU)
    assert result.action == "build"
    assert verify_env(config, CPU, deep=True).ok
    fetched = {p.rsplit("/", 1)[-1] for p in paths}
    lock = read_lockfile(where / "lockfiles" / f"{CPU}.conda-lock.yml")
    assert fetched == {p.file_name for p in lock.for_platform(host_platform(), "conda")}
    # The lock still names the canonical channel, never the mirror.
    assert all(p.url.startswith(f"https://conda.anaconda.org/{SAMPLE_CHANNEL}/")
               for p in lock.packages if p.manager == "conda")


def test_a_mirror_directory_works_as_the_channel_root(project: SampleProject,
                                                      tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    make_mirror(load_config(project.path, home=tmp_path / "h0", environ={}), [CPU], mirror)
    where = node(project, tmp_path, f'channel-root = "{mirror.as_posix()}"\n')
    assert ensure(load_config(where, home=tmp_path / "home", environ={}), CPU).action == "build"


def test_a_different_file_under_the_same_name_is_refused(project: SampleProject,
                                                         tmp_path: Path) -> None:
    config = load_config(project.path, home=tmp_path / "home", environ={})
    mirror = tmp_path / "mirror"
    make_mirror(config, [CPU], mirror)
    victim = sorted((mirror / SAMPLE_CHANNEL / "noarch").glob("*.tar.bz2"))[0]
    assert victim.stat().st_nlink == 1  # a copy: editing the mirror never edits the source
    victim.write_bytes(b"something else")
    with pytest.raises(IntegrityError, match="already holds another"):
        make_mirror(config, [CPU], mirror)
    assert victim.read_bytes() == b"something else"  # reported, not overwritten
