"""Windows MAX_PATH planned before a build writes anything (Windows path rules, on any host)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path, PureWindowsPath

import pytest
from winsupport import IS_WINDOWS, long_paths_off

from provisioner.build.artifacts import verify_artifacts
from provisioner.build.layout import HomeLayout
from provisioner.build.package_checks import CheckedPackage, check_packages
from provisioner.build.path_budget import (
    WINDOWS_MAX_PATH,
    check_build_paths,
    long_paths_enabled,
    plan_path_lengths,
    refuse_long_paths,
    windows_path_length,
)
from provisioner.config import load_config
from provisioner.errors import EnvironmentProblemError
from provisioner.lock.channels import resolve_channels
from provisioner.lock.check import lockfile_path
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lockfile

CPU = "sample-cpu-transformers"
REL = "Lib/site-packages/transformers/models/x/modeling_x.py"


def base_of_length(n: int) -> str:
    """A drive path of exactly ``n`` characters."""
    return "C:\\" + "d" * (n - 3)


def test_length_is_measured_with_windows_separators() -> None:
    base = r"C:\Users\me\AppData\Local\provisioner\envs\k\g-0123"
    assert windows_path_length(base, REL) == len(base) + 1 + len(REL)
    assert str(PureWindowsPath(base, *REL.split("/"))).count("/") == 0
    unc = r"\\server\share\pv\envs\k"
    assert windows_path_length(unc, "a/b") == len(unc) + len(r"\a\b")


@pytest.mark.parametrize(("total", "too_long"), [(WINDOWS_MAX_PATH - 1, False),
                                                 (WINDOWS_MAX_PATH, True),
                                                 (WINDOWS_MAX_PATH + 40, True)])
def test_a_path_of_260_characters_is_refused_when_long_paths_are_off(
        total: int, too_long: bool) -> None:
    base = base_of_length(total - 1 - len(REL))
    verdict = plan_path_lengths([r"C:\short", base], [REL, "a.txt"], long_paths=False)
    assert verdict.length == total
    assert verdict.too_long is too_long
    assert verdict.path.startswith(base) and verdict.path.endswith("modeling_x.py")
    assert not plan_path_lengths([base], [REL], long_paths=True).too_long


def test_the_refusal_is_one_line_with_a_hint() -> None:
    verdict = plan_path_lengths([base_of_length(250)], [REL], long_paths=False)
    with pytest.raises(EnvironmentProblemError) as info:
        refuse_long_paths("k", verdict)
    assert "\n" not in info.value.message
    assert f"{verdict.length} characters" in info.value.message
    assert "LongPathsEnabled" in (info.value.hint or "")
    assert "shorter home" in (info.value.hint or "")
    assert info.value.exit_code == 2
    refuse_long_paths("k", plan_path_lengths([r"C:\pv"], [REL], long_paths=False))  # fine


@pytest.fixture(scope="module")
def checked(shared_project: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> list[CheckedPackage]:
    """The sample key's real packages, verified and checked as a build does."""
    config = load_config(shared_project, home=tmp_path_factory.mktemp("h") / "home", environ={})
    lock = read_lockfile(lockfile_path(config.locks_dir, CPU))
    packages = lock.for_platform(host_platform(), "conda")
    cache = HomeLayout(config.home).package_cache
    artifacts = verify_artifacts(packages, resolve_channels(lock.channels, config), cache)
    return check_packages(artifacts, config.package_limits, cache)


def test_checked_packages_know_their_longest_path(checked: list[CheckedPackage]) -> None:
    longest = [c.summary.longest_path for c in checked]
    assert sum(1 for p in longest if p) >= len(longest) - 1  # a metapackage has no files
    assert all(".." not in p and not p.startswith("/") for p in longest)
    for c in checked:  # each is the longest of its package's own paths
        assert all(len(d) < len(c.summary.longest_path) for d in c.summary.dirs)


def test_a_build_under_a_long_home_is_refused_before_it_starts(
        checked: list[CheckedPackage]) -> None:
    longest = max(len(c.summary.longest_path) for c in checked)
    cache = r"C:\c"
    fits = base_of_length(WINDOWS_MAX_PATH - 2 - longest)
    check_build_paths("k", [PureWindowsPath(fits)], checked, PureWindowsPath(cache),
                      windows=True, long_paths=False)
    reaches = base_of_length(WINDOWS_MAX_PATH - 1 - longest)
    with pytest.raises(EnvironmentProblemError, match=f"{WINDOWS_MAX_PATH} characters"):
        check_build_paths("k", [PureWindowsPath(r"C:\pv\envs\k"), PureWindowsPath(reaches)],
                          checked, PureWindowsPath(cache), windows=True, long_paths=False)
    # Long paths on, or not Windows: nothing is refused.
    check_build_paths("k", [PureWindowsPath(reaches)], checked, PureWindowsPath(cache),
                      windows=True, long_paths=True)
    check_build_paths("k", [PureWindowsPath(reaches)], checked, PureWindowsPath(cache),
                      windows=False, long_paths=False)


