"""Model rules: ``environment-specs/models.yml`` maps model ids to env keys.

Many Hugging Face model ids share one environment. Each rule names a model id,
exactly or as a case-sensitive ``fnmatch`` glob (``*`` also matches ``/``), and
either an env key or PEP 440 requirements that the chosen env must provide::

    rules:
      - model: meta-llama/Llama-2-7b-hf
        env: torch-cu121-transformers-bnb
      - model: "meta-llama/*"
        requires: [bitsandbytes>=0.43, cuda==12.1]

This module only parses, validates and matches; choosing an env is resolution's job.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from provisioner.errors import InvalidKeyError, SpecError
from provisioner.keys import validate_env_key
from provisioner.lock.spec import load_yaml_mapping

RULES_FILE_NAME = "models.yml"
_RULE_FIELDS = ("model", "env", "requires")
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class ModelRule:
    """One entry of ``models.yml``; ``index`` is its position in the file."""

    pattern: str
    env: str | None
    requires: tuple[str, ...]
    is_glob: bool
    index: int

    def matches(self, model_id: str) -> bool:
        """Whether this rule applies to ``model_id``."""
        if self.is_glob:
            return fnmatch.fnmatchcase(model_id, self.pattern)
        return model_id == self.pattern

    def requirements(self) -> list[Requirement]:
        """``requires`` as parsed PEP 440 requirements."""
        return [Requirement(r) for r in self.requires]


@dataclass(frozen=True)
class ModelRules:
    """All rules of ``models.yml``, in file order."""

    rules: tuple[ModelRule, ...] = ()

    def candidates(self, model_id: str) -> list[ModelRule]:
        """Rules matching ``model_id``: exact ids before globs, then ``env`` before
        ``requires``, then file order."""
        matching = [r for r in self.rules if r.matches(model_id)]
        return sorted(matching, key=lambda r: (r.is_glob, r.env is None, r.index))


def _parse_rule(item: object, index: int, source: str) -> ModelRule:
    where = f"{source}: rules[{index}]"
    if not isinstance(item, dict):
        raise SpecError(f"{where} must be a mapping with 'model' and 'env' or 'requires'")
    unknown = sorted(str(k) for k in set(item) - set(_RULE_FIELDS))
    if unknown:
        raise SpecError(
            f"{where}: unknown field(s) {', '.join(unknown)}",
            hint=f"known fields: {', '.join(_RULE_FIELDS)}",
        )
    model = item.get("model")
    if not isinstance(model, str) or not model.strip():
        raise SpecError(f"{where}: 'model' must be a non-empty string")
    if any(ord(c) < 32 or ord(c) == 127 for c in model):
        raise SpecError(f"{where}: 'model' {model!a} contains control characters")
    if ("env" in item) == ("requires" in item):
        raise SpecError(
            f"{where} ({model!r}) needs exactly one of 'env' or 'requires'",
            hint="'env' names a key; 'requires' lists what the env must provide",
        )

    env: str | None = None
    requires: list[str] = []
    if "env" in item:
        try:
            env = validate_env_key(item["env"])
        except InvalidKeyError as exc:
            raise SpecError(f"{where}.env: {exc.message}", hint=exc.hint) from None
    else:
        raw = item["requires"]
        if not isinstance(raw, list) or not raw:
            raise SpecError(f"{where}.requires must be a non-empty list of requirements")
        for req in raw:
            if not isinstance(req, str) or not req.strip():
                raise SpecError(f"{where}.requires: {req!r} is not a requirement string")
            try:
                Requirement(req)
            except InvalidRequirement as exc:
                # packaging puts the offending text and a caret on further lines.
                reason = str(exc).splitlines()[0]
                raise SpecError(
                    f"{where}.requires: {req!r} is invalid: {reason}",
                    hint="use PEP 440 requirements such as 'torch>=2.1' or 'cuda==12.1'",
                ) from None
            requires.append(req.strip())

    return ModelRule(
        pattern=model,
        env=env,
        requires=tuple(requires),
        is_glob=any(c in _GLOB_CHARS for c in model),
        index=index,
    )


def parse_model_rules(text: str, *, source: str = RULES_FILE_NAME) -> ModelRules:
    """Parse and validate the text of ``models.yml``; ``source`` names it in errors."""
    data = load_yaml_mapping(text, source)
    unknown = sorted(str(k) for k in set(data) - {"rules"})
    if unknown:
        raise SpecError(f"{source}: unknown top-level field(s) {', '.join(unknown)}")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list):
        raise SpecError(f"{source}: 'rules' must be a list of rules")
    rules = [_parse_rule(item, i, source) for i, item in enumerate(raw_rules)]
    seen: dict[str, int] = {}
    for rule in (r for r in rules if not r.is_glob):
        if rule.pattern in seen:
            raise SpecError(
                f"{source}: model {rule.pattern!r} appears in rules[{seen[rule.pattern]}]"
                f" and rules[{rule.index}]",
                hint="keep one rule per exact model id",
            )
        seen[rule.pattern] = rule.index
    return ModelRules(tuple(rules))


def load_model_rules(specs_dir: Path) -> ModelRules:
    """Read ``models.yml`` from ``specs_dir``; a missing file means no rules."""
    path = specs_dir / RULES_FILE_NAME
    if not path.is_file():
        return ModelRules()
    from provisioner.lock.spec import read_text_file

    return parse_model_rules(read_text_file(path), source=path.name)
