"""Hostile packages: every one is refused before anything is linked, nothing outside the home
is touched, and the host process survives (issue 9, acceptance 1, the package half).

Each case is a real package written by the project's package writer in its raw mode
(members and ``paths.json`` exactly as given), put into a copy of the sample channel,
indexed with rattler and locked with provisioner's own solver. A canary directory sits
next to the home, where a ``../../../`` path from a staging dir lands.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from provisioner.build.artifacts import VerifiedArtifact, sha256_file
from provisioner.build.ensure import ensure
from provisioner.build.installer import install_in_child
from provisioner.build.layout import HomeLayout
from provisioner.config import Config, load_config
from provisioner.errors import BuildError, UnsafePackageError
from provisioner.lock.lockfile import LockedPackage
from provisioner.lock.platforms import host_platform
from provisioner.lock.write import lock_envs
from provisioner.models.resolve import get_env_for_model
from provisioner.sample.packages import RawMember, build_raw_package, index_channel
from provisioner.sample.stack import SAMPLE_CHANNEL

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths and symlinks")

# From a staging prefix <tmp>/home/.staging/<name>, three levels up is <tmp>.
UP = "../../../"
OK = RawMember("share/ok.txt", b"fine\n")


@dataclass(frozen=True)
class Case:
    """One hostile package (or two), and what the refusal must name."""

    members: tuple[RawMember, ...]
    names: str  # a fragment of the path the refusal names
    paths: tuple[dict[str, object], ...] | None = None
    fmt: str = "tar.bz2"
    second: tuple[RawMember, ...] = ()  # a second package of the same env


def _entry(path: str, size: int = 5) -> dict[str, object]:
    return {"_path": path, "path_type": "hardlink", "sha256": "0" * 64, "size_in_bytes": size}


CASES: dict[str, Case] = {
    "dotdot-member": Case((RawMember(f"{UP}canary/victim", b"pwned"),), "../"),
    "abs-member": Case((RawMember("/tmp/provisioner-evil-abs", b"pwned"),), "/tmp/"),
    "dotdot-paths-json": Case((RawMember("share/x", b"pwned"),), f"{UP}canary/victim",
                              paths=(_entry(f"{UP}canary/victim"),)),
    "abs-paths-json": Case((RawMember("share/x", b"pwned"),), "/canary/victim",
                           paths=(_entry("/tmp/provisioner-evil/canary/victim"),)),
    "nul-paths-json": Case((RawMember("share/x", b"pwned"),), "share/x\\x00",
                           paths=(_entry("share/x\x00y"),)),
    "drive-paths-json": Case((RawMember("share/x", b"pwned"),), "C:/",
                             paths=(_entry("C:/Windows/evil"),)),
    "paths-json-lies": Case((RawMember("share/x", b"pwned"),), "share/x",
                            paths=(_entry("share/x", size=1),)),
    "forged-fingerprint": Case((RawMember(".provisioner-fingerprint.json", b"{}"),),
                               ".provisioner-fingerprint.json"),
    "symlink-escape": Case((RawMember("lib/out", kind="symlink", target="../../../../canary"),
                            OK), "lib/out"),
    "symlink-dir-escape": Case((RawMember("sub/top", kind="symlink", target=".."),
                                RawMember("sub/esc", kind="symlink", target="top/.."), OK),
                               "sub/esc"),
    "symlink-across-two": Case((RawMember("sub/top", kind="symlink", target=".."), OK),
                               "sub/esc", second=(
                                   RawMember("sub/esc", kind="symlink", target="top/.."),
                                   RawMember("share/two.txt", b"two"))),
    "info-symlink-chain": Case((RawMember("info/a", kind="symlink", target=".."),
                                RawMember("info/b", kind="symlink", target="a/.."),
                                RawMember("info/b/escaped", b"pwned"), OK), "info/b"),
    "link-script": Case((RawMember("bin/.evil-post-link.sh",
                                   b"#!/bin/sh\nrm -rf \"$PREFIX/../../../canary\"\n"),),
                        "post-link"),
    "bz2-bomb": Case((RawMember("share/zeros", zeros=150 * 10**6),), "compression bomb"),
    "zstd-bomb": Case((RawMember("share/zeros", zeros=100 * 10**6),), "compression bomb",
                      fmt="conda"),
    "fifty-thousand-files": Case(tuple(RawMember(f"share/many/{i:05d}", b"")
                                       for i in range(50_000)), "more than 40000 files"),
    "conda-dotdot": Case((RawMember(f"{UP}canary/victim", b"pwned"),), "../", fmt="conda"),
    "conda-abs-paths-json": Case((RawMember("share/x", b"pwned"),), "/canary/victim",
                                 paths=(_entry("/tmp/provisioner-evil/canary/victim"),),
                                 fmt="conda"),
}


def _name(case: str) -> str:
    return f"evil-{case}"


@pytest.fixture(scope="module")
def hostile(shared_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample project plus one spec (and one or two packages) per case, all locked."""
    project = tmp_path_factory.mktemp("hostile") / "project"
    shutil.copytree(shared_project, project, symlinks=True)
    channel = project / "channel"
    for case, spec in CASES.items():
        build_raw_package(channel, "noarch", _name(case), "1.0", "0", spec.members,
                          paths=spec.paths, fmt=spec.fmt)
        deps = [_name(case)]
        if spec.second:
            build_raw_package(channel, "noarch", _name(case) + "-b", "1.0", "0", spec.second)
            deps.append(_name(case) + "-b")
        data = {"name": _name(case), "channels": [SAMPLE_CHANNEL], "platforms": [host_platform()],
                "dependencies": deps, "x-provisioner": {}}
        (project / "environment-specs" / f"{_name(case)}.yml").write_text(yaml.safe_dump(data))
    index_channel(channel)
    models = project / "environment-specs" / "models.yml"
    rules = yaml.safe_load(models.read_text())
    rules["rules"].insert(0, {"model": "evil/model", "env": _name("dotdot-paths-json")})
    models.write_text(yaml.safe_dump(rules))
    cfg = load_config(project, home=project / "unused-home", environ={})
    lock_envs(cfg, [_name(c) for c in CASES])
    return project