def test_the_package_cache_path_counts_too(checked: list[CheckedPackage]) -> None:
    cache = PureWindowsPath(base_of_length(230))
    with pytest.raises(EnvironmentProblemError) as info:
        check_build_paths("k", [PureWindowsPath(r"C:\pv")], checked, cache,
                          windows=True, long_paths=False)
    expected = max(windows_path_length(
        cache / c.artifact.package.file_name.removesuffix(".conda").removesuffix(".tar.bz2"),
        c.summary.longest_path) for c in checked)
    assert f"would be {expected} characters" in info.value.message
    check_build_paths("k", [PureWindowsPath(r"C:\pv")], checked, PureWindowsPath(r"C:\c"),
                      windows=True, long_paths=False)


def test_long_paths_enabled_reads_the_registry_value() -> None:
    def reader(value: object):  # type: ignore[no-untyped-def]
        def read(subkey: str, name: str) -> object:
            assert name == "LongPathsEnabled" and subkey.endswith("FileSystem")
            if isinstance(value, BaseException):
                raise value
            return value
        return read

    assert long_paths_enabled(reader(1)) is True
    assert long_paths_enabled(reader(0)) is False
    assert long_paths_enabled(reader(FileNotFoundError())) is False
    assert long_paths_enabled(reader(PermissionError())) is None


# --- end to end: a deep home through the real CLI --------------------------------------------

# The CLI with the budget check forced on as on Windows with long paths off, through its
# seam (the keyword arguments ensure leaves at their defaults).
_FORCED_CLI = (
    "import functools, sys\n"
    "from provisioner.build import path_budget\n"
    "path_budget.check_build_paths = functools.partial(\n"
    "    path_budget.check_build_paths, windows=True, long_paths=False)\n"
    "from provisioner.cli import main\n"
    "sys.argv[0] = 'provisioner'\n"
    "main()\n"
)
HOME_LENGTH = 200  # creatable with long paths off (a directory < 248); its env paths are not


def deep_home(tmp_path: Path) -> Path:
    """A home of :data:`HOME_LENGTH` characters: its staging paths pass 260 with the sample."""
    pad = max(8, HOME_LENGTH - len(str(tmp_path)) - 1)
    return tmp_path / ("h" * pad)


@pytest.mark.parametrize("forced", [False, True], ids=["registry", "forced"])
def test_a_deep_home_is_refused_cleanly_only_where_long_paths_are_off(
        shared_project: Path, tmp_path: Path, forced: bool) -> None:
    """CI's Windows leg with LongPathsEnabled=0 refuses for real; every other host builds it.

    ``forced`` runs the refusal everywhere (Linux included) through the check's seam.
    """
    home = deep_home(tmp_path)
    refused = forced or (IS_WINDOWS and long_paths_off())
    if IS_WINDOWS and long_paths_off():
        assert long_paths_enabled() is False, "the CI step did not turn long paths off"
    env = {**os.environ, "CONDA_OVERRIDE_CUDA": "12.1", "PROVISIONER_HOME": str(home)}
    env.pop("PROVISIONER_DEBUG", None)
    argv = ["-c", _FORCED_CLI] if forced else ["-m", "provisioner"]
    done = subprocess.run([sys.executable, *argv, "ensure", CPU, "--project",
                           str(shared_project)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    layout = HomeLayout(home)
    if not refused:
        assert done.returncode == 0, done.stderr
        python = Path(done.stdout.strip().splitlines()[-1])
        assert python.is_file() and python.is_relative_to(layout.envs)
        return
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "Windows long paths are off" in errors[0] and "characters" in errors[0]
    assert any(line.startswith("hint: ") and "LongPathsEnabled" in line
               for line in done.stderr.splitlines()), done.stderr
    assert not layout.envs.exists() or not any(layout.envs.iterdir()), "nothing under envs/"
    assert not layout.staging.exists() or not any(layout.staging.iterdir())
