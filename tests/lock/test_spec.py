"""Environment specs: parsing, validation and compatibility with conda-lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from provisioner.errors import InvalidKeyError, SpecError
from provisioner.lock.spec import (
    EnvSpec,
    list_spec_keys,
    load_spec,
    parse_spec,
    spec_path,
)

KEY = "torch-cu121-transformers-bnb"

CONDA_PART = f"""\
name: {KEY}
channels:
  - pytorch
  - nvidia
  - conda-forge
platforms:
  - linux-64
  - win-64
dependencies:
  - python=3.11
  - pytorch=2.2.*
  - pytorch-cuda=12.1
  - numpy >=1.26,<2
"""

PIP_PART = """\
  - pip:
      - transformers==4.40.0
      - bitsandbytes>=0.43 ; sys_platform == "linux"
"""

OWN_PART = """\
x-provisioner:
  cuda: "12.1"
  provides: [torch>=2.2, cuda==12.1, bitsandbytes>=0.43]
  imports: [torch, transformers]
  virtual-packages:
    linux-64: {__glibc: "2.17"}
"""

FULL = CONDA_PART + PIP_PART + OWN_PART


def _write(specs_dir: Path, key: str, text: str) -> Path:
    specs_dir.mkdir(parents=True, exist_ok=True)
    path = specs_dir / f"{key}.yml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(text: str, **kwargs: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="spec.yml", **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def test_parse_full_spec(tmp_path: Path) -> None:
    path = _write(tmp_path, KEY, FULL)
    spec = load_spec(tmp_path, KEY)
    assert spec == EnvSpec(
        key=KEY,
        channels=("pytorch", "nvidia", "conda-forge"),
        dependencies=("python=3.11", "pytorch=2.2.*", "pytorch-cuda=12.1", "numpy >=1.26,<2"),
        pip=("transformers==4.40.0", 'bitsandbytes>=0.43 ; sys_platform == "linux"'),
        platforms=("linux-64", "win-64"),
        cuda="12.1",
        provides=("torch>=2.2", "cuda==12.1", "bitsandbytes>=0.43"),
        imports=("torch", "transformers"),
        virtual_package_overrides={"linux-64": {"__glibc": "2.17"}},
        path=path,
    )
    assert spec.provided_requirements() == [
        Requirement("torch>=2.2"),
        Requirement("cuda==12.1"),
        Requirement("bitsandbytes>=0.43"),
    ]


def test_minimal_spec_defaults() -> None:
    spec = parse_spec(CONDA_PART, source="x.yml")
    assert spec.pip == ()
    assert spec.cuda is None
    assert spec.provides == () and spec.imports == ()
    assert spec.virtual_package_overrides == {}
    assert spec.path is None


def test_unquoted_cuda_is_rejected_because_yaml_loses_digits() -> None:
    with pytest.raises(SpecError, match="quoted string") as info:
        parse_spec(CONDA_PART + "x-provisioner:\n  cuda: 12.10\n", source="x.yml")
    assert info.value.hint is not None and "12.10" in info.value.hint


def test_hash_inputs_ignore_order_of_dependencies() -> None:
    reordered = CONDA_PART.replace(
        "  - python=3.11\n  - pytorch=2.2.*\n", "  - pytorch=2.2.*\n  - python=3.11\n"
    )
    a = parse_spec(CONDA_PART, source="a.yml").hash_inputs("linux-64")
    b = parse_spec(reordered, source="b.yml").hash_inputs("linux-64")
    assert a == b
    assert a["platform"] == "linux-64"


def test_malformed_yaml() -> None:
    err = _error("name: x\nchannels: [a\nplatforms: [linux-64]\n")
    assert str(err).startswith("spec.yml: malformed YAML at line")


def test_not_a_mapping() -> None:
    assert "expected a mapping" in str(_error("- a\n- b\n"))


def test_name_mismatch(tmp_path: Path) -> None:
    _write(tmp_path, "other-key", FULL)
    with pytest.raises(SpecError, match="does not match the file name 'other-key'") as info:
        load_spec(tmp_path, "other-key")
    assert "\n" not in str(info.value)


def test_invalid_name() -> None:
    with pytest.raises(InvalidKeyError):
        parse_spec(FULL.replace(f"name: {KEY}", "name: ../evil"), source="x.yml")


def test_unknown_top_level_field() -> None:
    err = _error(FULL + "cuda: '12.1'\n")
    assert "unknown top-level field(s) cuda" in str(err)
    assert err.hint is not None and "x-provisioner" in err.hint


def test_unknown_x_provisioner_field() -> None:
    assert "unknown x-provisioner field(s) gpu" in str(_error(FULL + "  gpu: a100\n"))


def test_unknown_platform_hints_supported_ones() -> None:
    err = _error(CONDA_PART.replace("  - win-64\n", "  - linux-65\n"))
    assert "unknown platform 'linux-65'" in str(err)
    assert err.hint is not None
    for plat in ("linux-64", "linux-aarch64", "osx-64", "osx-arm64", "win-64"):
        assert plat in err.hint


def test_unknown_platform_in_virtual_packages() -> None:
    text = CONDA_PART + "x-provisioner:\n  virtual-packages:\n    linux-65: {__glibc: '2.17'}\n"
    assert "linux-65" in str(_error(text))


@pytest.mark.parametrize("cuda", ["'twelve'", "'12.x'", "''", "'12..1'", "'12.1 '"])
def test_bad_cuda(cuda: str) -> None:
    err = _error(CONDA_PART + f"x-provisioner:\n  cuda: {cuda}\n")
    assert "is not a version like '12.1'" in str(err)


@pytest.mark.parametrize("req", ["torch >= ", ">=2", "foo bar", "a["])
def test_invalid_pip_requirement(req: str) -> None:
    err = _error(CONDA_PART + f"  - pip:\n      - '{req}'\n")
    assert "pip requirement" in str(err) and "is invalid" in str(err)


@pytest.mark.parametrize("req", ["torch >= ", "==12.1", "cuda 12.1"])
def test_invalid_provides(req: str) -> None:
    err = _error(CONDA_PART + f"x-provisioner:\n  provides: ['{req}']\n")
    assert "provides entry" in str(err) and "is invalid" in str(err)


def test_provides_not_a_list() -> None:
    assert "must be a list" in str(_error(CONDA_PART + "x-provisioner:\n  provides: torch\n"))


def _without(text: str, field: str) -> str:
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{field}:"))
    end = start + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    return "".join(lines[:start] + lines[end:])


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("channels", "'channels' must be a list"),
        ("platforms", "'platforms' must be a list"),
        ("dependencies", "'dependencies' must be a non-empty list"),
    ],
)
def test_missing_required_field(field: str, message: str) -> None:
    assert message in str(_error(_without(FULL, field)))


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("channels", "at least one channel"),
        ("platforms", "at least one platform"),
        ("dependencies", "'dependencies' must be a non-empty list"),
    ],
)
def test_empty_required_field(field: str, message: str) -> None:
    assert message in str(_error(_without(FULL, field) + f"{field}: []\n"))


def test_bad_dependency_item() -> None:
    err = _error(CONDA_PART + "  - {conda: numpy}\n")
    assert "neither a string nor a 'pip:' list" in str(err)


def test_load_missing_key_lists_known_keys(tmp_path: Path) -> None:
    _write(tmp_path, "b-key", FULL.replace(KEY, "b-key"))
    _write(tmp_path, "a-key", FULL.replace(KEY, "a-key"))
    (tmp_path / "models.yml").write_text("rules: []\n", encoding="utf-8")
    with pytest.raises(SpecError, match="no spec for env key 'missing'") as info:
        load_spec(tmp_path, "missing")
    assert info.value.hint == "known keys: a-key, b-key"


def test_load_missing_key_without_any_specs(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path, "missing")
    assert info.value.hint == "add a spec file first"


def test_load_spec_validates_key_first(tmp_path: Path) -> None:
    with pytest.raises(InvalidKeyError):
        load_spec(tmp_path, "../x")
    with pytest.raises(InvalidKeyError):
        spec_path(tmp_path, "a/b")


def test_list_spec_keys_ignores_models_yml(tmp_path: Path) -> None:
    assert list_spec_keys(tmp_path / "nowhere") == []
    _write(tmp_path, "zeta", FULL.replace(KEY, "zeta"))
    _write(tmp_path, "alpha", FULL.replace(KEY, "alpha"))
    (tmp_path / "models.yml").write_text("rules: []\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a spec\n", encoding="utf-8")
    assert list_spec_keys(tmp_path) == ["alpha", "zeta"]


# conda-lock must be able to lock our spec files as they are.


def test_conda_lock_parses_spec_without_pip(tmp_path: Path) -> None:
    from conda_lock.src_parser.environment_yaml import parse_environment_file

    path = _write(tmp_path, KEY, CONDA_PART + OWN_PART)
    ours = load_spec(tmp_path, KEY)
    # Without pip dependencies the mapping is never read, so a dummy path suffices.
    theirs = parse_environment_file(path, list(ours.platforms), str(tmp_path / "unused.json"))
    assert [c.url for c in theirs.channels] == list(ours.channels)
    for platform in ours.platforms:
        deps = theirs.dependencies[platform]
        assert {d.name for d in deps} == {"python", "pytorch", "pytorch-cuda", "numpy"}
        assert all(d.manager == "conda" for d in deps)


def test_conda_lock_parses_spec_with_pip_and_local_mapping(tmp_path: Path) -> None:
    from conda_lock.src_parser.environment_yaml import parse_environment_file

    path = _write(tmp_path, KEY, FULL)
    mapping = tmp_path / "pypi-mapping.json"
    mapping.write_text(
        json.dumps(
            {
                name: {"conda_name": name, "conda_forge": name, "pypi_name": name}
                for name in ("transformers", "bitsandbytes", "pip")
            }
        ),
        encoding="utf-8",
    )
    ours = load_spec(tmp_path, KEY)
    theirs = parse_environment_file(path, list(ours.platforms), str(mapping))
    linux = {(d.name, d.manager) for d in theirs.dependencies["linux-64"]}
    windows = {(d.name, d.manager) for d in theirs.dependencies["win-64"]}
    assert ("transformers", "pip") in linux and ("bitsandbytes", "pip") in linux
    assert ("pip", "conda") in linux
    # The marker keeps bitsandbytes off Windows, as our spec intends.
    assert ("transformers", "pip") in windows and ("bitsandbytes", "pip") not in windows


# --- the same reading as conda-lock's own parser ----------------------------------------------

EDGE_SPEC = """\
name: edge
channels:
  - https://conda.anaconda.org/pytorch
  - conda-forge
  - nodefaults
