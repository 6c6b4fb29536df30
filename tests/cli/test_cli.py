"""The real ``provisioner`` console script, run as a subprocess in a throwaway home."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conda_lock.lockfile import parse_conda_lock_file

from provisioner.lock.platforms import SUPPORTED_PLATFORMS
from provisioner.sample.project import sample_platforms

REPO = Path(__file__).resolve().parents[2]
REAL_LOCKS = REPO / "tests" / "data" / "real-locks"
PROVISIONER = Path(sysconfig.get_path("scripts")) / (
    "provisioner.exe" if sys.platform == "win32" else "provisioner"
)
CU121 = "sample-cu121-transformers"
CU121_BNB = "sample-cu121-transformers-bnb"
CPU = "sample-cpu-transformers"
ALL_KEYS = [CPU, CU121, CU121_BNB]
HOSTILE_KEYS = ["../x", "a/b", "CON", "a\\b", "C:x", ""]
PYROVELOCITY = ["pyrovelocity-pt2.2.1-py311-cu121.conda-lock.yml",
                "pyrovelocity-pt2.3.1-cu121.conda-lock.yml"]
DEAD_PROXY = "http://127.0.0.1:9"  # anything that tries the network fails at once


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-home")


@pytest.fixture(scope="module")
def env(cli_home: Path) -> dict[str, str]:
    """The caller's environment minus provisioner settings, with a fresh home and no network."""
    result = {k: v for k, v in os.environ.items()
              if not k.startswith(("PROVISIONER_", "XDG_", "CONDA_", "UV_"))}
    result.update(
        HOME=str(cli_home), USERPROFILE=str(cli_home), LOCALAPPDATA=str(cli_home / "appdata"),
        XDG_DATA_HOME=str(cli_home / "data"), XDG_CACHE_HOME=str(cli_home / "cache"),
        XDG_CONFIG_HOME=str(cli_home / "config"), UV_OFFLINE="1",
    )
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy"):
        result[var] = DEAD_PROXY
    result.pop("NO_PROXY", None)
    result.pop("no_proxy", None)
    return result


