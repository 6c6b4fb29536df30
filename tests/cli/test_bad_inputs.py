"""Bad inputs through the real CLI: exit 2 (or 1 for a failed check), never 3 (a bug).

Each case starts from a fresh copy of the locked sample project, damages one
thing the way a user or a broken disk would, and runs ``python -m provisioner``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from winsupport import IS_WINDOWS

from provisioner.errors import EXIT_CHECK_FAILED, EXIT_USER_ERROR
from provisioner.lock.platforms import host_platform

CPU = "sample-cpu-transformers"
CU121 = "sample-cu121-transformers"
# Where nothing can be created: /proc on Linux (read-only at / on macOS too); Windows has
# neither, so there a path under a regular file of the project (the tests run in it).
UNWRITABLE = "provisioner.toml\\x" if IS_WINDOWS else "/proc/x"


def _spec(p: Path) -> Path:
    return p / "environment-specs" / f"{CPU}.yml"


def _lock(p: Path) -> Path:
    return p / "lockfiles" / f"{CPU}.conda-lock.yml"


def _set_imports(p: Path, imports: list[str]) -> None:
    data = yaml.safe_load(_spec(p).read_text(encoding="utf-8"))
    data.setdefault("x-provisioner", {})["imports"] = imports
    _spec(p).write_text(yaml.safe_dump(data), encoding="utf-8")


def _corrupt_archive(p: Path) -> None:
    (archive,) = [a for a in p.rglob("numpy-*.tar.bz2") if a.parent.name == host_platform()]
    archive.write_bytes(archive.read_bytes() + b"xx")


def _relock(p: Path) -> None:
    subprocess.run([sys.executable, "-m", "provisioner", "lock", CPU, "--project", str(p)],
                   check=True, capture_output=True, timeout=120)


def _nothing(p: Path) -> None:
    del p


BINARY = bytes(range(128, 256)) * 8
CASES: dict[str, tuple[Callable[[Path], None], list[str], dict[str, str], int, str]] = {
    # name: (damage, argv, extra env, exit code, text the error names)
    "binary spec": (lambda p: _spec(p).write_bytes(BINARY), ["ensure", CPU], {}, 2,
                    "not UTF-8 text"),
    "binary spec, resolve": (lambda p: _spec(p).write_bytes(BINARY), ["resolve", "gpt2"], {},
                             2, "not UTF-8 text"),
    "binary models.yml": (lambda p: (p / "environment-specs" / "models.yml").write_bytes(BINARY),
                          ["resolve", "gpt2"], {}, 2, "models.yml"),
    "binary provisioner.toml": (lambda p: (p / "provisioner.toml").write_bytes(BINARY),
                                ["ensure", CPU], {}, 2, "provisioner.toml"),
    "5,000-char model id": (_nothing, ["resolve", "m" * 5000], {}, 2, "error:"),
    "huge CONDA_OVERRIDE_CUDA": (_nothing, ["ensure", CU121],
                                 {"CONDA_OVERRIDE_CUDA": "9" * 40}, 2, "CONDA_OVERRIDE_CUDA"),
    "sample into an unwritable path": (_nothing, ["sample", UNWRITABLE], {}, 2, UNWRITABLE),
    "bad imports entry": (lambda p: _set_imports(p, ["os; import shutil"]), ["lock", CPU], {},
                          2, "is not a module name"),
    "imports entry the env lacks": (lambda p: (_set_imports(p, ["no_such_module"]), _relock(p))[0],
                                    ["ensure", CPU], {}, 2, "no_such_module"),
    "sha mismatch": (_corrupt_archive, ["ensure", CPU], {}, 2, "sha256 mismatch"),
    "key with no lock": (_nothing, ["ensure", "no-such-key"], {}, 2, "provisioner lock KEY"),
    "lockfile is a directory": (lambda p: (_lock(p).unlink(), _lock(p).mkdir())[0],
                                ["ensure", CPU], {}, 2, "is a directory"),
    "home in an unwritable path": (_nothing, ["--home", os.path.join(UNWRITABLE, "home"),
                                              "ensure", CPU], {}, 2,
                                   os.path.join(UNWRITABLE, "home")),
    "truncated lock, lock --check": (
        lambda p: _lock(p).write_bytes(_lock(p).read_bytes()[:-300]), ["lock", "--check"], {},
        EXIT_CHECK_FAILED, "lacks"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_no_internal_error(shared_project: Path, tmp_path: Path,
                                        case: str) -> None:
    damage, argv, extra, code, named = CASES[case]
    project = tmp_path / "project"
    shutil.copytree(shared_project, project)
    damage(project)
    env = {**os.environ, "CONDA_OVERRIDE_CUDA": "12.1", **extra}
    env.pop("PROVISIONER_DEBUG", None)
    if "--home" not in argv:
        env["PROVISIONER_HOME"] = str(tmp_path / "home")
    done = subprocess.run([sys.executable, "-m", "provisioner", *argv], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert "internal error" not in output and "Traceback" not in output
    assert named in output
    if code == EXIT_USER_ERROR:
        assert "error: " in done.stderr
