"""models.yml: parsing, validation and which rules match a model id."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.errors import SpecError, UserError
from provisioner.models.rules import ModelRule, ModelRules, load_model_rules, parse_model_rules

EXAMPLE = """\
rules:
  - model: meta-llama/Llama-2-7b-hf
    env: torch-cu121-transformers-bnb
  - model: "meta-llama/*"
    requires: [bitsandbytes>=0.43, cuda==12.1]
  - model: "*"
    requires: [torch>=2.1]
  - model: "meta-llama/*"
    env: torch-cu121-llama
  - model: mistralai/Mistral-7B-v0.1
    requires: ["transformers>=4.34"]
"""


def _error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_model_rules(text)
    assert "\n" not in str(info.value)
    return info.value


def test_parse_example() -> None:
    rules = parse_model_rules(EXAMPLE).rules
    assert [r.index for r in rules] == [0, 1, 2, 3, 4]
    assert rules[0] == ModelRule(
        pattern="meta-llama/Llama-2-7b-hf",
        env="torch-cu121-transformers-bnb",
        requires=(),
        is_glob=False,
        index=0,
    )
    assert rules[1].env is None
    assert rules[1].requires == ("bitsandbytes>=0.43", "cuda==12.1")
    assert rules[1].is_glob and rules[2].is_glob and not rules[4].is_glob
    assert [str(r) for r in rules[1].requirements()] == ["bitsandbytes>=0.43", "cuda==12.1"]


def test_candidates_order_exact_then_glob_env_then_requires() -> None:
    rules = parse_model_rules(EXAMPLE)
    got = rules.candidates("meta-llama/Llama-2-7b-hf")
    assert [r.index for r in got] == [0, 3, 1, 2]


def test_exact_requires_beats_glob_env() -> None:
    rules = parse_model_rules(EXAMPLE)
    assert [r.index for r in rules.candidates("mistralai/Mistral-7B-v0.1")] == [4, 2]


def test_file_order_breaks_ties() -> None:
    text = """\
rules:
  - {model: "org/*", requires: [torch>=2]}
  - {model: "*", requires: [torch>=1]}
  - {model: "org/m*", env: b}
  - {model: "*/model", env: a}