def run(
    args: list[str], cwd: Path, env: dict[str, str], *, exe: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*(exe or [str(PROVISIONER)]), *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def assert_one_error(result: subprocess.CompletedProcess[str]) -> str:
    """Exit code 2 and one ``error:`` line on stderr, optionally followed by one ``hint:``."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert 1 <= len(lines) <= 2, lines
    assert lines[0].startswith("error: "), lines
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), lines
    assert result.stdout == ""
    return result.stderr


def snapshot(project: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(project)): p.read_bytes()
        for p in sorted(project.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """``provisioner sample DIR`` run once; copy the result before changing it."""
    work = tmp_path_factory.mktemp("cli-work")
    result = run(["sample", "proj"], work, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "sample project written to proj"
    assert [line.strip() for line in result.stdout.splitlines()[1:4]] == [
        f"locked {k}" for k in ALL_KEYS
    ]
    return work / "proj"


@pytest.fixture()
def project(sample_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sample_dir, tmp_path / "proj", symlinks=True))


def write_spec(project: Path, key: str, data: dict[str, object]) -> None:
    path = project / "environment-specs" / f"{key}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def read_spec(project: Path, key: str) -> dict[str, object]:
    data = yaml.safe_load((project / "environment-specs" / f"{key}.yml").read_text())
    assert isinstance(data, dict)
    return data


# --- help -----------------------------------------------------------------------------------


def test_help_lists_the_commands(tmp_path: Path, env: dict[str, str]) -> None:
    result = run(["--help"], tmp_path, env)
    assert result.returncode == 0
    assert result.stderr == ""
    commands = result.stdout.split("Commands:")[1].split()
    for name in ("lock", "show-lock", "sample"):
        assert name in commands


def test_python_dash_m_provisioner(tmp_path: Path, env: dict[str, str]) -> None:
    result = run(["--help"], tmp_path, env, exe=[sys.executable, "-m", "provisioner"])
    assert result.returncode == 0
    assert "show-lock" in result.stdout


def test_lock_help(tmp_path: Path, env: dict[str, str]) -> None:
    result = run(["lock", "--help"], tmp_path, env)
    assert result.returncode == 0
    for option in ("--check", "--update", "--update-all", "--channel-root", "--skip-pip",
                   "--json", "--project"):
        assert option in result.stdout


# --- sample, then check offline -------------------------------------------------------------


def test_sample_then_check_needs_no_network(sample_dir: Path, env: dict[str, str]) -> None:
    assert sorted(p.name for p in (sample_dir / "lockfiles").iterdir()) == sorted(
        f"{k}.conda-lock.yml" for k in ALL_KEYS
    )
    result = run(["lock", "--check"], sample_dir, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"ok      {k}" for k in ALL_KEYS]


def test_check_outside_a_project_is_an_error(tmp_path: Path, env: dict[str, str]) -> None:
    stderr = assert_one_error(run(["lock", "--check"], tmp_path, env))
    assert stderr.startswith("error: no specs found in ")
    assert "hint: " in stderr


def test_relock_of_the_sample_is_unchanged(project: Path, env: dict[str, str]) -> None:
    before = snapshot(project / "lockfiles")
    result = run(["lock", "--json"], project, env)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)["keys"]
    assert [o["key"] for o in outcomes] == ALL_KEYS
    assert [o["changed"] for o in outcomes] == [False, False, False]
    assert all(set(o["conda_packages"]) == set(sample_platforms()) for o in outcomes)
    assert snapshot(project / "lockfiles") == before


def test_sample_into_a_non_empty_dir(sample_dir: Path, env: dict[str, str]) -> None:
    before = snapshot(sample_dir)
    stderr = assert_one_error(run(["sample", str(sample_dir)], sample_dir.parent, env))
    assert "not an empty directory" in stderr
    assert snapshot(sample_dir) == before


# --- hostile input --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["lock", "show-lock", "lock --check"])
@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=ascii)
def test_hostile_keys_are_rejected(
    sample_dir: Path, env: dict[str, str], command: str, key: str
) -> None:
    before = snapshot(sample_dir)
    stderr = assert_one_error(run([*command.split(), key], sample_dir, env))
    assert "env key" in stderr
    assert snapshot(sample_dir) == before
    assert not (sample_dir.parent / "x").exists()


def test_hostile_key_among_good_ones_writes_nothing(project: Path, env: dict[str, str]) -> None:
    for path in (project / "lockfiles").iterdir():
        path.unlink()
    assert_one_error(run(["lock", CPU, "../x"], project, env))
    assert list((project / "lockfiles").iterdir()) == []


def test_malformed_yaml_spec(project: Path, env: dict[str, str]) -> None:
    (project / "environment-specs" / "broken.yml").write_text(
        "name: broken\nchannels: [provisioner-sample\ndependencies:\n  - python\n"
    )
    before = snapshot(project / "lockfiles")
    for args in (["lock", "broken"], ["lock"]):  # every spec is read before anything is solved
        stderr = assert_one_error(run(args, project, env))
        assert stderr.startswith("error: broken.yml: malformed YAML at line ")
        assert snapshot(project / "lockfiles") == before


def test_unknown_platform_in_spec(project: Path, env: dict[str, str]) -> None:
    data = read_spec(project, CPU)
    data["platforms"] = ["linux-64", "linux-32"]
    write_spec(project, CPU, data)
    before = snapshot(project / "lockfiles")
    stderr = assert_one_error(run(["lock", CPU], project, env))
    error, hint = stderr.splitlines()
    assert "unknown platform 'linux-32'" in error
    assert hint == f"hint: supported platforms: {', '.join(SUPPORTED_PLATFORMS)}"
    assert snapshot(project / "lockfiles") == before


def test_unsatisfiable_spec(project: Path, env: dict[str, str]) -> None:
    data = read_spec(project, CPU)
    deps = data["dependencies"]
    assert isinstance(deps, list)
    data["dependencies"] = ["pytorch=9.9" if d.startswith("pytorch") else d for d in deps]
    write_spec(project, CPU, data)
    before = snapshot(project / "lockfiles")
    result = run(["lock", CPU], project, env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"error: {CPU} (linux-64): the spec cannot be solved" in result.stderr
    assert "pytorch 9.9" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("hint: ")
    assert snapshot(project / "lockfiles") == before
    # lock --check still judges the spec, without solving.
    check = run(["lock", "--check", CPU], project, env)
    assert check.returncode == 1
    assert check.stdout.startswith(f"STALE   {CPU}: ")


def test_failed_solve_exits_cleanly_every_time(project: Path, env: dict[str, str]) -> None:
    """py-rattler's worker thread must be out of Python before the CLI exits.

    Before solver.py waited for it, about a third of these runs died in interpreter
    finalisation (SIGABRT or SIGSEGV, "Fatal Python error: PyGILState_Release").
    """
    data = read_spec(project, CPU)
    data["dependencies"] = ["python", "pytorch=9.9"]
    write_spec(project, CPU, data)
    (project / "lockfiles" / f"{CPU}.conda-lock.yml").unlink()  # no conda-lock import: faster
    procs = [
        subprocess.Popen([str(PROVISIONER), "-q", "lock", CPU], cwd=project, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert "Fatal Python error" not in err
        assert err.startswith(f"error: {CPU} (linux-64): the spec cannot be solved")


def test_update_unknown_package(project: Path, env: dict[str, str]) -> None:
    before = snapshot(project / "lockfiles")
    stderr = assert_one_error(run(["lock", CPU, "--update", "nosuchpkg"], project, env))
    assert "cannot update nosuchpkg" in stderr
    assert snapshot(project / "lockfiles") == before


def test_missing_spec_names_known_keys(project: Path, env: dict[str, str]) -> None:
    stderr = assert_one_error(run(["lock", "no-such-key"], project, env))
    assert "no spec for env key 'no-such-key'" in stderr
    assert f"hint: known keys: {', '.join(ALL_KEYS)}" in stderr


# --- show-lock ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_lock_summaries(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]
) -> dict[str, dict[str, object]]:
    """``show-lock --json`` of every vendored real lock, run in parallel."""
    cwd = tmp_path_factory.mktemp("cli-real")
    procs = {
        path.name: subprocess.Popen(
            [str(PROVISIONER), "show-lock", str(path), "--json"], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for path in sorted(REAL_LOCKS.glob("*.conda-lock.yml"))
    }
    summaries = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        summaries[name] = json.loads(out)
    return summaries


REAL_LOCK_NAMES = sorted(p.name for p in REAL_LOCKS.glob("*.conda-lock.yml"))


@pytest.mark.parametrize("name", REAL_LOCK_NAMES)
def test_show_lock_json_of_real_locks(
    real_lock_summaries: dict[str, dict[str, object]], name: str
) -> None:
    summary = real_lock_summaries[name]
    lock = parse_conda_lock_file(REAL_LOCKS / name)
    per_platform = Counter(dep.platform for dep in lock.package)
    assert summary["total"] == len(lock.package)
    assert summary["platforms"] == list(lock.metadata.platforms)
    rows = summary["per_platform"]
    assert isinstance(rows, list)
    assert {row["platform"]: row["total"] for row in rows} == dict(per_platform)
    for row in rows:
        managers = Counter(d.manager for d in lock.package if d.platform == row["platform"])
        assert row["counts"] == dict(managers)
    if name in PYROVELOCITY:
        [row] = rows
        assert row["pytorch_cuda"] == "12.1"
        assert row["cuda_driver_required"] == ">=12"  # pytorch-cuda's major
        assert row["cuda_driver_source"] == "CUDA major of pytorch-cuda 12.1"


def test_real_lock_list_is_complete() -> None:
    assert len(REAL_LOCK_NAMES) == 5
    assert set(PYROVELOCITY) <= set(REAL_LOCK_NAMES)


def test_show_lock_key_in_sample_project(
    sample_dir: Path, env: dict[str, str], host_python_xy: str
) -> None:
    result = run(["show-lock", CU121], sample_dir, env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == CU121
    assert "channels:  provisioner-sample" in lines
    assert f"platforms: {', '.join(sample_platforms())}" in lines
    rows = [(line[2:16].strip(), line[16:]) for line in lines if line.startswith("  ")]
    pytorch = [value for label, value in rows if label == "pytorch"]
    assert pytorch == [f"2.2.1 (py{host_python_xy}_cuda12.1_cudnn8.9.2_0)"] * len(
        sample_platforms()
    )
    assert "  pytorch CUDA  12.1" in lines

    as_json = json.loads(run(["show-lock", CU121, "--json", "--platform", "win-64"],
                             sample_dir, env).stdout)
    assert as_json["path"] == str(sample_dir / "lockfiles" / f"{CU121}.conda-lock.yml")
    assert as_json["key"] == CU121
    [win] = as_json["per_platform"]
    assert win["platform"] == "win-64"
    assert win["pytorch_cuda"] == "12.1"
    assert win["cuda_driver_required"] == ">=12.1"  # the __cuda it was locked with
    assert win["cuda_driver_source"] == "__cuda 12.1 recorded when locking"
    assert win["counts"] == {"conda": win["total"]}


def test_show_lock_from_another_dir_with_project(
    sample_dir: Path, env: dict[str, str], tmp_path: Path
) -> None:
    result = run(["show-lock", CPU, "--project", str(sample_dir), "--json"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert all(row["pytorch_cuda"] is None for row in summary["per_platform"])


def test_show_lock_unknown_platform(sample_dir: Path, env: dict[str, str]) -> None:
    stderr = assert_one_error(run(["show-lock", CPU, "--platform", "osx-64"], sample_dir, env))
    assert "platform 'osx-64' is not in" in stderr


def test_show_lock_of_a_key_without_lock(project: Path, env: dict[str, str]) -> None:
    (project / "lockfiles" / f"{CPU}.conda-lock.yml").unlink()
    stderr = assert_one_error(run(["show-lock", CPU], project, env))
    assert "does not exist" in stderr
