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
from provisioner.lock.cuda_need import CudaNeed, cuda_need_of
from provisioner.lock.lockfile import LockedPackage
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
        "required": "12.1", "host": "11.8", "ok": False, "rule": "given",
        "message": "the env needs CUDA 12.1, the host driver supports 11.8"}
    assert isinstance(compare_cuda(None, None), CudaCheck)
    need = CudaNeed(">=12", "major", "CUDA major of cuda-version 12.9")
    check = compare_cuda(need, "11.8")
    assert not check.ok and check.rule == "major"
    assert check.message == ("the env needs CUDA >=12 (CUDA major of cuda-version 12.9), "
                             "the host driver supports 11.8")


@pytest.mark.parametrize(("spec", "host", "ok"), [
    (">=12|>=13", "11.0", False),  # packaging read this as "no constraint"
    (">=12|>=13", "13.1", True),
    ("12.*", "12.4", True),        # packaging failed this one
    ("12.*", "13.0", False),
    (">=11.8,<13", "12.9", True),
])
def test_conda_specs_are_rattlers(spec: str, host: str, ok: bool) -> None:
    assert compare_cuda(spec, host).ok is ok


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
    for platform in ("linux-64", "win-64"):
        assert required_cuda(cu, platform) == CudaNeed(
            ">=12.1", "recorded", "__cuda 12.1 recorded when locking")
    assert required_cuda(cpu, "linux-64") == CudaNeed(None, "none", None)


def _conda(name: str, version: str, build: str = "0",
           deps: tuple[tuple[str, str], ...] = ()) -> LockedPackage:
    return LockedPackage(
        name=name, version=version, manager="conda", platform="linux-64",
        url=f"https://conda.anaconda.org/conda-forge/linux-64/{name}-{version}-{build}.conda",
        sha256="0" * 64, dependencies=deps)


CUDART = _conda("cuda-cudart", "12.9.79", "h3f2d84a_0", (("cuda-version", ">=12.9,<12.10.0a0"),))
CUDA_VERSION_129 = _conda("cuda-version", "12.9", "h4f385c5_3")


@pytest.mark.parametrize(("packages", "recorded", "need"), [
    pytest.param([CUDART, CUDA_VERSION_129,
                  _conda("pytorch", "2.5.1", "cuda126_py312h1763f6d_303",
                         (("__cuda", ""), ("cuda-version", ">=12.6,<13")))],
                 "12.0", CudaNeed(">=12.0", "recorded", "__cuda 12.0 recorded when locking"),
                 id="solved-for-12.0-holds-cuda-version-12.9"),
    pytest.param([CUDART, CUDA_VERSION_129, _conda("libcublas", "12.9.1.4", "h9ab20c4_0")],
                 None, CudaNeed(">=12", "major", "CUDA major of cuda-version 12.9"),
                 id="third-party-cuda-version-12.9-needs-12"),
    pytest.param([CUDART, CUDA_VERSION_129,
                  _conda("pytorch", "2.5.1", "cpu_generic_py312_h6255d31_15"),
                  _conda("torchaudio", "2.5.1", "py312h0",
                         (("cuda-cudart", ">=12.6.77,<13.0a0"),))],
                 None, CudaNeed(None, "none", None), id="cpu-lock-with-cuda-cudart"),
    pytest.param([CUDART], None, CudaNeed(None, "none", None), id="cuda-cudart-alone"),
    pytest.param([_conda("cupy", "13.3.0", "py311h0", (("__cuda", ">=11.8"),)),
                  _conda("pytorch", "2.5.1", "cuda126_py312h0", (("__cuda", ">=12.0"),)),
                  CUDA_VERSION_129],
                 None, CudaNeed(">=12.0", "dependency", "__cuda >=12.0 dependency of pytorch"),
                 id="strongest-explicit-dependency"),
    pytest.param([_conda("pytorch-cuda", "12.1", "ha16c6d3_5"),
                  _conda("jaxlib", "0.4.25", "cuda120py311h0", (("__cuda", ""),))],
                 None, CudaNeed(">=12", "major", "CUDA major of pytorch-cuda 12.1"),
                 id="pytorch-cuda-beats-a-bare-dependency"),
    pytest.param([_conda("jaxlib", "0.4.25", "cuda120py311h0", (("__cuda", ""),))],
                 None, CudaNeed("*", "dependency", "__cuda * dependency of jaxlib"),
                 id="bare-dependency-alone-needs-any-driver"),
])
def test_cuda_need_rules(packages: list[LockedPackage], recorded: str | None,
                         need: CudaNeed) -> None:
    assert cuda_need_of(packages, recorded) == need


@pytest.mark.parametrize(("need", "host", "ok"), [
    (CudaNeed(">=12.0", "recorded", None), "12.0", True),  # solved for 12.0: a 12.0 driver
    (CudaNeed(">=12", "major", None), "12.0", True),       # minor-version compatibility
    (CudaNeed(">=12", "major", None), "11.8", False),
    (CudaNeed(None, "none", None), None, True),            # cuda-cudart alone: no driver
    (CudaNeed("*", "dependency", None), None, False),
    (CudaNeed("*", "dependency", None), "11.2", True),
])
def test_cuda_need_against_the_host(need: CudaNeed, host: str | None, ok: bool) -> None:
    assert compare_cuda(need, host).ok is ok


def test_mismatch_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONDA_OVERRIDE_CUDA", raising=False)
    hint = mismatch_hint()
    assert "set CONDA_OVERRIDE_CUDA=<version>" in hint
    assert "--allow-cuda-mismatch" in hint
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "11.8")
    hint = mismatch_hint(["sample-cu118", "sample-cpu"])
    assert "CONDA_OVERRIDE_CUDA is '11.8'" in hint
    assert "or pick another key: sample-cu118, sample-cpu" in hint
