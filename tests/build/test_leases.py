"""Leases: ``gc`` never removes a generation that a running process uses.

Real envs from the sample project, real ``provisioner run`` child processes,
real ``gc``; the holders are killed the way a crash kills them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from winsupport import IS_WINDOWS

from provisioner.build.ensure import ensure
from provisioner.build.layout import HomeLayout
from provisioner.build.leases import acquire_lease, exclusive_lease, lease
from provisioner.build.maintenance import collect_garbage
from provisioner.config import Config, load_config
from provisioner.contained import pid_alive
from provisioner.errors import ResolutionError
from provisioner.lock.spec import spec_path
from provisioner.lock.write import lock_envs
from provisioner.models.resolve import get_env_for_model

CPU = "sample-cpu-transformers"
MODEL = "gpt2"  # served by CPU in the sample project's models.yml


@pytest.fixture(autouse=True)
def _cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")


@pytest.fixture
def own_config(shared_project: Path, tmp_path: Path) -> Config:
    """A private copy of the project (its locks change) with a fresh home."""
    project = tmp_path / "project"
    shutil.copytree(shared_project, project)
    return load_config(project, home=tmp_path / "home", environ={})


def new_generation(config: Config, python_spec: str) -> Path:
    """Relock ``CPU`` with another python spec (new lock hash) and build it."""
    path = spec_path(config.specs_dir, CPU)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["dependencies"] = [python_spec if d.startswith("python") else d
                            for d in data["dependencies"]]
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    (outcome,) = lock_envs(config, [CPU])
    assert outcome.changed
    return ensure(config, CPU).prefix


def cli_env(config: Config) -> dict[str, str]:
    return {**os.environ, "CONDA_OVERRIDE_CUDA": "12.1", "PROVISIONER_HOME": str(config.home)}


# The env's own python (first on PATH): no shell, so it runs on Windows too.
_RUN_SCRIPT = (
    "import os, sys\n"
    "print(os.getpid(), flush=True)\n"
    "sys.stdin.readline()\n"
    "meta = os.path.join(os.environ['CONDA_PREFIX'], 'conda-meta')\n"
    "print('still-there' if os.path.isdir(meta) else 'gone', flush=True)\n"
)


def start_run(config: Config) -> subprocess.Popen[str]:
    """``provisioner run gpt2 -- python ...``: prints its pid, then waits for a line on stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "run", "--project", str(config.project), MODEL,
         "--", "python", "-c", _RUN_SCRIPT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env(config))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), (line, proc.stderr.read() if proc.stderr else "")
    proc.child_pid = int(line)  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen[str]) -> str:
    out, _err = proc.communicate("go\n", timeout=60)
    return out


def gc_kept_reasons(config: Config, keep: int = 0) -> tuple[list[Path], dict[Path, str]]:
    report = collect_garbage(config, keep=keep)
    return [i.path for i in report.removed], {k.path: k.reason for k in report.why_kept}


def test_a_generation_used_by_a_running_provisioner_run_survives_gc(own_config: Config) -> None:
    first = ensure(own_config, CPU).prefix
    run = start_run(own_config)
    try:
        second = new_generation(own_config, "python >=3")
        active = new_generation(own_config, "python >=3.1")
        removed, why = gc_kept_reasons(own_config, keep=0)
        assert removed == [second], "the unleased old generation goes"
        assert first.is_dir() and "leased" in why[first]
        assert why[active] == "the active generation"
        assert finish(run).strip() == "still-there"
        assert run.returncode == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
    removed, _why = gc_kept_reasons(own_config, keep=0)
    assert removed == [first], "once the run ended, its generation is collected"


@pytest.mark.skipif(IS_WINDOWS, reason="Windows byte-range locks die with the process that "
                    "took them: the command cannot inherit the lease (see leases.py)")
def test_the_lease_outlives_a_killed_provisioner_run_while_its_command_runs(
        own_config: Config) -> None:
    first = ensure(own_config, CPU).prefix
    run = start_run(own_config)
    child = run.child_pid  # type: ignore[attr-defined]
    os.kill(run.pid, signal.SIGKILL)  # provisioner run dies; the command it started does not
    run.wait(timeout=30)
    new_generation(own_config, "python >=3")
    removed, why = gc_kept_reasons(own_config, keep=0)
    assert removed == [] and "leased" in why[first]
    assert run.stdin is not None
    run.stdin.write("go\n")
    run.stdin.close()  # the orphaned command reads its line and exits
    for _ in range(3000):
        if not pid_alive(child):
            break
        time.sleep(0.01)
    removed, _why = gc_kept_reasons(own_config, keep=0)
    assert removed == [first]


def test_host_app_lease_api_and_a_crashed_holder(own_config: Config) -> None:
    res = get_env_for_model(MODEL, config=own_config)
    assert res.source == "shared" and res.generation
    layout = HomeLayout(own_config.home)
    with lease(res) as held:
        assert held.held
        with exclusive_lease(layout, CPU, res.generation) as free:
            assert not free, "gc cannot take a leased generation"
    with exclusive_lease(layout, CPU, res.generation, probe_only=True) as free:
        assert free, "released at the end of the block"

    # A holder that dies (SIGKILL) releases its lease with it: nothing to expire.
    code = ("import sys, time\nfrom provisioner.build.leases import acquire_lease\n"
            "l = acquire_lease(sys.argv[1], sys.argv[2], sys.argv[3])\n"
            "print('held', flush=True)\ntime.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(own_config.home), CPU,
                               res.generation], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with exclusive_lease(layout, CPU, res.generation, probe_only=True) as free:
            assert not free
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with exclusive_lease(layout, CPU, res.generation, probe_only=True) as free:
        assert free


def test_a_collected_generation_cannot_be_leased(own_config: Config) -> None:
    first = ensure(own_config, CPU).prefix
    new_generation(own_config, "python >=3")
    removed, _why = gc_kept_reasons(own_config, keep=0)
    assert removed == [first]
    assert not HomeLayout(own_config.home).locks.joinpath(f"{CPU}.{first.name}.lease").exists()
    with pytest.raises(ResolutionError, match="gone or not ready") as info:
        acquire_lease(own_config.home, CPU, first.name, timeout=0)
    assert info.value.exit_code == 2


def test_legacy_resolutions_need_no_lock(own_config: Config) -> None:
    from provisioner.models.resolve import Resolution

    res = Resolution(model_id="m", env_key="", python="/x/bin/python", prefix="/x",
                     source="legacy")
    with lease(res) as held:
        assert not held.held
