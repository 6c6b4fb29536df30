"""The host CUDA check: what a lock needs, what the driver reports, and how they compare."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.build.cuda import (
    CudaCheck,
    compare_cuda,
    host_cuda_version,
    mismatch_hint,
    required_cuda,
)
from provisioner.lock.reader import read_lockfile
from provisioner.sample.project import SampleProject, create_sample_project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SampleProject:
    return create_sample_project(tmp_path_factory.mktemp("cudacheck") / "sp")


def lock_of(project: SampleProject, key: str) -> Path:
    return project.path / "lockfiles" / f"{key}.conda-lock.yml"


@pytest.mark.parametrize(("required", "host", "ok"), [
    (None, None, True),            # a CPU env runs anywhere
    (None, "12.4", True),
    ("12.1", None, False),         # no driver detected
    ("12.1", "12.1", True),
    ("12.1", "12.4", True),        # newer drivers run older runtimes
    ("12.1", "13.0", True),
    ("12.1", "12.0", False),
    ("12.1", "11.8", False),
    ("11.8", "12.1", True),
    ("12.1", "not-a-version", False),
    (">=12.0,<13", "12.4", True),  # specifiers from a lock's __cuda constraint
    (">=12.0,<13", "13.1", False),
    (">= 12.0", "12.0", True),
    (">=12.0", "11.8", False),
    ("~~weird~~", "12.1", True),   # an unreadable requirement does not block a build
])
def test_compare_cuda(required: str | None, host: str | None, ok: bool) -> None:
    check = compare_cuda(required, host)
    assert check.ok is ok
    assert check.required == required and check.host == host
    assert check.message


def test_compare_cuda_messages() -> None:
    assert compare_cuda(None, "12.1").message == "the env needs no CUDA driver"
    assert compare_cuda("12.1", None).message == \
        "the env needs a CUDA 12.1 driver, and none was detected"
    assert compare_cuda("12.1", "11.8").message == \
        "the env needs CUDA 12.1, the host driver supports 11.8"
    assert compare_cuda("12.1", "12.4").message == "host CUDA 12.4 satisfies 12.1"
    assert compare_cuda("12.1", "11.8").to_dict() == {
        "required": "12.1", "host": "11.8", "ok": False,
        "message": "the env needs CUDA 12.1, the host driver supports 11.8"}
    assert isinstance(compare_cuda(None, None), CudaCheck)


@pytest.mark.parametrize("version", ["12.1", "11.8", "12.4"])
def test_host_cuda_version_honours_the_override(monkeypatch: pytest.MonkeyPatch,
                                                version: str) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", version)
    assert host_cuda_version() == version


def test_empty_override_means_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "")
    assert host_cuda_version() is None


def test_required_cuda_from_real_locks(project: SampleProject) -> None:
    cu = read_lockfile(lock_of(project, "sample-cu121-transformers-bnb"))
    cpu = read_lockfile(lock_of(project, "sample-cpu-transformers"))
    assert required_cuda(cu, "linux-64") == "12.1"
    assert required_cuda(cu, "win-64") == "12.1"
    assert required_cuda(cpu, "linux-64") is None


def test_mismatch_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONDA_OVERRIDE_CUDA", raising=False)
    hint = mismatch_hint()
    assert "set CONDA_OVERRIDE_CUDA=<version>" in hint
    assert "--allow-cuda-mismatch" in hint
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "11.8")
    hint = mismatch_hint(["sample-cu118", "sample-cpu"])
    assert "CONDA_OVERRIDE_CUDA is '11.8'" in hint
    assert "or pick another key: sample-cu118, sample-cpu" in hint
