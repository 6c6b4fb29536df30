"""Which generations ``gc`` keeps: the active one, ``[gc] keep`` previous ones, and why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from provisioner.build.ensure import ensure
from provisioner.build.layout import HomeLayout
from provisioner.build.maintenance import collect_garbage
from provisioner.build.retention import judge_generations
from provisioner.config import Config, load_config
from provisioner.errors import SpecError
from provisioner.lock.spec import spec_path
from provisioner.lock.write import lock_envs

CPU = "sample-cpu-transformers"


@pytest.fixture(autouse=True)
def _cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")


@pytest.fixture
def own(shared_project: Path, tmp_path: Path) -> Config:
    project = tmp_path / "project"
    shutil.copytree(shared_project, project)
    return load_config(project, home=tmp_path / "home", environ={})


def generations(config: Config, count: int) -> list[Path]:
    """``count`` generations of ``CPU``, oldest first; the last is active."""
    prefixes = [ensure(config, CPU).prefix]
    for n in range(1, count):
        path = spec_path(config.specs_dir, CPU)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["dependencies"] = [f"python >=3.{n}" if d.startswith("python") else d
                                for d in data["dependencies"]]
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        lock_envs(config, [CPU])
        prefixes.append(ensure(config, CPU).prefix)
    assert len(set(prefixes)) == count
    return prefixes


def test_keep_n_previous_generations(own: Config) -> None:
    gens = generations(own, 4)
    verdicts = {v.path: v for v in judge_generations(HomeLayout(own.home), CPU, keep=2)}
    assert [verdicts[g].keep for g in gens] == [False, True, True, True]
    assert verdicts[gens[-1]].reason == "the active generation"
    assert "rollback" in verdicts[gens[1]].reason

    report = collect_garbage(own, keep=2)
    assert [i.path for i in report.removed] == [gens[0]]
    report = collect_garbage(own, keep=0)
    assert [i.path for i in report.removed] == gens[1:3]
    assert [k.path for k in report.why_kept] == [gens[-1]] and gens[-1].is_dir()


def test_keep_comes_from_provisioner_toml(own: Config) -> None:
    (own.project / "provisioner.toml").write_text(
        (own.project / "provisioner.toml").read_text(encoding="utf-8") + "\n[gc]\nkeep = 0\n",
        encoding="utf-8")
    config = load_config(own.project, home=own.home, environ={})
    assert config.gc_keep == 0
    gens = generations(config, 2)
    assert [i.path for i in collect_garbage(config).removed] == [gens[0]]


@pytest.mark.parametrize("bad", ["-1", '"two"', "true", "1.5"])
def test_a_bad_keep_is_a_spec_error(own: Config, bad: str) -> None:
    (own.project / "provisioner.toml").write_text(f"[gc]\nkeep = {bad}\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"\[gc\] keep"):
        load_config(own.project, environ={})


def test_cli_dry_run_says_why_each_generation_is_kept(own: Config) -> None:
    gens = generations(own, 3)
    env = {**os.environ, "PROVISIONER_HOME": str(own.home)}
    text = subprocess.run([sys.executable, "-m", "provisioner", "gc", "--dry-run", "--project",
                           str(own.project)], capture_output=True, text=True, env=env,
                          timeout=120, check=True).stdout
    assert f"would remove generation {gens[0]}" in text
    assert f"keep {gens[2]}: the active generation" in text
    assert f"keep {gens[1]}: one of the 1 most recent previous" in text
    data = json.loads(subprocess.run(
        [sys.executable, "-m", "provisioner", "gc", "--dry-run", "--keep", "0", "--json",
         "--project", str(own.project)], capture_output=True, text=True, env=env, timeout=120,
        check=True).stdout)
    assert [r["path"] for r in data["removed"]] == [str(gens[0]), str(gens[1])]
    assert data["why_kept"] == [{"key": CPU, "path": str(gens[2]),
                                 "reason": "the active generation"}]
    assert all(g.is_dir() for g in gens), "a dry run removes nothing"
