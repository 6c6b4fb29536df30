"""``ensure`` builds real envs from the sample project's local channel and locks.

Every build here is a real rattler install of real conda packages; the env's
``python`` is the sample channel's launcher, so the checks run real processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from winsupport import IS_WINDOWS, SELF_KILLED_RC, SITE_GLOB

from provisioner import fsops
from provisioner.build import key_lock as keylock
from provisioner.build.ensure import EnsureOptions, EnsureResult, ensure
from provisioner.build.env_checks import find_staging_path
from provisioner.build.fingerprint import (
    fingerprint_path,
    in_progress_path,
    mark_in_progress,
    read_fingerprint,
)
from provisioner.build.layout import HomeLayout, python_path, read_pointer
from provisioner.build.plan import make_plan
from provisioner.config import Config, load_config
from provisioner.errors import (
    CudaMismatchError,
    ImportCheckError,
    IntegrityError,
    LockfileError,
    LockTimeoutError,
)
from provisioner.lock.platforms import host_platform
from provisioner.lock.reader import read_lock_header, read_lockfile
from provisioner.lock.write import lock_envs
from provisioner.sample.project import SampleProject, create_sample_project

CU = "sample-cu121-transformers-bnb"
CU_PLAIN = "sample-cu121-transformers"
CPU = "sample-cpu-transformers"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    """One locked sample project for the module. Tests that edit it work on a copy."""
    return create_sample_project(tmp_path_factory.mktemp("builder") / "sp")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "12.1")
    for name in ("PROVISIONER_BACKEND", "PROVISIONER_TEST_FAULT", "PROVISIONER_TEST_STEP_DELAY",
                 "PROVISIONER_FORCE_COPY", "PROVISIONER_HOME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
         ) -> pytest.LogCaptureFixture:
    """caplog that sees provisioner's INFO records even after a CLI run disabled propagation."""
    monkeypatch.setattr(logging.getLogger("provisioner"), "propagate", True)
    caplog.set_level(logging.INFO, logger="provisioner")
    return caplog


def config_for(project: Path, tmp_path: Path, **environ: str) -> Config:
    return load_config(project, home=tmp_path / "home", environ=environ)


def copy_project(project: SampleProject, tmp_path: Path) -> Path:
    dest = tmp_path / "sp"
    shutil.copytree(project.path, dest, ignore=shutil.ignore_patterns(".provisioner-home"))
    return dest


