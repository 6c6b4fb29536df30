"""``list``, ``health``, ``run`` and ``doctor`` on real sample envs and real legacy venvs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from legacy_venvs import make_migratable_venv, site_packages
from winsupport import IS_WINDOWS, long_paths_off, venv_scripts

from provisioner import processes
from provisioner.build.ensure import ensure
from provisioner.build.layout import python_path
from provisioner.config import Config
from provisioner.errors import EXIT_CHECK_FAILED, ToolMissingError, UserError
from provisioner.models.doctor import (
    LONG_PATHS_KEY,
    LONG_PATHS_VALUE,
    doctor,
    long_paths_enabled,
    render_doctor_text,
)
from provisioner.models.inventory import (
    health,
    list_envs,
    prepare_run,
    render_health_text,
    render_inventory_text,
)
from provisioner.models.migrate import human_bytes
from provisioner.models.resolve import get_env_for_model

BNB = "sample-cu121-transformers-bnb"
CPU = "sample-cpu-transformers"
LLAMA = "meta-llama/Llama-2-7b-hf"
GPT2 = "gpt2"


@pytest.fixture(autouse=True)
def _cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")


def legacy_root(config: Config) -> Path:
    assert config.legacy_root is not None
    return config.legacy_root


# --------------------------------------------------------------------------- list


def test_list_shows_shared_and_legacy_envs(config: Config) -> None:
    make_migratable_venv(legacy_root(config), LLAMA)
    make_migratable_venv(legacy_root(config), GPT2)
    built = ensure(config, BNB)
    assert get_env_for_model(LLAMA, config=config).source == "shared"
    inv = list_envs(config)
    (shared,) = inv.shared
    assert (shared.key, shared.generation, shared.active) == (BNB, built.generation, True)
    assert shared.prefix == built.prefix and shared.size_bytes > 0
    assert shared.created_at and shared.models == (LLAMA,) and shared.last_used
    legacy = {r.model_id: r for r in inv.legacy}
    assert set(legacy) == {LLAMA, GPT2}
    assert legacy[LLAMA].migration_target == BNB and legacy[GPT2].migration_target == CPU
    assert all(r.health == "healthy" and r.size_bytes > 0 for r in legacy.values())
    text = "\n".join(render_inventory_text(inv))
    assert BNB in text and GPT2 in text and "KiB" in text
    json.dumps(inv.to_dict())


def test_list_uses_cached_health_and_can_skip_probes(config: Config) -> None:
    make_migratable_venv(legacy_root(config), GPT2)
    (row,) = list_envs(config, probe=False).legacy
    assert row.health == "unknown" and not row.cached
    (row,) = list_envs(config).legacy
    assert row.health == "healthy" and not row.cached
    (row,) = list_envs(config).legacy
    assert row.health == "healthy" and row.cached
    (row,) = list_envs(config, probe=False).legacy
    assert row.health == "healthy" and row.cached


# --------------------------------------------------------------------------- health


def test_health_of_a_key(config: Config) -> None:
    (missing,) = health(config, BNB)
    assert missing.health.status == "missing" and not missing.healthy
    built = ensure(config, BNB)
    (row,) = health(config, BNB)
    assert row.healthy and row.path == built.prefix and row.kind == "shared"
    assert [r.name for r in health(config)] == [BNB]
    shutil.rmtree(site_packages(built.prefix) / "accelerate")
    (broken,) = health(config, BNB)
    assert broken.health.status == "broken"
    assert any("accelerate" in why for why in broken.health.reasons)
    assert "broken" in render_health_text([broken])[0]


def test_health_of_legacy_envs(config: Config) -> None:
    assert health(config, legacy=True) == []
    make_migratable_venv(legacy_root(config), LLAMA)
    gpt2 = make_migratable_venv(legacy_root(config), GPT2)
    rows = {r.name: r for r in health(config, legacy=True)}
    assert rows[LLAMA].healthy and rows[LLAMA].key == BNB and rows[GPT2].healthy
    shutil.rmtree(site_packages(gpt2 / ".venv") / "transformers")
    rows = {r.name: r for r in health(config, legacy=True)}
    assert rows[LLAMA].healthy and rows[GPT2].health.status == "broken"
    with pytest.raises(UserError):
        health(config, BNB, legacy=True)


# --------------------------------------------------------------------------- run


def test_prepare_run_puts_the_env_first_on_path(config: Config) -> None:
    plan = prepare_run(config, LLAMA, ["python", "-V"])
    assert plan.source == "shared" and plan.key == BNB
    first = plan.env["PATH"].split(os.pathsep)[0]
    bin_dir = python_path(plan.prefix).parent  # bin, or the prefix itself on Windows
    assert first == str(bin_dir) and plan.env["CONDA_PREFIX"] == str(plan.prefix)
    assert "env" not in plan.to_dict()
    windows = prepare_run(config, LLAMA, ["python"], is_windows=True)
    conda_dirs = [str(plan.prefix), str(plan.prefix / "Library" / "bin"),
                  str(plan.prefix / "Scripts")]
    assert windows.path_prepend == tuple(dict.fromkeys([str(bin_dir), *conda_dirs]))
    with pytest.raises(UserError, match="no command"):
        prepare_run(config, LLAMA, [])


def test_prepare_run_for_a_legacy_env(config: Config) -> None:
    gpt2 = make_migratable_venv(legacy_root(config), GPT2)
    plan = prepare_run(config, GPT2, ["python"])
    assert plan.source == "legacy"
    assert plan.path_prepend == (str(venv_scripts(gpt2 / ".venv")),)
    assert plan.env["VIRTUAL_ENV"] == str(gpt2 / ".venv")


def test_run_passthrough_exit_codes() -> None:
    assert processes.run_passthrough([sys.executable, "-c", "import sys; sys.exit(5)"]) == 5
    kill = f"import os, signal; os.kill(os.getpid(), {int(signal.SIGTERM)})"
    # Windows has no signals: os.kill there is TerminateProcess with the number as exit code.
    killed = int(signal.SIGTERM) if IS_WINDOWS else 128 + int(signal.SIGTERM)
    assert processes.run_passthrough([sys.executable, "-c", kill]) == killed
    with pytest.raises(ToolMissingError):
        processes.run_passthrough(["no-such-program-provisioner"])


# --------------------------------------------------------------------------- doctor


def test_doctor_reports_the_host(config: Config) -> None:
    make_migratable_venv(legacy_root(config), GPT2)
    report = doctor(config)
    data = report.to_dict()
    assert data["conda_override_cuda"] == "12.1" and data["cuda_driver"] == "12.1"
    assert report.backends["rattler"]["available"] is True
    assert set(report.backends) == {"rattler", "micromamba", "mamba", "conda"}
    assert data["home"] == str(config.home) and data["legacy_envs"] == 1
    assert isinstance(data["home_free_bytes"], int) and data["home_free_bytes"] > 0
    # None off Windows; on Windows the registry's value (the CI leg with it off says so)
    if not IS_WINDOWS:
        assert data["long_paths_enabled"] is None
    elif long_paths_off():
        assert data["long_paths_enabled"] is False
    else:
        assert isinstance(data["long_paths_enabled"], bool)
    assert data["platform"]
    assert any(line.startswith("conda_override_cuda:") for line in render_doctor_text(report))


def test_long_paths_enabled_with_a_fake_reader() -> None:
    def reader(value: object) -> Callable[[str, str], object]:
        def read(subkey: str, name: str) -> object:
            assert (subkey, name) == (LONG_PATHS_KEY, LONG_PATHS_VALUE)
            if isinstance(value, BaseException):
                raise value
            return value
        return read

    assert long_paths_enabled(reader(1)) is True
    assert long_paths_enabled(reader(0)) is False
    assert long_paths_enabled(reader(FileNotFoundError())) is False
    assert long_paths_enabled(reader(PermissionError())) is None
    if not IS_WINDOWS:
        assert long_paths_enabled() is None


def test_human_bytes() -> None:
    assert human_bytes(None) == "?" and human_bytes(10) == "10 B"
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(3 * 1024**3) == "3.0 GiB"
    assert human_bytes(5 * 1024**4) == "5120.0 GiB"


# --------------------------------------------------------------------------- CLI


def run_cli(config: Config, *args: str, project_first: bool = False
            ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    env.update(CONDA_OVERRIDE_CUDA="12.1", PROVISIONER_HOME=str(config.home),
               PROVISIONER_LEGACY_ROOT=str(config.legacy_root))
    project = ["--project", str(config.project)]
    argv = [*args[:1], *project, *args[1:]] if project_first else [*args, *project]
    return subprocess.run([sys.executable, "-m", "provisioner", *argv], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def test_cli_list_json(config: Config) -> None:
    make_migratable_venv(legacy_root(config), LLAMA)
    ensure(config, CPU)
    result = run_cli(config, "list", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["key"] for r in data["shared"]] == [CPU] and data["shared"][0]["size_bytes"] > 0
    assert data["legacy"][0]["model_id"] == LLAMA and data["legacy"][0]["health"] == "healthy"
    text = run_cli(config, "list")
    assert text.returncode == 0 and CPU in text.stdout and LLAMA in text.stdout


def test_cli_health_exit_codes(config: Config) -> None:
    missing = run_cli(config, "health", CPU, "--json")
    assert missing.returncode == EXIT_CHECK_FAILED, missing.stderr
    assert json.loads(missing.stdout)["envs"][0]["status"] == "missing"
    built = ensure(config, CPU)
    ok = run_cli(config, "health", "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["ok"] is True and [e["name"] for e in data["envs"]] == [CPU]
    gpt2 = make_migratable_venv(legacy_root(config), GPT2)
    assert run_cli(config, "health", "--legacy").returncode == 0
    shutil.rmtree(site_packages(gpt2 / ".venv") / "torch")
    bad = run_cli(config, "health", "--legacy", "--json")
    assert bad.returncode == EXIT_CHECK_FAILED
    assert json.loads(bad.stdout)["envs"][0]["status"] == "broken"
    shutil.rmtree(site_packages(built.prefix) / "transformers")
    assert run_cli(config, "health", CPU).returncode == EXIT_CHECK_FAILED


def test_cli_run(config: Config) -> None:
    code = "import shutil, sys; print(shutil.which('python')); sys.exit(3)"
    result = run_cli(config, "run", LLAMA, "--", "python", "-c", code, project_first=True)
    assert result.returncode == 3, result.stderr
    prefix = get_env_for_model(LLAMA, config=config, build=False).prefix
    # which() on Windows spells the extension as PATHEXT does (.EXE): compare normalised
    found = os.path.normcase(result.stdout.strip())
    assert found == os.path.normcase(str(python_path(Path(prefix))))
    empty = run_cli(config, "run", LLAMA, "--", project_first=True)
    assert empty.returncode == 2 and "no command" in empty.stderr


def test_cli_doctor_json(config: Config) -> None:
    result = run_cli(config, "doctor", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for field in ("platform", "python", "cuda_driver", "conda_override_cuda", "backends",
                  "home", "home_free_bytes", "legacy_root", "long_paths_enabled", "warnings"):
        assert field in data
    assert data["conda_override_cuda"] == "12.1" and data["home"] == str(config.home)
