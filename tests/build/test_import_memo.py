"""The import-check memo, on real builds of the sample project.

A spy at the process boundary (``processes.run``, still running the real child)
tells whether the import probe ran; every env is a real rattler install.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from winsupport import SELF_KILLED_RC

from provisioner import processes
from provisioner.build import import_memo
from provisioner.build.ensure import ensure
from provisioner.build.env_checks import IMPORT_PROBE, site_packages
from provisioner.build.layout import HomeLayout, python_path
from provisioner.build.repair import repair_env
from provisioner.config import Config, load_config
from provisioner.errors import ImportCheckError
from provisioner.lock.platforms import host_platform
from provisioner.sample.project import SampleProject, create_sample_project

CPU = "sample-cpu-transformers"
CU_PLAIN = "sample-cu121-transformers"
HIT = import_memo.MEMO_HIT_MESSAGE


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("memo") / "sp")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")
    for name in ("PROVISIONER_BACKEND", "PROVISIONER_TEST_FAULT", "PROVISIONER_TEST_STEP_DELAY",
                 "PROVISIONER_FORCE_COPY", "PROVISIONER_HOME"):
        monkeypatch.delenv(name, raising=False)


class Spy:
    """Records the argv of every child started through ``processes.run``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[str]] = []
        real = processes.run

        def spy(argv: Sequence[str], **kwargs: Any) -> processes.ProcResult:
            self.calls.append([str(a) for a in argv])
            return real(argv, **kwargs)

        monkeypatch.setattr(processes, "run", spy)

    @property
    def probes(self) -> int:
        return sum(IMPORT_PROBE in argv for argv in self.calls)

    @property
    def prefix_checks(self) -> int:
        return sum("import sys; print(sys.prefix)" in argv for argv in self.calls)

    def clear(self) -> None:
        self.calls.clear()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    return Spy(monkeypatch)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
         ) -> pytest.LogCaptureFixture:
    monkeypatch.setattr(logging.getLogger("provisioner"), "propagate", True)
    caplog.set_level(logging.INFO, logger="provisioner")
    return caplog


def config_for(project: Path, tmp_path: Path) -> Config:
    return load_config(project, home=tmp_path / "home", environ={})


def delete_env(config: Config, key: str) -> None:
    """The warm case: the env is gone, the package cache is full."""
    shutil.rmtree(HomeLayout(config.home).key_dir(key))


def copy_project(project: SampleProject, tmp_path: Path) -> Path:
    dest = tmp_path / "sp"
    shutil.copytree(project.path, dest, ignore=shutil.ignore_patterns(".provisioner-home"))
    return dest


def memo_entries(config: Config) -> dict[str, Any]:
    path = import_memo.memo_path(HomeLayout(config.home).package_cache)
    if not path.exists():
        return {}
    entries: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))["entries"]
    return entries


