"""Discovery of legacy per-model venvs: ``<root>/local_<id>/.venv``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from legacy_venvs import clone_venv, create_venv

from provisioner.models.legacy import (
    base_interpreter,
    discover_legacy,
    env_id_for_model,
    legacy_for_model,
    model_for_env_id,
)

needs_symlinks = pytest.mark.skipif(sys.platform == "win32", reason="symlinks")


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_venv(tmp_path_factory.mktemp("legacy-base") / "venv")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "environments"
    path.mkdir()
    return path


def _venv(base: Path, root: Path, env_id: str) -> Path:
    return clone_venv(base, root / f"local_{env_id}" / ".venv")


@pytest.mark.parametrize("model_id, env_id", [
    ("meta-llama/Llama-2-7b-hf", "meta-llama--Llama-2-7b-hf"),
    ("gpt2", "gpt2"),
    ("org/name--v2", "org--name--v2"),
])
def test_env_id_round_trip(model_id: str, env_id: str) -> None:
    assert env_id_for_model(model_id) == env_id
    assert model_for_env_id(env_id) == model_id
    assert model_for_env_id(env_id_for_model(model_id)) == model_id


def test_real_venv_is_found_with_posix_layout(base_venv: Path, root: Path) -> None:
    venv = _venv(base_venv, root, "meta-llama--Llama-2-7b-hf")
    (found,) = discover_legacy(root)
    assert found.model_id == "meta-llama/Llama-2-7b-hf"
    assert (found.env_id, found.mapped_by, found.layout) == (
        "meta-llama--Llama-2-7b-hf", "derived", "posix")
    assert found.root == root / "local_meta-llama--Llama-2-7b-hf"
    assert found.venv == venv and found.python == venv / "bin" / "python"
    assert json.loads(json.dumps(found.to_dict()))["python"] == str(venv / "bin" / "python")
    assert legacy_for_model(root, "meta-llama/Llama-2-7b-hf") == found


def test_model_json_wins_over_config_and_derivation(base_venv: Path, root: Path) -> None:
    _venv(base_venv, root, "llama7b")
    (root / "local_llama7b" / "model.json").write_text(
        json.dumps({"model_id": "meta-llama/Llama-2-7b-hf"}), encoding="utf-8")
    explicit = {"llama7b": "someone/else"}
    (found,) = discover_legacy(root, explicit)
    assert (found.model_id, found.mapped_by) == ("meta-llama/Llama-2-7b-hf", "model.json")
    assert legacy_for_model(root, "meta-llama/Llama-2-7b-hf", explicit) == found
    assert legacy_for_model(root, "someone/else", explicit) is None
    assert legacy_for_model(root, "llama7b", explicit) is None


def test_model_json_wins_over_the_directory_name(base_venv: Path, root: Path) -> None:
    _venv(base_venv, root, "org--name")
    (root / "local_org--name" / "model.json").write_text(
        json.dumps({"model_id": "org/other"}), encoding="utf-8")
    assert legacy_for_model(root, "org/name") is None
    env = legacy_for_model(root, "org/other")
    assert env is not None and env.env_id == "org--name" and env.mapped_by == "model.json"


def test_config_mapping_wins_over_derivation(base_venv: Path, root: Path) -> None:
    _venv(base_venv, root, "llama7b")
    explicit = {"llama7b": "meta-llama/Llama-2-7b-hf"}
    (found,) = discover_legacy(root, explicit)
    assert (found.model_id, found.mapped_by) == ("meta-llama/Llama-2-7b-hf", "config")
    assert legacy_for_model(root, "meta-llama/Llama-2-7b-hf", explicit) == found
    assert legacy_for_model(root, "meta-llama/Llama-2-7b-hf") is None
    (plain,) = discover_legacy(root)
    assert (plain.model_id, plain.mapped_by) == ("llama7b", "derived")


@pytest.mark.parametrize("content", ["{not json", "[]", '{"model_id": 7}'])
def test_bad_model_json_falls_back(base_venv: Path, root: Path, content: str) -> None:
    _venv(base_venv, root, "org--name")
    (root / "local_org--name" / "model.json").write_text(content, encoding="utf-8")
    (found,) = discover_legacy(root)
    assert (found.model_id, found.mapped_by) == ("org/name", "derived")


def test_non_venv_entries_are_ignored(base_venv: Path, root: Path) -> None:
    _venv(base_venv, root, "a")
    (root / "local_novenv").mkdir()
    (root / "local_file").write_text("x", encoding="utf-8")
    (root / "other" / ".venv").mkdir(parents=True)
    assert [e.model_id for e in discover_legacy(root)] == ["a"]
    assert discover_legacy(None) == [] and discover_legacy(root / "missing") == []
    assert legacy_for_model(None, "a") is None


def test_missing_interpreter_is_reported(base_venv: Path, root: Path) -> None:
    venv = _venv(base_venv, root, "org--name")
    (venv / "bin" / "python").unlink()
    (found,) = discover_legacy(root)
    assert found.python is None and found.layout == "posix"


@needs_symlinks
def test_dangling_interpreter_symlink_is_missing(base_venv: Path, root: Path,
                                                 tmp_path: Path) -> None:
    venv = _venv(base_venv, root, "org--name")
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(tmp_path / "gone" / "python3")
    (found,) = discover_legacy(root)
    assert found.python is None


@needs_symlinks
def test_symlinked_dir_outside_root_is_ignored(base_venv: Path, root: Path,
                                               tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "local_org--evil"
    clone_venv(base_venv, outside / ".venv")
    os.symlink(outside, root / "local_org--evil")
    assert discover_legacy(root) == []
    assert legacy_for_model(root, "org/evil") is None


@needs_symlinks
def test_venv_symlink_escaping_root_is_ignored(base_venv: Path, root: Path,
                                               tmp_path: Path) -> None:
    outside = clone_venv(base_venv, tmp_path / "outside" / "venv")
    (root / "local_org--evil").mkdir()
    os.symlink(outside, root / "local_org--evil" / ".venv")
    assert discover_legacy(root) == []
    assert legacy_for_model(root, "org/evil") is None


@needs_symlinks
def test_symlinked_bin_escaping_root_loses_its_interpreter(base_venv: Path, root: Path,
                                                           tmp_path: Path) -> None:
    venv = _venv(base_venv, root, "org--name")
    outside = clone_venv(base_venv, tmp_path / "outside" / "venv")
    import shutil

    shutil.rmtree(venv / "bin")
    os.symlink(outside / "bin", venv / "bin")
    (found,) = discover_legacy(root)
    assert found.python is None
    env = legacy_for_model(root, "org/name")
    assert env is not None and env.python is None


def test_sorted_by_model_id(base_venv: Path, root: Path) -> None:
    for env_id in ("zeta", "alpha--b", "mid"):
        _venv(base_venv, root, env_id)
    assert [e.model_id for e in discover_legacy(root)] == ["alpha/b", "mid", "zeta"]


def test_base_interpreter_is_the_python_named_by_home(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    venv.mkdir()
    assert base_interpreter(venv, "windows") is None  # no pyvenv.cfg
    (venv / "pyvenv.cfg").write_text("include-system-site-packages = false\n", encoding="utf-8")
    assert base_interpreter(venv, "posix") is None  # no home line
    base = tmp_path / "Python311"
    (venv / "pyvenv.cfg").write_text(
        f"Home  =  {base}  \r\nversion = 3.11.7\r\nexecutable = /elsewhere/python3.11\r\n",
        encoding="utf-8")
    # Missing bases are returned too: their absence is what the health signature records.
    assert base_interpreter(venv, "windows") == base / "python.exe"
    assert base_interpreter(venv, "posix") == base / "python3"
    base.mkdir()
    (base / "python").write_text("", encoding="utf-8")
    assert base_interpreter(venv, "posix") == base / "python"
