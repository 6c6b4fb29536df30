"""A channel archive rebuilt under the same file name: ensure says to relock, lock relocks it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema

from provisioner.config import load_config
from provisioner.lock.channels import resolve_channels
from provisioner.lock.lockfile import lockfile_path
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lockfile
from provisioner.lock.refresh import changed_archives
from provisioner.lock.write import lock_envs
from provisioner.sample.packages import PackageFile, build_conda_package, index_channel
from provisioner.sample.stack import SAMPLE_CHANNEL, build_sample_channel

KEY = "rebuilt-env"


def _package(channel: Path, text: str) -> Path:
    archive = build_conda_package(
        channel, "noarch", "datafiles", "1.0", "h0_0", noarch="generic",
        files=[PackageFile("share/datafiles/data.txt", text.encode())])
    index_channel(channel)
    return archive


def _project(root: Path) -> Path:
    channel = root / "channel"
    platform = host_platform()
    build_sample_channel(channel, [platform])
    _package(channel, "first build\n")
    specs = root / "environment-specs"
    specs.mkdir(parents=True)
    (specs / f"{KEY}.yml").write_text(
        f"name: {KEY}\nchannels:\n- {SAMPLE_CHANNEL}\nplatforms:\n- {platform}\n"
        "dependencies:\n- python\n- datafiles\n", encoding="utf-8")
    (root / "provisioner.toml").write_text(
        f'home = "home"\n\n[channels]\n{SAMPLE_CHANNEL} = "channel"\n', encoding="utf-8")
    lock_envs(load_config(root, environ={}), [KEY])
    return root


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    return subprocess.run([sys.executable, "-m", "provisioner", *args, "--project", str(project)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


def _locked(project: Path, name: str) -> str | None:
    lock = read_lockfile(lockfile_path(project / "lockfiles", KEY))
    return next(p.sha256 for p in lock.for_platform(host_platform(), "conda") if p.name == name)


def test_rebuilt_archive_fails_ensure_then_lock_relocks_it(tmp_path: Path) -> None:
    project = _project(tmp_path / "proj")
    old_sha = _locked(project, "datafiles")
    python_sha = _locked(project, "python")
    archive = _package(project / "channel", "second build, other bytes\n")
    new_sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert new_sha != old_sha

    # Before the relock: ensure names the package and says to relock (exit 2, not a crash).
    ensure = _cli(project, "ensure", KEY)
    assert ensure.returncode == 2, ensure.stderr
    assert "datafiles" in ensure.stderr and f"provisioner lock {KEY}" in ensure.stderr

    # lock --check stays a solve-free content-hash check: the spec did not change.
    assert _cli(project, "lock", "--check", KEY).returncode == 0

    # A relock notices the other bytes, relocks that package and says so (JSON, then text).
    _package(project / "channel", "third build\n")
    as_json = _cli(project, "lock", KEY, "--json")
    assert as_json.returncode == 0, as_json.stderr
    [item] = json.loads(as_json.stdout)["keys"][0]["refreshed"]
    assert (item["name"], item["locked_sha256"]) == ("datafiles", old_sha)
    schema = json.loads((Path(__file__).parents[2] / "docs" / "schemas" / "lock.schema.json")
                        .read_text(encoding="utf-8"))
    jsonschema.validate(json.loads(as_json.stdout), schema,
                        cls=jsonschema.Draft202012Validator)
    third_sha = _locked(project, "datafiles")
    assert third_sha == item["channel_sha256"]
    lockfile = lockfile_path(project / "lockfiles", KEY)
    lockfile.write_text(lockfile.read_text(encoding="utf-8").replace(third_sha, old_sha),
                        encoding="utf-8", newline="\n")  # the stale lock again, for the text
    archive = _package(project / "channel", "second build, other bytes\n")
    relock = _cli(project, "lock", KEY)
    assert relock.returncode == 0, relock.stderr
    assert "relocked datafiles 1.0" in relock.stdout
    assert "changed under the same name" in relock.stdout
    assert f"{KEY}: updated" in relock.stdout
    assert _locked(project, "datafiles") == new_sha
    assert _locked(project, "python") == python_sha  # nothing else moved

    again = _cli(project, "lock", KEY, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["keys"][0]["refreshed"] == []  # it matches the channel now

    built = _cli(project, "ensure", KEY, "--json")
    assert built.returncode == 0, built.stderr
    prefix = Path(json.loads(built.stdout)["prefix"])
    data = prefix / "share" / "datafiles" / "data.txt"
    assert data.read_text() == "second build, other bytes\n"


def test_changed_archives_compares_by_file_name(tmp_path: Path) -> None:
    project = _project(tmp_path / "proj")
    config = load_config(project, environ={})
    lock = read_lockfile(lockfile_path(config.locks_dir, KEY))
    packages = lock.for_platform(host_platform(), "conda")
    sources = resolve_channels(lock.channels, config)
    assert changed_archives(packages, sources, host_platform()) == []
    _package(project / "channel", "other bytes\n")
    [changed] = changed_archives(packages, sources, host_platform())
    assert (changed.name, changed.file_name) == ("datafiles", "datafiles-1.0-h0_0.tar.bz2")
    assert changed.locked_sha256 == _locked(project, "datafiles")
    assert changed.channel_sha256 != changed.locked_sha256
