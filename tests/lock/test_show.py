"""show-lock summaries of real third-party conda-lock v1 files (tests/data/real-locks/)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import EXIT_USER_ERROR, LockfileError, UserError
from provisioner.lock import reader
from provisioner.lock.lockfile import LockData, LockedPackage
from provisioner.lock.reader import read_lock_header, read_lockfile
from provisioner.lock.show import (
    LockSummary,
    PlatformSummary,
    render_summary_text,
    summarize_lock,
)

REAL_LOCKS = Path(__file__).resolve().parents[1] / "data" / "real-locks"

PYRO_231 = "pyrovelocity-pt2.3.1-cu121.conda-lock.yml"
PYRO_221 = "pyrovelocity-pt2.2.1-py311-cu121.conda-lock.yml"
EOTLES_GPU = "eotles-ai-research-env-gpu.conda-lock.yml"
TIGHT = "tight-budget-llm-cu118-bnb.conda-lock.yml"
EOTLES_CPU = "eotles-ai-research-env-cpu-5plat.conda-lock.yml"
LOCK_NAMES = sorted(p.name for p in REAL_LOCKS.glob("*.yml"))

# Entry counts as tests/data/PROVENANCE.md records them.
DOCUMENTED_TOTALS = {PYRO_231: 599, PYRO_221: 534, EOTLES_GPU: 472, TIGHT: 242, EOTLES_CPU: 2077}
DOCUMENTED_COUNTS = {PYRO_221: {"conda": 532, "pip": 2}, EOTLES_GPU: {"conda": 456, "pip": 16}}

_CPU_PLATFORM = {
    "python": "3.12.13",
    "pytorch_cuda": None,
    "transformers": "4.48.3",
    "bitsandbytes": None,
    "cuda_driver_required": None,
}
# platform -> the PlatformSummary fields that are not counts.
EXPECTED: dict[str, dict[str, dict[str, str | None]]] = {
    PYRO_231: {"linux-64": {
        "python": "3.10.14",
        "pytorch": "2.3.1 (py3.10_cuda12.1_cudnn8.9.2_0)",
        "pytorch_cuda": "12.1",
        "transformers": None,
        "bitsandbytes": None,
        # cudnn and nccl pulled in cuda-version 11.8 and jaxlib a bare __cuda;
        # pytorch-cuda's major must win (minor-version compatibility: any 12.x driver).
        "cuda_driver_required": ">=12",
        "cuda_driver_source": "CUDA major of pytorch-cuda 12.1",
    }},
    PYRO_221: {"linux-64": {
        "python": "3.11.8",
        "pytorch": "2.2.1 (py3.11_cuda12.1_cudnn8.9.2_0)",
        "pytorch_cuda": "12.1",
        "transformers": None,
        "bitsandbytes": None,
        "cuda_driver_required": ">=12",
        "cuda_driver_source": "CUDA major of pytorch-cuda 12.1",
    }},
    EOTLES_GPU: {"linux-64": {
        "python": "3.12.13",
        "pytorch": "2.5.1 (py3.12_cuda12.4_cudnn9.1.0_0)",
        "pytorch_cuda": "12.4",
        "transformers": "4.48.3",
        "bitsandbytes": None,
        "cuda_driver_required": ">=12",
        "cuda_driver_source": "CUDA major of pytorch-cuda 12.4",
    }},
    TIGHT: {"linux-64": {
        "python": "3.11.7",
        "pytorch": "2.3.0.dev20240117 (py3.11_cuda11.8_cudnn8.7.0_0)",
        "pytorch_cuda": "11.8",
        "transformers": "4.36.2",
        "bitsandbytes": "0.42.0 (pip)",
        "cuda_driver_required": ">=11",
        "cuda_driver_source": "CUDA major of pytorch-cuda 11.8",
    }},
    EOTLES_CPU: {
        "linux-64": {**_CPU_PLATFORM, "pytorch": "2.5.1 (py3.12_cpu_0)"},
        "linux-aarch64": {
            **_CPU_PLATFORM,
            "pytorch": "2.5.1 (cpu_generic_py312_h6255d31_15)",
            # torchaudio pulls cuda-cudart and cuda-version 12.9 next to a CPU pytorch on
            # aarch64: CUDA runtime files need no driver.
            "cuda_driver_required": None,
        },
        "osx-64": {**_CPU_PLATFORM, "pytorch": "2.5.1 (cpu_mkl_py312_hdc0b7d4_115)"},
        "osx-arm64": {**_CPU_PLATFORM, "pytorch": "2.5.1 (cpu_generic_py312_h8a46fbe_16)"},
        "win-64": {**_CPU_PLATFORM, "pytorch": "2.5.1 (py3.12_cpu_0)"},
    },
}


@dataclass(frozen=True)
class RealLock:
    name: str
    path: Path
    conda_lock: Any  # conda-lock's own Lockfile model: the independent oracle
    data: LockData
    strict_read_error: LockfileError | None  # what read_lockfile(path) with hash checks raised
    summary: LockSummary


@pytest.fixture(scope="session", params=LOCK_NAMES)
def real_lock(request: pytest.FixtureRequest) -> RealLock:
    from conda_lock.lockfile import parse_conda_lock_file

    name: str = request.param
    path = REAL_LOCKS / name
    strict_error = None
    try:
        data = read_lockfile(path)
    except LockfileError as exc:
        strict_error = exc
        data = read_lockfile(path, check_hashes=False)
    return RealLock(
        name=name,
        path=path,
        conda_lock=parse_conda_lock_file(path),
        data=data,
        strict_read_error=strict_error,
        summary=summarize_lock(data, path=name),
    )


def test_all_documented_locks_are_vendored() -> None:
    assert set(LOCK_NAMES) == set(DOCUMENTED_TOTALS)


def test_counts_match_conda_lock(real_lock: RealLock) -> None:
    packages = real_lock.conda_lock.package
    plain = Counter((dep.platform, dep.manager) for dep in packages)
    summary = real_lock.summary

    assert summary.total == len(packages) == DOCUMENTED_TOTALS[real_lock.name]
    assert summary.platforms == tuple(real_lock.conda_lock.metadata.platforms)
    assert [ps.platform for ps in summary.per_platform] == list(summary.platforms)
    for ps in summary.per_platform:
        expected = {m: n for (plat, m), n in plain.items() if plat == ps.platform}
        assert ps.counts == expected
        assert ps.total == sum(expected.values())
    assert sum(ps.total for ps in summary.per_platform) == len(packages)
    if real_lock.name in DOCUMENTED_COUNTS:
        assert summary.per_platform[0].counts == DOCUMENTED_COUNTS[real_lock.name]


def test_versions_and_cuda(real_lock: RealLock) -> None:
    expected = EXPECTED[real_lock.name]
    assert [ps.platform for ps in real_lock.summary.per_platform] == list(expected)
    for ps in real_lock.summary.per_platform:
        fields = ps.to_dict()
        for key, value in expected[ps.platform].items():
            assert fields[key] == value, (ps.platform, key)
        if ps.cuda_driver_required is None:
            assert ps.cuda_driver_source is None


def test_to_dict_is_json(real_lock: RealLock) -> None:
    as_dict = real_lock.summary.to_dict()
    again = json.loads(json.dumps(as_dict))
    assert again == as_dict
    assert again["total"] == real_lock.summary.total
    assert [p["platform"] for p in again["per_platform"]] == list(real_lock.summary.platforms)


def test_platform_filter(real_lock: RealLock) -> None:
    full = real_lock.summary
    for ps in full.per_platform:
        one = summarize_lock(real_lock.data, path=real_lock.name, platform=ps.platform)
        assert one.per_platform == (ps,)
        assert one.total == ps.total
        assert one.platforms == full.platforms


def test_unknown_platform_lists_available(real_lock: RealLock) -> None:
    with pytest.raises(UserError) as info:
        summarize_lock(real_lock.data, path=real_lock.name, platform="emscripten-wasm32")
    assert info.value.exit_code == EXIT_USER_ERROR
    assert "emscripten-wasm32" in info.value.message
    for platform in real_lock.summary.platforms:
        assert platform in info.value.message


def test_render_text(real_lock: RealLock) -> None:
    lines = render_summary_text(real_lock.summary)
    assert all(isinstance(line, str) and "\n" not in line for line in lines)
    text = "\n".join(lines)
    for ps in real_lock.summary.per_platform:
        assert f"{ps.platform}: {ps.total} packages" in text
        assert ps.pytorch is not None and ps.pytorch in text


def test_read_lockfile_checks_hashes_of_real_lock(real_lock: RealLock) -> None:
    # The tight-budget lock has an md5-only pytorch-mutex (pytorch-nightly), which v1 allows.
    assert real_lock.strict_read_error is None, real_lock.strict_read_error


def test_read_lockfile_rejects_malformed_sha256(tmp_path: Path) -> None:
    text = (REAL_LOCKS / PYRO_221).read_text(encoding="utf-8")
    head, sep, body = text.partition("\npackage:")
    body, n = re.subn(r"sha256: [0-9a-f]{64}", "sha256: xyz", body, count=1)
    assert n == 1
    broken = tmp_path / PYRO_221
    broken.write_text(head + sep + body, encoding="utf-8")

    with pytest.raises(LockfileError) as info:
        read_lockfile(broken)
    assert "sha256" in info.value.message and "'xyz'" in info.value.message


def test_read_lock_header_reads_content_hash(real_lock: RealLock,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    load = reader._load

    def spy(raw: bytes, name: str) -> dict[str, Any]:
        parsed.append(raw)
        return load(raw, name)

    monkeypatch.setattr(reader, "_load", spy)
    header = read_lock_header(real_lock.path)
    assert header["content_hash"] == real_lock.conda_lock.metadata.content_hash
    assert header["content_hash"] == real_lock.data.content_hash
    # The cheap path (about 1 ms against 0.2-2 s for a full parse): one YAML parse, of a
    # document whose package block, thousands of entries, was cut to an empty list.
    assert len(parsed) == 1
    assert b"package: []\n" in parsed[0] and b"- name:" not in parsed[0]
    assert len(parsed[0]) < real_lock.path.stat().st_size // 10


def test_read_lock_header_ignores_the_package_block(tmp_path: Path) -> None:
    text = (REAL_LOCKS / EOTLES_CPU).read_text(encoding="utf-8")
    head, sep, _body = text.partition("\npackage:")
    broken = tmp_path / EOTLES_CPU
    broken.write_text(head + sep + "\n- name: [unclosed\n  : : :\n", encoding="utf-8")

    header = read_lock_header(broken)
    assert header["platforms"] == ["linux-64", "linux-aarch64", "osx-64", "osx-arm64", "win-64"]
    assert header["content_hash"] == read_lock_header(REAL_LOCKS / EOTLES_CPU)["content_hash"]


# Shapes the real locks lack: conda-forge CUDA builds, PyPI torch, a bare __cuda dependency.
def _pkg(
    name: str, version: str, file: str, *, manager: str = "conda",
    deps: tuple[tuple[str, str], ...] = (),
) -> LockedPackage:
    host = "https://conda.anaconda.org/conda-forge/linux-64" if manager == "conda" else (
        "https://pypi.invalid/packages")
    return LockedPackage(
        name=name, version=version, manager=manager, platform="linux-64",
        url=f"{host}/{file}", sha256="0" * 64, dependencies=deps,
    )


@pytest.mark.parametrize(
    ("packages", "pytorch", "pytorch_cuda", "driver", "source"),
    [
        pytest.param(
            [_pkg("pytorch", "2.5.1", "pytorch-2.5.1-cuda126_py312h1763f6d_303.conda"),
             _pkg("cuda-version", "12.8", "cuda-version-12.8-h5d125a7_3.conda")],
            "2.5.1 (cuda126_py312h1763f6d_303)", "12.6", ">=12", "CUDA major of cuda-version 12.8",
            id="conda-forge-cuda126",
        ),
        pytest.param(
            [_pkg("pytorch", "2.1.2", "pytorch-2.1.2-cuda120_py311h25b6552_300.conda",
                  deps=(("__cuda", ">=12"),))],
            "2.1.2 (cuda120_py311h25b6552_300)", "12.0", ">=12",
            "__cuda >=12 dependency of pytorch",
            id="conda-forge-cuda120-dunder-cuda",
        ),
        pytest.param(
            [_pkg("torch", "2.1.0+cu121", "torch-2.1.0+cu121-cp311-linux_x86_64.whl",
                  manager="pip")],
            "2.1.0+cu121 (pip)", "12.1", ">=12", "CUDA major of the PyPI torch build 2.1.0+cu121",
            id="pip-torch-local-cuda-tag",
        ),
        pytest.param(
            [_pkg("torch", "2.3.1", "torch-2.3.1-cp311-manylinux1_x86_64.whl", manager="pip"),
             _pkg("nvidia-cuda-runtime-cu12", "12.1.105", "nvidia_cuda_runtime_cu12.whl",
                  manager="pip")],
            "2.3.1 (pip)", "12.1", ">=12", "CUDA major of the PyPI torch build 2.3.1",
            id="pip-torch-nvidia-wheels",
        ),
        pytest.param(
            [_pkg("torch", "2.3.1+cpu", "torch-2.3.1+cpu-cp311-linux_x86_64.whl", manager="pip"),
             _pkg("jaxlib", "0.4.23", "jaxlib-0.4.23-cuda118py311h63154d8_200.conda",
                  deps=(("__cuda", ""),))],
            "2.3.1+cpu (pip)", None, "*", "__cuda * dependency of jaxlib",
            id="pip-torch-cpu-bare-dunder-cuda",
        ),
    ],
)
def test_other_cuda_shapes(
    packages: list[LockedPackage],
    pytorch: str,
    pytorch_cuda: str | None,
    driver: str,
    source: str,
) -> None:
    data = LockData(
        platforms=("linux-64",), channels=("conda-forge",), content_hash={},
        packages=tuple(packages),
    )
    ps: PlatformSummary = summarize_lock(data).per_platform[0]
    assert (ps.pytorch, ps.pytorch_cuda) == (pytorch, pytorch_cuda)
    assert (ps.cuda_driver_required, ps.cuda_driver_source) == (driver, source)