"""
    assert [r.index for r in parse_model_rules(text).candidates("org/model")] == [2, 3, 0, 1]


def test_no_candidates() -> None:
    rules = parse_model_rules("rules:\n  - {model: 'org/*', env: k}\n")
    assert rules.candidates("other/model") == []
    assert ModelRules().candidates("org/x") == []


@pytest.mark.parametrize(
    ("pattern", "model_id", "expected"),
    [
        ("*", "meta-llama/Llama-2-7b-hf", True),
        ("meta-llama/*", "meta-llama/Llama-2-7b-hf", True),
        ("meta-llama/*", "meta-llama/sub/deeper", True),
        ("*/Llama-2-*", "meta-llama/Llama-2-7b-hf", True),
        ("*-7b-hf", "meta-llama/Llama-2-7b-hf", True),
        ("meta-llama/*", "Meta-Llama/Llama-2-7b-hf", False),
        ("meta-llama/*", "other/meta-llama", False),
        ("org/model-?", "org/model-1", True),
        ("org/model-?", "org/model-12", False),
        ("org/model-[ab]", "org/model-b", True),
        ("org/model-[ab]", "org/model-c", False),
    ],
)
def test_glob_matching(pattern: str, model_id: str, expected: bool) -> None:
    rule = parse_model_rules(f"rules:\n  - model: {pattern!r}\n    env: k\n").rules[0]
    assert rule.is_glob
    assert rule.matches(model_id) is expected


def test_exact_matching_is_case_sensitive_and_whole() -> None:
    rule = parse_model_rules("rules:\n  - {model: org/Model, env: k}\n").rules[0]
    assert not rule.is_glob
    assert rule.matches("org/Model")
    assert not rule.matches("org/model")
    assert not rule.matches("org/Model-2")


def test_empty_rules_list() -> None:
    assert parse_model_rules("rules: []\n") == ModelRules(())


def test_same_glob_twice_is_allowed() -> None:
    text = "rules:\n  - {model: 'a/*', env: x}\n  - {model: 'a/*', env: y}\n"
    assert [r.env for r in parse_model_rules(text).candidates("a/b")] == ["x", "y"]


def test_load_missing_file_gives_empty_rules(tmp_path: Path) -> None:
    assert load_model_rules(tmp_path) == ModelRules()
    assert load_model_rules(tmp_path / "does-not-exist") == ModelRules()


def test_load_from_file(tmp_path: Path) -> None:
    (tmp_path / "models.yml").write_text(EXAMPLE, encoding="utf-8")
    assert load_model_rules(tmp_path) == parse_model_rules(EXAMPLE)


def test_load_names_file_in_errors(tmp_path: Path) -> None:
    (tmp_path / "models.yml").write_text("rules: {}\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"^models\.yml: 'rules' must be a list"):
        load_model_rules(tmp_path)


def test_source_names_errors() -> None:
    with pytest.raises(SpecError, match=r"^custom\.yml: "):
        parse_model_rules("rules: 3\n", source="custom.yml")


def test_missing_model() -> None:
    assert "rules[1]: 'model' must be a non-empty string" in str(
        _error("rules:\n  - {model: a/b, env: k}\n  - {env: k}\n")
    )


@pytest.mark.parametrize("value", ['""', '"  "', "3", "[a]", "null"])
def test_model_not_a_non_empty_string(value: str) -> None:
    assert "'model' must be a non-empty string" in str(
        _error(f"rules:\n  - model: {value}\n    env: k\n")
    )


@pytest.mark.parametrize("value", ['"a\\nb"', '"a\\0b"', '"a\\rb"'])
def test_model_with_control_characters(value: str) -> None:
    assert "control characters" in str(_error(f"rules:\n  - model: {value}\n    env: k\n"))


def test_both_env_and_requires() -> None:
    err = _error("rules:\n  - {model: a/b, env: k, requires: [torch]}\n")
    assert "exactly one of 'env' or 'requires'" in str(err)
    assert err.hint


def test_neither_env_nor_requires() -> None:
    assert "exactly one of" in str(_error("rules:\n  - {model: a/b}\n"))


@pytest.mark.parametrize("key", ["../x", "a/b", "CON", "Upper", "''", "null", "3"])
def test_bad_env_key(key: str) -> None:
    err = _error(f"rules:\n  - {{model: a/c, env: k}}\n  - {{model: a/b, env: {key}}}\n")
    assert str(err).startswith("models.yml: rules[1].env: env key")
    assert isinstance(err, UserError)


def test_bad_env_key_keeps_hint() -> None:
    assert _error("rules:\n  - {model: a/b, env: ../x}\n").hint


@pytest.mark.parametrize("req", ["'torch >= '", "'>=2.1'", "'foo bar'", "'a['"])
def test_bad_requirement(req: str) -> None:
    err = _error(f"rules:\n  - model: a/b\n    requires: [torch, {req}]\n")
    assert str(err).startswith("models.yml: rules[0].requires: ")
    assert "is invalid" in str(err)
    assert err.hint


@pytest.mark.parametrize("value", ["[]", "torch>=2", "{torch: 2}", "null"])
def test_requires_not_a_non_empty_list(value: str) -> None:
    err = _error(f"rules:\n  - model: a/b\n    requires: {value}\n")
    assert "requires must be a non-empty list" in str(err)


@pytest.mark.parametrize("item", ["3", "''", "[torch]"])
def test_requirement_not_a_string(item: str) -> None:
    assert "is not a requirement string" in str(
        _error(f"rules:\n  - model: a/b\n    requires: [{item}]\n")
    )


def test_unknown_rule_field() -> None:
    err = _error("rules:\n  - {model: a/b, env: k, priority: 3}\n")
    assert "rules[0]: unknown field(s) priority" in str(err)
    assert err.hint is not None and "requires" in err.hint


def test_unknown_top_level_field() -> None:
    assert "unknown top-level field(s) models" in str(_error("rules: []\nmodels: []\n"))


def test_duplicate_exact_model_id() -> None:
    text = """\
rules:
  - {model: org/m, env: a}
  - {model: "org/*", env: b}
  - {model: org/m, requires: [torch]}
"""
    err = _error(text)
    assert "'org/m' appears in rules[0] and rules[2]" in str(err)


def test_malformed_yaml() -> None:
    err = _error("rules:\n  - model: [a\n    env: k\n")
    assert str(err).startswith("models.yml: malformed YAML at line")


@pytest.mark.parametrize("text", ["rules: a/b\n", "rules: {model: a/b}\n", "{}\n", "rules:\n"])
def test_rules_not_a_list(text: str) -> None:
    assert "'rules' must be a list" in str(_error(text))


@pytest.mark.parametrize("text", ["", "- model: a/b\n  env: k\n", "just text\n"])
def test_top_level_not_a_mapping(text: str) -> None:
    assert "expected a mapping at the top level" in str(_error(text))


@pytest.mark.parametrize("item", ["a/b", "[a/b, k]", "null"])
def test_rule_not_a_mapping(item: str) -> None:
    assert "rules[0] must be a mapping" in str(_error(f"rules:\n  - {item}\n"))
