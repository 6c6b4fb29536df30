"""``migrate`` on real shared envs built from the sample project and real legacy venvs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from legacy_venvs import make_migratable_venv, site_packages

from provisioner import fsops
from provisioner.build.ensure import ensure
from provisioner.build.layout import HomeLayout
from provisioner.build.maintenance import collect_garbage
from provisioner.config import Config
from provisioner.errors import EXIT_CHECK_FAILED, EXIT_USER_ERROR, UserError
from provisioner.models.migrate import _delete_legacy, migrate, plan_migration, shared_state
from provisioner.models.resolve import get_env_for_model
from provisioner.models.state import StateFile

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


def migrations(config: Config) -> dict[str, object]:
    return StateFile(HomeLayout(config.home).state_file).section("migrations")


def test_dry_run_plans_and_changes_nothing(config: Config) -> None:
    llama = make_migratable_venv(legacy_root(config), LLAMA)
    report = migrate(config, model=LLAMA, dry_run=True, delete_legacy=True)
    assert report.dry_run and report.results == ()
    (item,) = report.plan.items
    assert (item.model_id, item.key, item.shared_state) == (LLAMA, BNB, "missing")
    assert item.legacy_dir == llama and item.size_bytes > 0
    assert item.actions[0] == f"build shared env {BNB}"
    assert item.actions[-1].startswith(f"delete {llama}")
    assert llama.is_dir() and not config.home.exists()


def test_migrate_with_delete(config: Config) -> None:
    llama = make_migratable_venv(legacy_root(config), LLAMA)
    gpt2 = make_migratable_venv(legacy_root(config), GPT2)
    (planned,) = plan_migration(config, model=LLAMA).items
    report = migrate(config, model=LLAMA, delete_legacy=True)
    (result,) = report.results
    assert report.ok and result.status == "migrated" and result.deleted
    assert result.bytes_reclaimed == planned.size_bytes > 0
    assert report.bytes_reclaimed == result.bytes_reclaimed
    assert not llama.exists() and gpt2.is_dir()
    record = migrations(config)[LLAMA]
    assert isinstance(record, dict)
    assert record["key"] == BNB and record["deleted"] is True
    assert record["generation"] == result.generation and record["legacy_dir"] == str(llama)
    assert shared_state(config, BNB) == "ready"
    resolved = get_env_for_model(LLAMA, config=config, build=False)
    assert resolved.source == "shared" and resolved.env_key == BNB


def test_migrate_without_delete_keeps_the_legacy_dir(config: Config) -> None:
    llama = make_migratable_venv(legacy_root(config), LLAMA)
    report = migrate(config, all_=True)
    (result,) = report.results
    assert result.status == "migrated" and not result.deleted and result.bytes_reclaimed == 0
    assert llama.is_dir()
    record = migrations(config)[LLAMA]
    assert isinstance(record, dict) and record["deleted"] is False


def test_unhealthy_shared_env_keeps_the_legacy_env(config: Config) -> None:
    llama = make_migratable_venv(legacy_root(config), LLAMA)
    built = ensure(config, BNB)
    shutil.rmtree(site_packages(built.prefix) / "torch")
    assert plan_migration(config, model=LLAMA).items[0].shared_state == "ready"
    report = migrate(config, model=LLAMA, delete_legacy=True)
    (result,) = report.results
    assert not report.ok and result.status == "kept" and not result.deleted
    assert "is broken" in result.reason and "torch" in result.reason
    assert result.health["status"] == "broken"
    assert llama.is_dir() and LLAMA not in migrations(config)


def test_model_without_rule_is_kept(config: Config) -> None:
    odd = make_migratable_venv(legacy_root(config), "someone/unknown-model")
    make_migratable_venv(legacy_root(config), GPT2)
    report = migrate(config, all_=True, delete_legacy=True)
    by_model = {r.model_id: r for r in report.results}
    assert by_model[GPT2].status == "migrated" and by_model[GPT2].key == CPU
    kept = by_model["someone/unknown-model"]
    assert kept.status == "kept" and kept.key is None and "no rule" in kept.reason
    assert odd.is_dir() and not report.ok


def test_selection_errors(config: Config) -> None:
    with pytest.raises(UserError, match="exactly one"):
        plan_migration(config)
    with pytest.raises(UserError, match="exactly one"):
        plan_migration(config, model=LLAMA, all_=True)
    with pytest.raises(UserError, match="no legacy venv"):
        migrate(config, model=LLAMA)
    assert migrate(config, all_=True).results == ()


def test_delete_refuses_a_dir_that_is_not_a_discovered_legacy_env(
        config: Config, tmp_path: Path) -> None:
    outside = tmp_path / "local_outside"
    (outside / ".venv").mkdir(parents=True)
    with pytest.raises(UserError, match="refusing"):
        _delete_legacy(config, outside)
    assert outside.is_dir()


def _in_use(path: str) -> PermissionError:
    exc = PermissionError(errno.EACCES, "The process cannot access the file", path)
    exc.winerror = 32  # type: ignore[attr-defined]  # what Windows says for a running python
    return exc


def test_delete_moves_the_venv_out_whole_and_leaves_files_in_use_to_gc(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    llama = make_migratable_venv(legacy_root(config), LLAMA)
    real_unlink = os.unlink

    def unlink(path: str, *args: object, **kwargs: object) -> None:
        if os.path.basename(path).startswith("python"):  # the interpreter is running
            raise _in_use(path)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(fsops, "DELETE_RETRY_BUDGET_S", 0.1)
    assert _delete_legacy(config, llama) > 0
    assert not llama.exists(), "the legacy root never holds a half-deleted venv"
    [trashed] = list(HomeLayout(config.home).trash.iterdir())
    assert trashed.name.startswith(f"legacy.{llama.name}.")
    assert (trashed / ".venv" / "pyvenv.cfg").is_file() and (trashed / fsops.MARKER_NAME).is_file()
    left = {p.name for p in trashed.rglob("*") if not p.is_dir() or p.is_symlink()}
    assert all(n.startswith("python") or n in ("pyvenv.cfg", fsops.MARKER_NAME) for n in left)

    monkeypatch.setattr(os, "unlink", real_unlink)
    assert [i.path for i in collect_garbage(config).removed] == [trashed]


def test_delete_refused_by_a_running_python_changes_nothing(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    llama = make_migratable_venv(legacy_root(config), LLAMA)
    before = sorted(p.relative_to(llama) for p in llama.rglob("*"))
    real_rename = os.rename

    def rename(src: str, dst: str) -> None:
        if os.fspath(src).removeprefix("\\\\?\\") == str(llama):
            raise _in_use(os.fspath(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(fsops.InUseError):
        _delete_legacy(config, llama)
    assert sorted(p.relative_to(llama) for p in llama.rglob("*")) == before  # no marker left


def test_delete_across_filesystems_deletes_in_place(config: Config,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    llama = make_migratable_venv(legacy_root(config), LLAMA)
    real_rename = os.rename

    def rename(src: str, dst: str) -> None:
        if os.fspath(src).removeprefix("\\\\?\\") == str(llama):
            raise OSError(errno.EXDEV, "Invalid cross-device link", os.fspath(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    assert _delete_legacy(config, llama) > 0
    assert not llama.exists()


# --------------------------------------------------------------------------- CLI


def run_cli(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    env.update(CONDA_OVERRIDE_CUDA="12.1", PROVISIONER_HOME=str(config.home),
               PROVISIONER_LEGACY_ROOT=str(config.legacy_root))
    return subprocess.run(
        [sys.executable, "-m", "provisioner", *args, "--project", str(config.project)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )


def test_cli_migrate_json(config: Config) -> None:
    llama = make_migratable_venv(legacy_root(config), LLAMA)
    dry = run_cli(config, "migrate", "--all", "--dry-run", "--delete-legacy", "--json")
    assert dry.returncode == 0, dry.stderr
    data = json.loads(dry.stdout)
    assert data["dry_run"] is True and data["plan"]["items"][0]["key"] == BNB
    assert llama.is_dir() and not config.home.exists()

    done = run_cli(config, "migrate", "--model", LLAMA, "--delete-legacy", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["ok"] is True and data["bytes_reclaimed"] > 0
    assert data["results"][0]["status"] == "migrated" and not llama.exists()
    assert "migrated to" in done.stderr  # each step is logged


def test_cli_migrate_kept_exits_1(config: Config) -> None:
    make_migratable_venv(legacy_root(config), LLAMA)
    shutil.rmtree(site_packages(ensure(config, BNB).prefix) / "bitsandbytes")
    kept = run_cli(config, "migrate", "--model", LLAMA, "--json")
    assert kept.returncode == EXIT_CHECK_FAILED, kept.stderr
    assert json.loads(kept.stdout)["results"][0]["status"] == "kept"


@pytest.mark.parametrize("args", [[], ["--all", "--model", LLAMA]])
def test_cli_migrate_needs_exactly_one_selector(config: Config, args: list[str]) -> None:
    bad = run_cli(config, "migrate", *args)
    assert bad.returncode == EXIT_USER_ERROR
    assert "exactly one" in bad.stderr