def run_python(python: Path, code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                            env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_second_build_of_the_same_lock_skips_the_import_subprocess(
        project: SampleProject, tmp_path: Path, spy: Spy, logs: pytest.LogCaptureFixture) -> None:
    config = config_for(project.path, tmp_path)
    first = ensure(config, CPU)
    assert first.action == "build"
    assert spy.probes == 1 and HIT not in logs.text
    assert len(memo_entries(config)) == 1

    delete_env(config, CPU)
    spy.clear()
    logs.clear()
    second = ensure(config, CPU)
    assert second.action == "build" and second.generation == first.generation
    assert spy.probes == 0, "the memo should have skipped the import subprocess"
    assert HIT in logs.text
    assert spy.prefix_checks == 1  # the post-promotion "python starts" check still runs
    assert run_python(second.python, "import torch; print(torch.__version__)") == "2.2.1"

    delete_env(config, CPU)
    spy.clear()
    ensure(replace(config, import_check="always"), CPU)
    assert spy.probes == 1  # always-mode runs it


def test_a_different_lock_runs_the_check(project: SampleProject, tmp_path: Path,
                                         spy: Spy) -> None:
    config = config_for(project.path, tmp_path)
    ensure(config, CPU)
    spy.clear()
    ensure(config, CU_PLAIN)  # shares most packages, not all: another package set
    assert spy.probes == 1
    assert len(memo_entries(config)) == 2


def test_changed_imports_run_the_check(project: SampleProject, tmp_path: Path, spy: Spy) -> None:
    root = copy_project(project, tmp_path)
    config = config_for(root, tmp_path)
    ensure(config, CPU)
    delete_env(config, CPU)
    spec = root / "environment-specs" / f"{CPU}.yml"
    text = spec.read_text(encoding="utf-8")
    assert text.count("  - torch\n  - transformers\n") == 1
    spec.write_text(text.replace("  - torch\n  - transformers\n", "  - transformers\n"),
                    encoding="utf-8", newline="\n")
    spy.clear()
    ensure(config, CPU)
    assert spy.probes == 1


def test_a_damaged_cache_entry_forgets_the_memo(project: SampleProject, tmp_path: Path,
                                                spy: Spy, logs: pytest.LogCaptureFixture) -> None:
    config = config_for(project.path, tmp_path)
    ensure(config, CPU)
    delete_env(config, CPU)
    cache = HomeLayout(config.home).package_cache
    entry = next(p for p in cache.iterdir() if p.is_dir() and p.name.startswith("pytorch-2.2.1-"))
    victim = next(p for p in (entry / "lib").rglob("*.py") if p.stat().st_size > 0)
    victim.write_bytes(victim.read_bytes()[:-1])  # one byte short: the cache check sees it
    spy.clear()
    ensure(config, CPU)
    assert "is damaged" in logs.text
    assert spy.probes == 1
    assert len(memo_entries(config)) == 1  # recorded again after the passing check


def test_a_failed_check_writes_no_memo(project: SampleProject, tmp_path: Path, spy: Spy) -> None:
    root = copy_project(project, tmp_path)
    spec = root / "environment-specs" / f"{CPU}.yml"
    text = spec.read_text(encoding="utf-8")
    spec.write_text(text.replace("  - torch\n  - transformers\n",
                                 "  - torch\n  - transformers\n  - no_such_module_xyz\n"),
                    encoding="utf-8", newline="\n")
    config = config_for(root, tmp_path)
    for _attempt in range(2):
        spy.clear()
        with pytest.raises(ImportCheckError, match="no_such_module_xyz"):
            ensure(config, CPU)
        assert spy.probes == 1
        assert memo_entries(config) == {}


def test_a_killed_build_writes_no_memo(project: SampleProject, tmp_path: Path) -> None:
    home = tmp_path / "home"
    script = Path(sys.executable).with_name("provisioner")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "provisioner"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    env["PROVISIONER_TEST_FAULT"] = "before-pointer"  # after the import check passed
    killed = subprocess.run([*argv, "--home", str(home), "ensure", CPU, "--project",
                             str(project.path)], capture_output=True, text=True, env=env,
                            timeout=120, check=False)
    assert killed.returncode == SELF_KILLED_RC, killed.stderr
    assert not import_memo.memo_path(HomeLayout(home).package_cache).exists()


@pytest.mark.parametrize("foreign", ["newer-format", "garbage", "symlink"])
def test_a_memo_file_that_is_not_ours_is_not_trusted(
        project: SampleProject, tmp_path: Path, spy: Spy, foreign: str) -> None:
    config = config_for(project.path, tmp_path)
    ensure(config, CPU)
    path = import_memo.memo_path(HomeLayout(config.home).package_cache)
    data = json.loads(path.read_text(encoding="utf-8"))
    path.unlink()
    if foreign == "newer-format":
        path.write_text(json.dumps({**data, "version": import_memo.FORMAT_VERSION + 1}))
    elif foreign == "garbage":
        path.write_text("{not json")
    else:
        elsewhere = tmp_path / "planted.json"
        elsewhere.write_text(json.dumps(data))
        path.symlink_to(elsewhere)
    delete_env(config, CPU)
    spy.clear()
    ensure(config, CPU)
    assert spy.probes == 1
    assert not path.is_symlink() and len(memo_entries(config)) == 1


def test_a_memo_hit_with_a_file_of_the_wrong_size_checks_again(
        project: SampleProject, tmp_path: Path, spy: Spy) -> None:
    config = config_for(project.path, tmp_path)
    result = ensure(config, CPU)
    layout = HomeLayout(config.home)
    from provisioner.lock.reader import read_lockfile
    from provisioner.lock.spec import load_spec

    lock = read_lockfile(result.plan.lockfile)
    packages = lock.for_platform(host_platform(), "conda")
    check = import_memo.import_check(
        layout.package_cache, packages=packages, platform=host_platform(),
        imports=load_spec(config.specs_dir, CPU).imports, backend="x")
    check.record(CPU)
    site = site_packages(result.prefix, next(p.version for p in packages if p.name == "python"),
                         host_platform())
    python = python_path(result.prefix)
    spy.clear()
    assert check.run(python, result.prefix, site, CPU) is False and spy.probes == 0
    victim = next(p for p in site.rglob("*.py") if p.stat().st_size > 0)
    data = victim.read_bytes()
    victim.unlink()  # a new inode: the cache's copy stays intact
    victim.write_bytes(data + b"\n# grown\n")
    assert check.run(python, result.prefix, site, CPU) is True and spy.probes == 1


def test_verify_repair_forgets_the_damaged_packages(project: SampleProject, tmp_path: Path,
                                                    spy: Spy) -> None:
    config = config_for(project.path, tmp_path)
    result = ensure(config, CPU)
    assert len(memo_entries(config)) == 1
    torch_dir = next(result.prefix.rglob("site-packages/torch"))
    victim = next(p for p in torch_dir.rglob("*.py") if p.stat().st_size > 0)
    victim.unlink()
    report = repair_env(config, CPU)
    assert report.ok
    assert memo_entries(config) == {}
    delete_env(config, CPU)
    spy.clear()
    ensure(config, CPU)
    assert spy.probes == 1


def test_cli_recheck_runs_the_check_again(project: SampleProject, tmp_path: Path) -> None:
    home = tmp_path / "home"
    script = Path(sys.executable).with_name("provisioner")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "provisioner"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    outputs = []
    for extra in ([], [], ["--recheck"]):
        shutil.rmtree(HomeLayout(home).envs, ignore_errors=True)
        done = subprocess.run([*argv, "-v", "--home", str(home), "ensure", CPU, "--project",
                               str(project.path), *extra], capture_output=True, text=True,
                              env=env, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stderr)
    assert [HIT in text for text in outputs] == [False, True, False]


def test_a_memo_that_cannot_be_written_never_fails_the_build(
        project: SampleProject, tmp_path: Path, spy: Spy, logs: pytest.LogCaptureFixture) -> None:
    config = config_for(project.path, tmp_path)
    path = import_memo.memo_path(HomeLayout(config.home).package_cache)
    path.mkdir(parents=True)  # a dir where the memo file belongs: not ours, and not writable
    for _attempt in range(2):
        spy.clear()
        result = ensure(config, CPU)
        assert result.action == "build" and spy.probes == 1
        assert "could not record the import check" in logs.text
        assert path.is_dir()
        delete_env(config, CPU)