def run_python(python: Path, code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                            env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def module_versions(python: Path, *modules: str) -> dict[str, list[str]]:
    code = ("import importlib, json, sys\n"
            "out = {}\n"
            f"for n in {list(modules)!r}:\n"
            "    m = importlib.import_module(n)\n"
            "    out[n] = [getattr(m, '__version__', ''), m.__file__]\n"
            "print(json.dumps(out))\n")
    data: dict[str, list[str]] = json.loads(run_python(python, code))
    return data


def staging_entries(layout: HomeLayout) -> list[str]:
    return sorted(p.name for p in layout.staging.iterdir()) if layout.staging.exists() else []


def cli_argv() -> list[str]:
    script = Path(sys.executable).with_name("provisioner")
    return [str(script)] if script.exists() else [sys.executable, "-m", "provisioner"]


def run_cli(args: list[str], **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    env.update(extra_env)
    return subprocess.run([*cli_argv(), *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def replace_in_file(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path.name}"
    path.write_text(text.replace(old, new), encoding="utf-8", newline="\n")


# --- build and reuse -----------------------------------------------------------------------------


def test_ensure_builds_then_reuses_within_budget(project: SampleProject, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_for(project.path, tmp_path)
    home = tmp_path / "home"
    result = ensure(config, CU)
    assert result.action == "build"
    assert result.backend == "rattler"
    assert result.prefix == home / "envs" / CU / result.generation
    assert result.python == python_path(result.prefix)  # bin/python, or python.exe
    assert result.python.is_file()
    assert read_pointer(HomeLayout(home), CU) == result.generation
    fp = read_fingerprint(result.prefix)
    assert fp is not None and fp.key == CU and fp.generation == result.generation
    assert fp.backend == "rattler" and not fp.cuda_mismatch_allowed
    assert not in_progress_path(result.prefix).exists()
    assert result.cuda is not None and result.cuda["ok"] is True
    assert result.cuda["required"] == ">=12.1" and result.cuda["rule"] == "recorded"

    versions = module_versions(result.python, "torch", "transformers", "accelerate",
                               "bitsandbytes", "torch.version")
    assert versions["torch"][0] == "2.2.1"
    for _version, file in versions.values():
        assert Path(file).is_relative_to(result.prefix)
    assert run_python(result.python, "import torch; print(torch.version.cuda)") == "12.1"

    # Within budget because the warm path is cheap: no key lock, no process, one YAML
    # parse of the lock's header only (its package block cut), the env left untouched.
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the warm reuse path called {args[:1]}")

    parsed: list[bytes] = []
    reader = sys.modules[read_lock_header.__module__]
    load = reader._load

    def spy(raw: bytes, name: str) -> object:
        parsed.append(raw)
        return load(raw, name)

    monkeypatch.setattr(reader, "_load", spy)
    monkeypatch.setattr(sys.modules[ensure.__module__], "hold_key_lock", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    staging = HomeLayout(home).staging
    staged = sorted(staging.iterdir()) if staging.is_dir() else []
    fp_mtime = fingerprint_path(result.prefix).stat().st_mtime_ns
    again = ensure(config, CU)
    monkeypatch.undo()
    assert again.action == "reuse"
    assert again.python == result.python and again.generation == result.generation
    assert len(parsed) == 1 and b"package: []\n" in parsed[0] and b"- name:" not in parsed[0]
    assert fingerprint_path(result.prefix).stat().st_mtime_ns == fp_mtime
    assert (sorted(staging.iterdir()) if staging.is_dir() else []) == staged
    print(f"warm reuse: {again.seconds * 1000:.2f} ms")


def test_cli_prints_python_and_json(project: SampleProject, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"CONDA_OVERRIDE_CUDA": "12.1"}
    built = run_cli(["--home", str(home), "ensure", CU_PLAIN, "--project", str(project.path),
                     "--json"], **env)
    assert built.returncode == 0, built.stderr
    data = json.loads(built.stdout)
    assert data["action"] == "build"
    assert data["backend"] == "rattler"
    assert isinstance(data["seconds"], float) and data["seconds"] > 0
    gen = data["generation"]
    assert data["prefix"] == str(home / "envs" / CU_PLAIN / gen)
    assert data["python"] == str(python_path(home / "envs" / CU_PLAIN / gen))
    assert Path(data["python"]).is_file()

    plain = run_cli(["--home", str(home), "ensure", CU_PLAIN, "--project", str(project.path)],
                    **env)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip().splitlines()[-1] == data["python"]
    again = run_cli(["ensure", CU_PLAIN, "--project", str(project.path), "--json"],
                    PROVISIONER_HOME=str(home), **env)
    assert json.loads(again.stdout)["action"] == "reuse"


def test_cli_refusal_is_a_user_error_with_hint(project: SampleProject, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run_cli(["--home", str(home), "ensure", CU, "--project", str(project.path)],
                     CONDA_OVERRIDE_CUDA="11.8")
    assert result.returncode == 2
    assert "error:" in result.stderr and "hint:" in result.stderr
    assert "CONDA_OVERRIDE_CUDA" in result.stderr
    assert not (home / "envs").exists()


# --- relocation and promotion --------------------------------------------------------------------


def test_promoted_env_names_no_staging_path(project: SampleProject, tmp_path: Path) -> None:
    config = config_for(project.path, tmp_path)
    layout = HomeLayout(config.home)
    result = ensure(config, CU)
    assert find_staging_path(result.prefix, str(layout.staging), trust_hardlinks=False) == []
    if not IS_WINDOWS:  # the POSIX launcher is patched with the prefix; python.exe is not
        launcher = result.python.read_text(encoding="utf-8")
        assert str(result.prefix) in launcher and "/opt/anaconda1anaconda2" not in launcher
    torch_file = run_python(result.python, "import torch; print(torch.__file__)")
    assert Path(torch_file).is_relative_to(result.prefix)
    assert staging_entries(layout) == []
    # Promoted by rename: the env's files are still the package cache's hardlinks.
    cache_file = next(layout.package_cache.glob(f"pytorch-*/{SITE_GLOB}/torch/__init__.py"))
    assert os.stat(_torch_init(result.prefix)).st_ino == os.stat(cache_file).st_ino


def _torch_init(prefix: Path) -> Path:
    return next(prefix.glob(f"{SITE_GLOB}/torch/__init__.py"))


def test_force_copy_promotes_by_copy(project: SampleProject, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_for(project.path, tmp_path, PROVISIONER_FORCE_COPY="1")
    assert config.force_copy
    copies: list[tuple[Path, Path]] = []
    real_copy = fsops.copy_tree_into

    def spy(src: Path, dst: Path) -> None:
        copies.append((src, dst))
        real_copy(src, dst)

    monkeypatch.setattr(fsops, "copy_tree_into", spy)
    result = ensure(config, CPU)
    layout = HomeLayout(config.home)
    assert result.action == "build"
    assert len(copies) == 1 and copies[0][1] == result.prefix
    assert copies[0][0].parent == layout.staging
    # The copy keeps rattler's hardlinks to the package cache (same filesystem here).
    cache_file = next(layout.package_cache.glob(f"pytorch-*/{SITE_GLOB}/torch/__init__.py"))
    assert os.stat(_torch_init(result.prefix)).st_ino == os.stat(cache_file).st_ino
    assert run_python(result.python, "import torch, transformers; print(torch.__version__)") \
        == "2.2.1"
    assert staging_entries(layout) == []
    assert {p.name for p in layout.key_dir(CPU).iterdir()} == {"current", result.generation}
    assert not layout.trash.exists() or not any(layout.trash.iterdir())
    assert find_staging_path(result.prefix, str(layout.staging), trust_hardlinks=False) == []


def test_exdev_on_promote_falls_back_to_copy(project: SampleProject, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             logs: pytest.LogCaptureFixture) -> None:
    config = config_for(project.path, tmp_path)
    layout = HomeLayout(config.home)
    real_rename = os.rename
    refused: list[str] = []

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(os.fspath(src).removeprefix("\\\\?\\")).parent == layout.staging:  # \\?\ on Windows
            refused.append(str(src))
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    result = ensure(config, CPU)
    assert result.action == "build"
    # The promotion and then the move of the copied staging dir into the trash: both fall back.
    assert len(refused) == 2 and len(set(refused)) == 1
    assert "promoting by copy" in logs.text
    assert run_python(result.python, "import torch; print(torch.__version__)") == "2.2.1"
    assert staging_entries(layout) == []
    assert {p.name for p in layout.key_dir(CPU).iterdir()} == {"current", result.generation}


# --- rebuild, relock, revert ---------------------------------------------------------------------


def test_rebuild_keeps_old_generation_and_revert_reuses_it(project: SampleProject,
                                                           tmp_path: Path) -> None:
    root = copy_project(project, tmp_path)
    config = config_for(root, tmp_path)
    layout = HomeLayout(config.home)
    spec = root / "environment-specs" / f"{CPU}.yml"
    lockfile = root / "lockfiles" / f"{CPU}.conda-lock.yml"
    spec_bytes, lock_bytes = spec.read_bytes(), lockfile.read_bytes()

    first = ensure(config, CPU)
    old_fp_mtime = fingerprint_path(first.prefix).stat().st_mtime_ns
    assert module_versions(first.python, "transformers")["transformers"][0] == "4.40.0"

    replace_in_file(spec, "\n- transformers\n", "\n- transformers=4.36.2\n")
    lock_envs(config, [CPU])
    plan = make_plan(config, CPU)
    assert plan.action == "rebuild" and plan.active_generation == first.generation

    second = ensure(config, CPU)
    assert second.action == "rebuild" and second.generation != first.generation
    assert read_pointer(layout, CPU) == second.generation
    assert first.prefix.is_dir() and second.prefix.is_dir()
    assert module_versions(second.python, "transformers")["transformers"][0] == "4.36.2"
    # The old generation is untouched and still runs.
    assert module_versions(first.python, "transformers")["transformers"][0] == "4.40.0"
    leftovers = [p.name for p in layout.key_dir(CPU).iterdir()
                 if p.name not in ("current", first.generation, second.generation)]
    assert leftovers == []

    spec.write_bytes(spec_bytes)
    lockfile.write_bytes(lock_bytes)
    plan = make_plan(config, CPU)
    assert plan.action == "reuse" and plan.generation == first.generation
    assert "becomes the active one" in plan.reason
    back = ensure(config, CPU)
    assert back.action == "reuse" and back.generation == first.generation
    assert read_pointer(layout, CPU) == first.generation
    assert fingerprint_path(first.prefix).stat().st_mtime_ns == old_fp_mtime  # not rebuilt
    assert second.prefix.is_dir()
    assert ensure(config, CPU).action == "reuse"


def test_relock_with_same_spec_but_other_packages_is_not_reused(project: SampleProject,
                                                                tmp_path: Path) -> None:
    """The lock's content hash covers the spec only; the env must follow the packages."""
    root = copy_project(project, tmp_path)
    config = config_for(root, tmp_path)
    spec = root / "environment-specs" / f"{CPU}.yml"
    lockfile = root / "lockfiles" / f"{CPU}.conda-lock.yml"
    spec_bytes = spec.read_bytes()
    original_hash = read_lock_header(lockfile)["content_hash"]

    first = ensure(config, CPU)
    replace_in_file(spec, "\n- transformers\n", "\n- transformers=4.36.2\n")
    lock_envs(config, [CPU])
    spec.write_bytes(spec_bytes)
    lock_envs(config, [CPU])  # unpinned again, but the solver keeps the locked 4.36.2
    assert read_lock_header(lockfile)["content_hash"] == original_hash
    locked = {p.name: p.version
              for p in read_lockfile(lockfile).for_platform(host_platform(), "conda")}
    assert locked["transformers"] == "4.36.2"

    result = ensure(config, CPU)
    assert result.action != "reuse" and result.generation != first.generation
    assert module_versions(result.python, "transformers")["transformers"][0] == "4.36.2"


# --- repair --------------------------------------------------------------------------------------


def test_missing_fingerprint_is_repaired(project: SampleProject, tmp_path: Path) -> None:
    config = config_for(project.path, tmp_path)
    first = ensure(config, CPU)
    fingerprint_path(first.prefix).unlink()
    plan = make_plan(config, CPU)
    assert plan.action == "repair" and "fingerprint" in plan.reason
    result = ensure(config, CPU)
    assert result.action == "repair" and result.generation == first.generation
    assert read_fingerprint(result.prefix) is not None
    assert run_python(result.python, "import torch; print(torch.__version__)") == "2.2.1"
    assert ensure(config, CPU).action == "reuse"


def test_a_repair_whose_old_files_are_in_use_still_builds(
        project: SampleProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        logs: pytest.LogCaptureFixture) -> None:
    config = config_for(project.path, tmp_path)
    layout = HomeLayout(config.home)
    first = ensure(config, CPU)
    fingerprint_path(first.prefix).unlink()
    real_unlink = os.unlink

    def unlink(path: str, *args: object, **kwargs: object) -> None:
        if str(layout.trash) in os.fspath(path) and \
                os.path.basename(path) in ("python", "python.exe"):
            exc = PermissionError(errno.EACCES, "in use", os.fspath(path))
            exc.winerror = 32  # type: ignore[attr-defined]  # the old python still runs
            raise exc
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(fsops, "DELETE_RETRY_BUDGET_S", 0.1)
    result = ensure(config, CPU)  # a failed trash delete never fails ensure
    assert result.action == "repair" and read_fingerprint(result.prefix) is not None
    assert "in use" in logs.text and "until the next 'provisioner gc'" in logs.text
    [left] = list(layout.trash.iterdir())
    assert (left / fsops.MARKER_NAME).is_file()
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert run_python(result.python, "import torch; print(torch.__version__)") == "2.2.1"


def test_in_progress_marker_is_repaired(project: SampleProject, tmp_path: Path) -> None:
    config = config_for(project.path, tmp_path)
    first = ensure(config, CPU)
    mark_in_progress(first.prefix, "killed mid-build")
    plan = make_plan(config, CPU)
    assert plan.action == "repair" and "interrupted" in plan.reason
    result = ensure(config, CPU)
    assert result.action == "repair"
    assert not in_progress_path(result.prefix).exists()
    assert run_python(result.python, "import transformers; print(transformers.__version__)")


def test_leftover_staging_is_removed_under_the_lock(project: SampleProject,
                                                   tmp_path: Path) -> None:
    config = config_for(project.path, tmp_path)
    layout = HomeLayout(config.home)
    gen = make_plan(config, CPU).generation
    stale = layout.staging / f"{CPU}.{gen}.dead00"
    other_key = layout.staging / f"{CPU}.v2.{gen}.beef00"  # a dotted key that starts like CPU
    for path in (stale, other_key):
        path.mkdir(parents=True)
        fsops.write_marker(path, "env")
        mark_in_progress(path, "interrupted")
        (path / "bin").mkdir()

    plan = make_plan(config, CPU)
    assert plan.action == "repair" and plan.stale_staging == (stale,)
    result = ensure(config, CPU)
    assert result.action == "repair"
    assert not stale.exists()
    assert other_key.is_dir(), "another key's staging dir is not covered by this key's lock"
    assert staging_entries(layout) == [other_key.name]


@pytest.mark.parametrize("fault", ["after-install", "before-pointer"])
def test_killed_build_is_recovered(project: SampleProject, tmp_path: Path, fault: str) -> None:
    home = tmp_path / "home"
    killed = run_cli(["--home", str(home), "ensure", CPU, "--project", str(project.path)],
                     PROVISIONER_TEST_FAULT=fault)
    assert killed.returncode == SELF_KILLED_RC
    config = config_for(project.path, tmp_path)
    layout = HomeLayout(home)
    assert read_pointer(layout, CPU) is None
    result = ensure(config, CPU)
    if fault == "before-pointer":
        assert result.action == "reuse"  # promoted and fingerprinted: only the pointer was missing
    else:
        assert result.action == "repair"
    assert read_pointer(layout, CPU) == result.generation
    assert staging_entries(layout) == []
    assert run_python(result.python, "import torch; print(torch.__version__)") == "2.2.1"


def test_failed_import_check_leaves_nothing(project: SampleProject, tmp_path: Path) -> None:
    root = copy_project(project, tmp_path)
    spec = root / "environment-specs" / f"{CPU}.yml"
    replace_in_file(spec, "  - torch\n  - transformers\n",
                    "  - torch\n  - transformers\n  - no_such_module_xyz\n")
    config = config_for(root, tmp_path)
    layout = HomeLayout(config.home)
    with pytest.raises(ImportCheckError, match="no_such_module_xyz") as err:
        ensure(config, CPU)
    assert err.value.exit_code == 2 and err.value.hint and "nothing was promoted" in err.value.hint
    assert staging_entries(layout) == []
    assert read_pointer(layout, CPU) is None
    assert not layout.key_dir(CPU).exists() or not any(layout.key_dir(CPU).iterdir())


def test_a_cleanup_that_hits_files_in_use_never_hides_the_build_error(
        project: SampleProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        logs: pytest.LogCaptureFixture) -> None:
    root = copy_project(project, tmp_path)
    spec = root / "environment-specs" / f"{CPU}.yml"
    replace_in_file(spec, "  - torch\n  - transformers\n",
                    "  - torch\n  - transformers\n  - no_such_module_xyz\n")
    config = config_for(root, tmp_path)
    layout = HomeLayout(config.home)
    real_unlink = os.unlink

    def unlink(path: str, *args: object, **kwargs: object) -> None:
        # What Windows says for a file a scanner (or a leftover process) holds open.
        if str(layout.trash) in os.fspath(path) and "conda-meta" in os.fspath(path):
            exc = PermissionError(errno.EACCES, "in use", os.fspath(path))
            exc.winerror = 32  # type: ignore[attr-defined]
            raise exc
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(fsops, "DELETE_RETRY_BUDGET_S", 0.1)
    with pytest.raises(ImportCheckError, match="no_such_module_xyz"):
        ensure(config, CPU)
    assert "in use" in logs.text and "failed build" in logs.text
    assert staging_entries(layout) == [] and read_pointer(layout, CPU) is None
    [left] = list(layout.trash.iterdir())
    assert (left / fsops.MARKER_NAME).is_file()

    monkeypatch.setattr(os, "unlink", real_unlink)
    from provisioner.build.maintenance import collect_garbage

    report = collect_garbage(config)
    assert [i.path for i in report.removed] == [left] and not any(layout.trash.iterdir())


# --- integrity -----------------------------------------------------------------------------------


def test_wrong_sha256_in_lock_is_refused(project: SampleProject, tmp_path: Path) -> None:
    root = copy_project(project, tmp_path)
    lockfile = root / "lockfiles" / f"{CPU}.conda-lock.yml"
    good = lockfile.read_bytes()
    pkg = next(p for p in read_lockfile(lockfile).for_platform(host_platform(), "conda")
               if p.name == "pytorch")
    assert pkg.sha256 is not None
    wrong = hashlib.sha256(b"not the archive").hexdigest()
    replace_in_file(lockfile, pkg.sha256, wrong)
    config = config_for(root, tmp_path)
    layout = HomeLayout(config.home)

    with pytest.raises(IntegrityError) as err:
        ensure(config, CPU)
    message = str(err.value)
    assert "pytorch" in message and wrong in message and pkg.sha256 in message
    assert err.value.hint
    assert not layout.key_dir(CPU).exists()
    assert read_pointer(layout, CPU) is None
    assert staging_entries(layout) == []

    lockfile.write_bytes(good)
    result = ensure(config, CPU)
    assert result.action == "build"
    assert run_python(result.python, "import torch; print(torch.__version__)") == "2.2.1"


def test_malformed_sha256_in_lock_fails_at_parse(project: SampleProject, tmp_path: Path) -> None:
    root = copy_project(project, tmp_path)
    lockfile = root / "lockfiles" / f"{CPU}.conda-lock.yml"
    pkg = next(p for p in read_lockfile(lockfile).for_platform(host_platform(), "conda")
               if p.name == "numpy")
    assert pkg.sha256 is not None
    replace_in_file(lockfile, pkg.sha256, "xyz")
    with pytest.raises(LockfileError, match=r"numpy.*malformed sha256 'xyz'"):
        read_lockfile(lockfile)
    config = config_for(root, tmp_path)
    with pytest.raises(LockfileError, match="malformed sha256"):
        ensure(config, CPU)
    assert not (config.home / "envs").exists()


def test_tampered_archive_is_refused_and_not_remembered(project: SampleProject,
                                                        tmp_path: Path) -> None:
    root = copy_project(project, tmp_path)
    config = config_for(root, tmp_path)
    layout = HomeLayout(config.home)
    archive = next((root / "channel" / host_platform()).glob("pytorch-2.2.1-*_cpu_0.tar.bz2"))
    original = archive.read_bytes()
    archive.write_bytes(original + b"tampered")
    bad = hashlib.sha256(archive.read_bytes()).hexdigest()

    for _attempt in range(2):
        with pytest.raises(IntegrityError, match="pytorch") as err:
            ensure(config, CPU)
        assert bad in str(err.value)
        memo_file = layout.package_cache / "verified-sha256.json"
        memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
        assert str(archive) not in memo
        assert bad not in json.dumps(memo)
        assert not layout.key_dir(CPU).exists()
        assert staging_entries(layout) == []

    archive.write_bytes(original)
    assert ensure(config, CPU).action == "build"


# --- CUDA host check -----------------------------------------------------------------------------


def test_cuda_key_refused_without_a_driver(project: SampleProject, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner.build.cuda import host_cuda_version

    monkeypatch.delenv("CONDA_OVERRIDE_CUDA")
    if host_cuda_version() is not None:
        pytest.skip("this host has a CUDA driver; the no-driver case cannot be observed here")
    config = config_for(project.path, tmp_path)
    with pytest.raises(CudaMismatchError) as err:
        ensure(config, CU)
    assert "12.1" in str(err.value) and "none was detected" in str(err.value)
    assert err.value.hint is not None and "CONDA_OVERRIDE_CUDA" in err.value.hint
    assert not (config.home / "envs" / CU).exists()
    assert staging_entries(HomeLayout(config.home)) == []


def test_cuda_key_refused_on_an_older_driver(project: SampleProject, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "11.8")
    config = config_for(project.path, tmp_path)
    with pytest.raises(CudaMismatchError, match=r"needs CUDA >=12\.1.*11\.8") as err:
        ensure(config, CU)
    assert err.value.hint is not None and "CONDA_OVERRIDE_CUDA" in err.value.hint
    assert "--allow-cuda-mismatch" in err.value.hint
    assert not (config.home / "envs").exists()


def test_allow_cuda_mismatch_builds_and_records_it(project: SampleProject, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "11.8")
    config = config_for(project.path, tmp_path)
    result = ensure(config, CU, EnsureOptions(allow_cuda_mismatch=True))
    assert result.action == "build"
    assert result.cuda is not None and result.cuda["ok"] is False
    assert result.cuda["host"] == "11.8"
    fp = read_fingerprint(result.prefix)
    assert fp is not None and fp.cuda_mismatch_allowed is True
    assert run_python(result.python, "import bitsandbytes; print(bitsandbytes.__version__)") \
        == "0.43.1"


@pytest.mark.parametrize("override", [None, ""])
def test_cpu_key_needs_no_cuda(project: SampleProject, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch, override: str | None) -> None:
    if override is None:
        monkeypatch.delenv("CONDA_OVERRIDE_CUDA")
    else:
        monkeypatch.setenv("CONDA_OVERRIDE_CUDA", override)
    config = config_for(project.path, tmp_path)
    result = ensure(config, CPU)
    assert result.action == "build"
    assert result.cuda is not None and result.cuda["ok"] is True
    assert result.cuda["required"] is None
    fp = read_fingerprint(result.prefix)
    assert fp is not None and fp.cuda_mismatch_allowed is False
    assert run_python(result.python, "import torch; print(torch.version.cuda)") == "None"


# --- dry run -------------------------------------------------------------------------------------


def test_dry_run_writes_nothing(project: SampleProject, tmp_path: Path) -> None:
    config = config_for(project.path, tmp_path)
    result = ensure(config, CU, EnsureOptions(dry_run=True))
    assert result.dry_run and result.action == "build"
    assert not config.home.exists()
    packages = read_lockfile(project.path / "lockfiles" / f"{CU}.conda-lock.yml") \
        .for_platform(host_platform(), "conda")
    details = result.plan.details
    assert details["packages_to_link"] == len(packages)
    channel = project.path / "channel"
    expected = sum((channel / p.subdir / p.file_name).stat().st_size for p in packages)
    assert details["archive_bytes"] == expected
    assert details["archives_known"] == len(packages)
    assert result.backend == "rattler"

    text = run_cli(["--home", str(config.home), "ensure", CU, "--project", str(project.path),
                    "--dry-run"], CONDA_OVERRIDE_CUDA="12.1")
    assert text.returncode == 0, text.stderr
    assert f"plan for {CU}: build" in text.stdout
    assert f"packages_to_link  {len(packages)}" in text.stdout
    assert f"archive_bytes     {expected}" in text.stdout
    assert not config.home.exists()

    built = ensure(config, CU)
    again = ensure(config, CU, EnsureOptions(dry_run=True))
    assert again.action == "reuse" and again.generation == built.generation
    assert "packages_to_link" not in again.plan.details


def test_dry_run_reports_the_cuda_refusal_of_a_real_run(
        project: SampleProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "11.8")
    config = config_for(project.path, tmp_path)
    with pytest.raises(CudaMismatchError) as real:
        ensure(config, CU)
    with pytest.raises(CudaMismatchError) as dry:
        ensure(config, CU, EnsureOptions(dry_run=True))
    assert dry.value.message == real.value.message
    assert "needs CUDA >=12.1 (__cuda 12.1 recorded when locking)" in dry.value.message
    allowed = ensure(config, CU, EnsureOptions(dry_run=True, allow_cuda_mismatch=True))
    assert allowed.action == "build" and allowed.cuda is not None
    assert allowed.cuda["ok"] is False and allowed.cuda["rule"] == "recorded"
    assert not (config.home / "envs").exists()

    cli = run_cli(["--home", str(config.home), "ensure", CU, "--project", str(project.path),
                   "--dry-run"], CONDA_OVERRIDE_CUDA="11.8")
    assert cli.returncode == 2, cli.stdout
    assert "needs CUDA >=12.1" in cli.stderr


# --- locking and concurrency ---------------------------------------------------------------------

_HOLDER = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


def test_lock_timeout_names_the_lock(project: SampleProject, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     logs: pytest.LogCaptureFixture) -> None:
    config = config_for(project.path, tmp_path)
    layout = HomeLayout(config.home)
    lock_path = layout.lock_file(CPU)
    lock_path.parent.mkdir(parents=True)
    gen = make_plan(config, CPU).generation
    live = layout.staging / f"{CPU}.{gen}.1ive00"  # could be the holder's build in progress
    live.mkdir(parents=True)
    fsops.write_marker(live, "env")
    monkeypatch.setattr(keylock, "WAIT_LOG_INTERVAL_S", 0.2)

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(LockTimeoutError) as err:
            ensure(config, CPU, EnsureOptions(lock_timeout=1))
        elapsed = time.monotonic() - start
        # Timed out while the holder still held the lock, not before its timeout.
        assert elapsed >= 1.0 and holder.poll() is None
        assert str(lock_path) in str(err.value)
        assert f"waiting for another process building {CPU}" in logs.text
        assert live.is_dir(), "a staging dir must not be judged stale without the lock"
        assert not layout.key_dir(CPU).exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    result = ensure(config, CPU, EnsureOptions(lock_timeout=5))
    assert result.action == "repair" and not live.exists()
    assert lock_path.exists()


def test_threads_build_once(project: SampleProject, tmp_path: Path) -> None:
    config = config_for(project.path, tmp_path)
    barrier = threading.Barrier(4)
    results: list[EnsureResult] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            results.append(ensure(config, CU))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert errors == []
    actions = sorted(r.action for r in results)
    assert actions == ["build", "reuse", "reuse", "reuse"]
    assert len({r.python for r in results}) == 1
    assert run_python(results[0].python, "import torch; print(torch.__version__)") == "2.2.1"


def test_building_a_lock_older_than_its_spec_warns(
    project: SampleProject, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "p"
    shutil.copytree(project.path, copy, symlinks=True)
    spec = copy / "environment-specs" / f"{CPU}.yml"
    spec.write_text(spec.read_text(encoding="utf-8").replace(
        "- transformers\nx-provisioner", "- transformers >=4.36\nx-provisioner"), encoding="utf-8")
    assert "- transformers >=4.36" in spec.read_text(encoding="utf-8")
    caplog.set_level(logging.WARNING, logger="provisioner")
    result = ensure(load_config(copy, home=tmp_path / "home", environ={}), CPU)
    assert result.action == "build"
    assert "spec changed since it was locked" in caplog.text


# --------------------------------------------------------------------------- pip layer


def _project_with_pip_layer(project: SampleProject, tmp_path: Path) -> Path:
    """A copy whose CPU spec has a pip: section, locked and installed from local wheels."""
    from provisioner.lock.wheels import build_wheel
    from provisioner.lock.write import lock_envs

    dest = copy_project(project, tmp_path)
    build_wheel(dest / "wheels", "tinywheel", "1.0", requires=["numpy"])
    spec = dest / "environment-specs" / f"{CPU}.yml"
    text = spec.read_text(encoding="utf-8")
    text = text.replace("- transformers\nx-provisioner:",
                        "- transformers\n- pip:\n  - tinywheel==1.0\nx-provisioner:")
    text = text.replace("  - transformers\n", "  - transformers\n  - tinywheel\n", 1)
    spec.write_text(text, encoding="utf-8")
    with (dest / "provisioner.toml").open("a", encoding="utf-8") as fh:
        fh.write('\n[pip]\nno-index = true\nfind-links = ["wheels"]\n')
    lock_envs(load_config(dest, environ={}), [CPU])
    return dest


def test_pip_layer_is_installed_with_uv_from_local_wheels(
    project: SampleProject, tmp_path: Path
) -> None:
    dest = _project_with_pip_layer(project, tmp_path)
    assert not list((dest / "lockfiles").glob("*.pip.txt"))  # the lock alone holds the layer
    lock = read_lockfile(dest / "lockfiles" / f"{CPU}.conda-lock.yml")
    assert [(p.name, p.version) for p in lock.for_platform(host_platform(), "pip")] == [
        ("tinywheel", "1.0")]
    config = config_for(dest, tmp_path)
    result = ensure(config, CPU)
    assert result.action == "build"
    # numpy (required by the wheel) comes from conda; the pip layer installed only tinywheel.
    assert run_python(result.python, "import tinywheel, numpy; print(tinywheel.__version__)") \
        == "1.0"
    site = next(result.prefix.glob(SITE_GLOB))
    installers = {d.name.split("-")[0]: (d / "INSTALLER").read_text().strip()
                  for d in site.glob("*.dist-info") if (d / "INSTALLER").is_file()}
    assert [name for name, by in installers.items() if by == "uv"] == ["tinywheel"]
    assert find_staging_path(result.prefix, str(HomeLayout(config.home).staging),
                             trust_hardlinks=False) == []


def test_pip_layer_hash_mismatch_fails_the_build_before_promotion(
    project: SampleProject, tmp_path: Path
) -> None:
    from provisioner.errors import PipLayerError

    dest = _project_with_pip_layer(project, tmp_path)
    lock_path = dest / "lockfiles" / f"{CPU}.conda-lock.yml"
    [entry] = read_lockfile(lock_path).for_platform(host_platform(), "pip")
    assert entry.sha256
    text = lock_path.read_text(encoding="utf-8")
    lock_path.write_text(text.replace(entry.sha256, "f" * 64), encoding="utf-8", newline="\n")
    config = config_for(dest, tmp_path)
    with pytest.raises(PipLayerError, match="could not install the pip layer"):
        ensure(config, CPU)
    layout = HomeLayout(config.home)
    assert not layout.pointer(CPU).exists()
    assert not layout.key_dir(CPU).exists() or not any(layout.key_dir(CPU).iterdir())
    assert not any(layout.staging.iterdir())