platforms: [linux-64, win-64, osx-arm64]
dependencies:
  - python >=3.10,<3.12
  - pytorch::pytorch=2.1
  - numpy=1.26=py311*
  - cuda-cudart  # [linux]
  - vs2015_runtime  # [win]
  - libcxx  # [osx]
  - pip
  - pip:
      - bitsandbytes>=0.43,<0.44  # [linux64]
      - Requests[socks]==2.31.*
x-provisioner:
  cuda: "12.1"
"""


def _conda_lock_view(path: Path, platforms: tuple[str, ...]) -> dict[str, object]:
    """channels and, per platform, normalised conda and pip dependencies, by conda-lock."""
    import rattler
    from conda_lock.src_parser.environment_yaml import parse_environment_file
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    mapping = path.parent / "mapping.json"
    mapping.write_text("{}", encoding="utf-8")
    spec = parse_environment_file(path, list(platforms), mapping_url=str(mapping))
    view: dict[str, object] = {"channels": [c.url for c in spec.channels]}
    for platform, deps in spec.dependencies.items():
        conda = sorted({  # conda-lock may list pip twice (yours, and the one it adds)
            str(rattler.MatchSpec(" ".join(x for x in (
                f"{d.conda_channel}::{d.name}" if d.conda_channel else d.name,
                "" if d.version in ("", "*") else d.version, d.build or "") if x)))
            for d in deps if d.manager == "conda"})
        pip = sorted((canonicalize_name(d.name), str(SpecifierSet(d.version or "")))
                     for d in deps if d.manager == "pip")
        view[platform] = (conda, pip)
    return view


def _our_view(spec: EnvSpec) -> dict[str, object]:
    import rattler
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    view: dict[str, object] = {"channels": list(spec.channels)}
    for platform in spec.platforms:
        conda = sorted(str(rattler.MatchSpec(d)) for d in spec.dependencies_for(platform))
        if spec.pip_for(platform) and not any(d.split()[0] == "pip" for d in
                                               spec.dependencies_for(platform)):
            conda = sorted([*conda, str(rattler.MatchSpec("pip"))])  # conda-lock adds pip
        pip = sorted((canonicalize_name(r.name), str(r.specifier))
                     for r in map(Requirement, spec.pip_for(platform)))
        view[platform] = (conda, pip)
    return view


@pytest.mark.parametrize("source", ["torch-cu121-transformers", "torch-cu121-transformers-bnb",
                                    "edge"])
def test_specs_read_as_conda_lock_reads_them(source: str, tmp_path: Path) -> None:
    repo_specs = Path(__file__).resolve().parents[2] / "environment-specs"
    text = EDGE_SPEC if source == "edge" else (repo_specs / f"{source}.yml").read_text()
    path = tmp_path / f"{source}.yml"
    path.write_text(text, encoding="utf-8")
    ours = parse_spec(text, source=path)
    assert _our_view(ours) == _conda_lock_view(path, ours.platforms)
    if source == "edge":
        assert ours.channels == ("https://conda.anaconda.org/pytorch", "conda-forge")
        assert "cuda-cudart" in ours.dependencies_for("linux-64")
        assert "cuda-cudart" not in ours.dependencies_for("win-64")
        assert "vs2015_runtime" in ours.dependencies_for("win-64")
        assert "libcxx" in ours.dependencies_for("osx-arm64")
        assert ours.pip_for("linux-64") == ("bitsandbytes>=0.43,<0.44", "Requests[socks]==2.31.*")
        assert ours.pip_for("win-64") == ("Requests[socks]==2.31.*",)


def test_selectors_change_the_platforms_content_hash_only(tmp_path: Path) -> None:
    from provisioner.lock.check import content_hash

    plain = parse_spec(EDGE_SPEC.replace("  - vs2015_runtime  # [win]\n", ""), source="e.yml")
    edge = parse_spec(EDGE_SPEC, source="e.yml")
    assert content_hash(plain, "linux-64") == content_hash(edge, "linux-64")
    assert content_hash(plain, "win-64") != content_hash(edge, "win-64")
