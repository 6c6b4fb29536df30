"""CRLF checkouts: a lock and its spec with CRLF line endings are the same lock and spec."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from provisioner.config import load_config
from provisioner.lock.eol import lf_bytes, read_lf_bytes
from provisioner.lock.write import lock_envs
from provisioner.sample.project import write_sample_project

REPO = Path(__file__).resolve().parents[2]
PROVISIONER = Path(sysconfig.get_path("scripts")) / (
    "provisioner.exe" if sys.platform == "win32" else "provisioner"
)
# Whether the check needed conda-lock: it does not while the seal over the spec holds.
_CHECK_AND_REPORT_IMPORT = (
    "import sys; from pathlib import Path; from provisioner.config import load_config;"
    "from provisioner.lock.check import check_locks;"
    "results = check_locks(load_config(Path(sys.argv[1]), environ={}));"
    "print(all(r.ok for r in results), 'conda_lock' in sys.modules)"
)


def to_crlf(path: Path) -> None:
    raw = path.read_bytes()
    assert b"\r\n" not in raw
    path.write_bytes(raw.replace(b"\n", b"\r\n"))


def test_lf_bytes_turns_crlf_into_lf_and_keeps_a_lone_cr() -> None:
    assert lf_bytes(b"a: 1\r\nb: 2\r\n") == b"a: 1\nb: 2\n"
    assert lf_bytes(b"a\rb\n") == b"a\rb\n"
    assert lf_bytes(b"a\r\r\nb") == b"a\r\nb"  # one CRLF, one CR of content


def test_read_lf_bytes_of_a_crlf_file(tmp_path: Path) -> None:
    path = tmp_path / "x.yml"
    path.write_bytes(b"x: 1\r\n")
    assert read_lf_bytes(path) == b"x: 1\n"


@pytest.fixture()
def crlf_repo_project(tmp_path: Path) -> Path:
    """The repository's committed specs and locks, converted to CRLF as Windows checks out."""
    project = tmp_path / "project"
    for name in ("environment-specs", "lockfiles"):
        shutil.copytree(REPO / name, project / name)
    for path in [*project.glob("environment-specs/*.yml"), *project.glob("lockfiles/*.yml")]:
        to_crlf(path)
    return project


def test_lock_check_passes_on_a_crlf_copy_of_the_repository(crlf_repo_project: Path) -> None:
    done = subprocess.run([str(PROVISIONER), "lock", "--check", "--project",
                           str(crlf_repo_project)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout


def test_the_conda_lock_seal_holds_on_crlf_so_no_conda_lock_import(
        crlf_repo_project: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _CHECK_AND_REPORT_IMPORT,
                           str(crlf_repo_project)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


def test_relocking_a_crlf_checkout_does_not_rewrite_it(tmp_path: Path) -> None:
    root = tmp_path / "project"
    write_sample_project(root)
    config = load_config(root, environ={})
    lock_envs(config)
    locks = sorted(config.locks_dir.glob("*.yml"))
    assert locks
    for path in [*locks, *config.specs_dir.glob("*.yml")]:
        to_crlf(path)
    before = {p: p.read_bytes() for p in locks}
    outcomes = lock_envs(config)
    assert [o.changed for o in outcomes] == [False] * len(outcomes)
    assert {p: p.read_bytes() for p in locks} == before  # still CRLF: not rewritten


def _git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_autocrlf_clone_of_the_repository_passes_lock_check(tmp_path: Path) -> None:
    if not (REPO / ".git").exists():
        pytest.skip("the tests do not run from a git checkout")
    clone = tmp_path / "clone"
    _git("-c", "core.autocrlf=true", "clone", "--quiet", "--no-hardlinks", str(REPO),
         str(clone), cwd=tmp_path)
    _git("config", "core.autocrlf", "true", cwd=clone)
    # .gitattributes (eol=lf) wins over autocrlf: the locks and specs come out LF.
    for path in [*clone.glob("environment-specs/*.yml"), *clone.glob("lockfiles/*.yml")]:
        assert b"\r\n" not in path.read_bytes(), path.name
    done = subprocess.run([str(PROVISIONER), "lock", "--check", "--project", str(clone)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