def _canary(tmp_path: Path) -> dict[str, bytes]:
    canary = tmp_path / "canary"
    (canary / "sub").mkdir(parents=True)
    (canary / "victim").write_bytes(b"alive")
    (canary / "sub" / "deep").write_bytes(b"alive too")
    return _snapshot(canary)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(root.rglob("*"))}


def _config(project: Path, tmp_path: Path) -> Config:
    (tmp_path / "legacy").mkdir(exist_ok=True)
    return load_config(project, home=tmp_path / "home", environ={}).with_overrides(
        legacy_root=tmp_path / "legacy")


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_package_is_refused_and_nothing_outside_the_home_changes(
        hostile: Path, tmp_path: Path, case: str) -> None:
    before = _canary(tmp_path)
    cfg = _config(hostile, tmp_path)
    with pytest.raises(UnsafePackageError) as info:
        ensure(cfg, _name(case))
    message = info.value.message
    assert message.count("\n") == 0
    assert _name(case) in message and CASES[case].names in message, message
    assert info.value.exit_code == 2 and info.value.hint
    assert _snapshot(tmp_path / "canary") == before
    assert not Path("/tmp/provisioner-evil-abs").exists()
    layout = HomeLayout(cfg.home)
    assert not any(layout.staging.iterdir()) if layout.staging.is_dir() else True
    assert not (layout.envs / _name(case)).exists() or not any(
        p.is_dir() for p in (layout.envs / _name(case)).iterdir())
    # Nothing was extracted into the cache either: the refusal came before rattler.
    cache = layout.package_cache
    assert not cache.is_dir() or not any(p.name.startswith("evil-") for p in cache.iterdir())


def test_host_process_survives_and_falls_back(hostile: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """get_env_for_model in this very process returns, down the fallback chain."""
    before = _canary(tmp_path)
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")
    cfg = _config(hostile, tmp_path)
    from tests.legacy_venvs import HEALTHY, create_venv, make_legacy

    base = create_venv(tmp_path / "base-venv")
    make_legacy(base, cfg.legacy_root or tmp_path, "evil/model", HEALTHY)
    res = get_env_for_model("evil/model", config=cfg.with_overrides(legacy_policy="fallback"))
    steps = [(a.step, a.outcome) for a in res.attempts]
    assert ("build shared env", "failed") in steps
    assert res.source.startswith("legacy")
    failed = next(a for a in res.attempts if a.step == "build shared env")
    assert "refused" in failed.detail and f"{UP}canary/victim" in failed.detail
    assert _snapshot(tmp_path / "canary") == before


def test_cli_refuses_with_one_line_and_exit_2(hostile: Path, tmp_path: Path) -> None:
    before = _canary(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    env["PROVISIONER_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-m", "provisioner", "ensure",
                           _name("abs-paths-json"), "--project", str(hostile)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "evil-abs-paths-json" in errors[0]
    assert "/canary/victim" in errors[0]
    assert _snapshot(tmp_path / "canary") == before


def test_configured_limits_and_link_scripts(hostile: Path, tmp_path: Path) -> None:
    """Limits come from [build]; a raised file limit lets the 50k-file package through."""
    project = tmp_path / "project"
    shutil.copytree(hostile, project, symlinks=True)
    toml = project / "provisioner.toml"
    toml.write_text(toml.read_text() + '\n[build]\npackage-files = 60000\nenv-files = 70000\n')
    cfg = _config(project, tmp_path)
    assert cfg.package_limits.package_files == 60000
    # Over the env limit instead of the package one now:
    toml.write_text(toml.read_text().replace("env-files = 70000", "env-files = 40000"))
    with pytest.raises(UnsafePackageError, match="the env unpacks past its limit"):
        ensure(_config(project, tmp_path), _name("fifty-thousand-files"))


def test_a_rattler_abort_in_the_installer_becomes_a_build_error(
        hostile: Path, tmp_path: Path) -> None:
    """Past the checks (called directly), an absolute paths.json entry makes rattler panic.

    The panic aborts the installer child, never this process; the error carries the
    child's last stderr lines.
    """
    before = _canary(tmp_path)
    archive = hostile / "channel" / "noarch" / f"{_name('abs-paths-json')}-1.0-0.tar.bz2"
    pkg = LockedPackage(name=_name("abs-paths-json"), version="1.0", manager="conda",
                        platform=host_platform(),
                        url=f"https://conda.anaconda.org/{SAMPLE_CHANNEL}/noarch/{archive.name}",
                        sha256=sha256_file(archive))
    target = tmp_path / "home" / "prefix"
    target.mkdir(parents=True)
    with pytest.raises(BuildError) as info:
        install_in_child([VerifiedArtifact(pkg, archive)], target=target, final=target,
                         cache_dir=tmp_path / "home" / "pkgs", progress=None)
    message = info.value.message
    # rattler's panic aborts the child (SIGABRT), or the child reports the cancelled
    # install first; either way the panic's last words come along.
    assert message.startswith(("the installer was killed by SIGABRT", "the installer exited 1")), \
        message
    assert "panic" in message
    assert _snapshot(tmp_path / "canary") == before
