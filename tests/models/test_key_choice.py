"""Model id -> env key: exact beats glob, env beats requires, fewest extras wins."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from provisioner.config import Config
from provisioner.errors import ResolutionError
from provisioner.lock.spec import EnvSpec, parse_spec
from provisioner.models.key_choice import choose_key, key_for_model, unmet

BASE = ["torch>=2.2", "transformers>=4.36", "accelerate>=0.26"]
SPECS: dict[str, dict[str, object]] = {
    "cu121-bnb": {"provides": [*BASE, "bitsandbytes>=0.43", "cuda==12.1"],
                  "imports": ["torch", "transformers", "bitsandbytes"]},
    "cu121": {"provides": [*BASE, "cuda==12.1"], "imports": ["torch", "transformers"]},
    "cu118": {"provides": [*BASE, "cuda==11.8"], "imports": ["torch"]},
    "cpu": {"provides": ["torch>=2.2", "transformers>=4.36"], "imports": ["torch"]},
}


def _project(tmp_path: Path, rules: list[dict[str, object]],
             specs: dict[str, dict[str, object]] | None = None) -> Config:
    specs_dir = tmp_path / "project" / "environment-specs"
    specs_dir.mkdir(parents=True)
    for key, own in (SPECS if specs is None else specs).items():
        data = {"name": key, "channels": ["conda-forge"], "platforms": ["linux-64"],
                "dependencies": ["python"], "x-provisioner": own}
        (specs_dir / f"{key}.yml").write_text(yaml.safe_dump(data), encoding="utf-8")
    (specs_dir / "models.yml").write_text(yaml.safe_dump({"rules": rules}), encoding="utf-8")
    return Config(project=tmp_path / "project", home=tmp_path / "home")


def _specs(specs: dict[str, dict[str, object]] = SPECS) -> list[EnvSpec]:
    return [parse_spec(yaml.safe_dump({"name": k, "channels": ["c"], "platforms": ["linux-64"],
                                       "dependencies": ["python"], "x-provisioner": v}),
                       source=f"{k}.yml") for k, v in specs.items()]


def test_exact_id_beats_glob(tmp_path: Path) -> None:
    cfg = _project(tmp_path, [
        {"model": "meta-llama/*", "env": "cu121-bnb"},
        {"model": "meta-llama/Llama-2-7b-hf", "env": "cpu"},
    ])
    choice = key_for_model(cfg, "meta-llama/Llama-2-7b-hf")
    assert choice.key == "cpu"
    assert choice.rule == "meta-llama/Llama-2-7b-hf -> env cpu"
    assert choice.provides == ("torch>=2.2", "transformers>=4.36")
    assert choice.imports == ("torch",)
    assert key_for_model(cfg, "meta-llama/Llama-2-13b-hf").key == "cu121-bnb"


def test_exact_requires_beats_glob_env(tmp_path: Path) -> None:
    cfg = _project(tmp_path, [
        {"model": "org/*", "env": "cpu"},
        {"model": "org/big", "requires": ["cuda==11.8"]},
    ])
    assert key_for_model(cfg, "org/big").key == "cu118"
    assert key_for_model(cfg, "org/small").key == "cpu"


def test_env_beats_requires(tmp_path: Path) -> None:
    cfg = _project(tmp_path, [
        {"model": "org/*", "requires": ["cuda==12.1"]},
        {"model": "org/*", "env": "cu118"},
    ])
    choice = key_for_model(cfg, "org/model")
    assert (choice.key, choice.rule) == ("cu118", "org/* -> env cu118")


def test_requires_prefers_fewest_extras(tmp_path: Path) -> None:
    cfg = _project(tmp_path, [
        {"model": "meta-llama/*", "requires": ["bitsandbytes>=0.43", "cuda==12.1"]},
        {"model": "mistralai/*", "requires": ["transformers>=4.36", "cuda==12.1"]},
        {"model": "gpt2", "requires": ["transformers>=4.30"]},
    ])
    llama = key_for_model(cfg, "meta-llama/Llama-2-7b-hf")
    assert llama.key == "cu121-bnb"
    assert llama.rule == "meta-llama/* requires bitsandbytes>=0.43, cuda==12.1"
    assert "bitsandbytes" in llama.imports
    assert key_for_model(cfg, "mistralai/Mistral-7B-v0.1").key == "cu121"
    assert key_for_model(cfg, "gpt2").key == "cpu"


def test_requires_checks_the_guaranteed_version(tmp_path: Path) -> None:
    cfg = _project(tmp_path, [{"model": "new/*", "requires": ["torch>=2.3"]},
                              {"model": "old/*", "requires": ["torch<2.2"]}])
    for model in ("new/x", "old/x"):
        with pytest.raises(ResolutionError):
            key_for_model(cfg, model)


def test_unknown_env_falls_through_to_the_next_rule(tmp_path: Path) -> None:
    cfg = _project(tmp_path, [{"model": "org/m", "env": "gone"},
                              {"model": "org/*", "env": "cpu"}])
    assert key_for_model(cfg, "org/m").key == "cpu"


def test_no_fitting_env_lists_closest_keys(tmp_path: Path) -> None:
    cfg = _project(tmp_path, [{"model": "big/*", "requires": ["bitsandbytes>=0.43",
                                                             "cuda==12.4"]}])
    with pytest.raises(ResolutionError) as info:
        key_for_model(cfg, "big/model")
    text = str(info.value)
    assert "\n" not in text
    assert text == ("no env serves model 'big/model': rule big/* requires "
                    "bitsandbytes>=0.43, cuda==12.4: cu121-bnb lacks cuda==12.4; "
                    "cpu lacks bitsandbytes>=0.43, cuda==12.4; "
                    "cu118 lacks bitsandbytes>=0.43, cuda==12.4")
    assert info.value.hint


def test_no_rule_lists_known_keys(tmp_path: Path) -> None:
    cfg = _project(tmp_path, [{"model": "gpt2", "env": "cpu"}])
    with pytest.raises(ResolutionError) as info:
        key_for_model(cfg, "unknown/model")
    assert "no rule in models.yml matches model 'unknown/model'" in str(info.value)
    assert "cu121-bnb" in (info.value.hint or "")


@pytest.mark.parametrize("bad", ["", "a\nb", "a\0b"])
def test_invalid_model_id(tmp_path: Path, bad: str) -> None:
    cfg = _project(tmp_path, [{"model": "*", "env": "cpu"}])
    with pytest.raises(ResolutionError, match="invalid model id"):
        key_for_model(cfg, bad)


def test_unmet_and_choose_key() -> None:
    assert unmet(["torch>=2.1", "cuda==12.1"], ["torch>=2.2", "cuda==12.1"]) == []
    assert unmet(["torch>=2.3"], ["torch>=2.2"]) == ["torch>=2.3"]
    assert unmet(["BitsAndBytes>=0.43"], ["bitsandbytes==0.43.1"]) == []
    assert unmet(["torch"], ["torch"]) == []
    assert unmet(["torch>=2"], ["torch"]) == ["torch>=2"]
    assert unmet(["torch==2.*"], ["torch>=2.2"]) == []
    specs = _specs()
    assert choose_key(["cuda==12.1"], specs) == ("cu121", "")
    key, why = choose_key(["cuda==12.4"], specs)
    assert key is None and why.count(" lacks cuda==12.4") == 3
    assert choose_key(["x"], []) == (None, "no env specs exist")
