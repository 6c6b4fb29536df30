"""``verify --deep --repair`` restores an env's damaged files (issue 9, item 2)."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import LongSpelling
from winsupport import IS_WINDOWS

from provisioner.build.ensure import ensure
from provisioner.build.layout import python_path
from provisioner.build.maintenance import verify_env
from provisioner.build.repair import repair_env
from provisioner.config import Config

CPU = "sample-cpu-transformers"


def test_repair_restores_altered_missing_and_placeholder_files(
        config: Config, host_python_xy: str) -> None:
    prefix = ensure(config, CPU).prefix
    site = prefix / ("Lib/site-packages" if IS_WINDOWS
                     else f"lib/python{host_python_xy}/site-packages")
    # A hardlink into the cache: both are damaged. (The sample's Windows python has no
    # sitecustomize.py; its python._pth is such a link too.)
    shared = prefix / "python._pth" if IS_WINDOWS else site / "sitecustomize.py"
    good_shared = shared.read_bytes()
    with shared.open("r+b") as fh:
        fh.truncate(10)
    # POSIX: patched with the env's prefix at install time. Windows: the venv launcher,
    # another hardlink into the cache (no sample file there holds the prefix).
    python = python_path(prefix)
    good_python, mode = python.read_bytes(), python.stat().st_mode
    python.write_bytes(b"#!/bin/sh\nexit 3\n")
    marker = site / "_sample_python_marker.py"
    good_marker = marker.read_bytes()
    marker.unlink()

    before = verify_env(config, CPU, deep=True)
    assert not before.ok
    assert len(before.altered_files) == 2 and len(before.missing_files) == 1

    after = repair_env(config, CPU)
    assert after.ok, after.problems
    assert shared.read_bytes() == good_shared
    assert python.read_bytes() == good_python
    assert IS_WINDOWS or str(prefix).encode() in good_python
    assert python.stat().st_mode == mode and os.access(python, os.X_OK)
    assert marker.read_bytes() == good_marker


def test_repair_of_a_healthy_env_changes_nothing(config: Config) -> None:
    prefix = ensure(config, CPU).prefix
    python = python_path(prefix)
    inode = python.stat().st_ino
    assert repair_env(config, CPU).ok
    assert python.stat().st_ino == inode


def test_cli_verify_repair(config: Config, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from provisioner.cli import cli

    prefix = ensure(config, CPU).prefix
    python_path(prefix).write_bytes(b"broken")
    args = ["--home", str(config.home), "verify", CPU, "--project", str(config.project)]
    runner = CliRunner()
    assert runner.invoke(cli, [*args, "--deep"]).exit_code == 1
    result = runner.invoke(cli, [*args, "--repair"])
    assert result.exit_code == 0, result.output
    assert "deep" in result.output


def test_records_are_read_by_the_extended_length_spelling(tmp_path: Path,
                                                          long_spelling: LongSpelling) -> None:
    from provisioner.build import repair

    real = tmp_path / "env"
    (real / "conda-meta").mkdir(parents=True)
    (real / "conda-meta" / "torch-2.2.1-0.json").write_text('{"name": "torch"}',
                                                            encoding="utf-8")
    plain = long_spelling.route(real, repair)
    assert not plain.exists() and list(repair._records(plain)) == ["torch"]
