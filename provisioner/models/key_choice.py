"""Model id -> env key, by the rules in ``environment-specs/models.yml``.

An exact id wins over a glob, and an explicit ``env:`` over ``requires:``.
``requires:`` picks the env whose ``provides`` satisfies every requirement,
preferring the one with the fewest extras. A ``provides`` entry names the
version the env guarantees (``torch>=2.1`` guarantees 2.1), so a requirement is
met when that version satisfies it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from provisioner.config import Config
from provisioner.errors import ResolutionError
from provisioner.lock.spec import EnvSpec, list_spec_keys, load_spec
from provisioner.models.rules import load_model_rules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyChoice:
    """The key a model maps to, and the rule that decided it."""

    key: str
    rule: str
    provides: tuple[str, ...]
    imports: tuple[str, ...]


def _guaranteed(spec_text: str) -> tuple[str, Version | None]:
    req = Requirement(spec_text)
    for clause in req.specifier:
        if clause.operator in ("==", ">=", "===", "~="):
            try:
                return canonicalize_name(req.name), Version(clause.version.rstrip(".*"))
            except InvalidVersion:
                continue
    return canonicalize_name(req.name), None


def unmet(requirements: Sequence[str], provides: Sequence[str]) -> list[str]:
    """The requirements that ``provides`` does not meet."""
    have = dict(_guaranteed(p) for p in provides)
    missing = []
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name not in have:
            missing.append(text)
            continue
        version = have[name]
        if version is None:
            if str(req.specifier):
                missing.append(text)
        elif not req.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def choose_key(requirements: Sequence[str], specs: Sequence[EnvSpec]) -> tuple[str | None, str]:
    """The best key for ``requirements``, or ``None`` and why none fits."""
    fitting = [s for s in specs if not unmet(requirements, s.provides)]
    if fitting:
        best = min(fitting, key=lambda s: (len(s.provides) - len(requirements), s.key))
        return best.key, ""
    closest = sorted(specs, key=lambda s: (len(unmet(requirements, s.provides)), s.key))[:3]
    why = "; ".join(f"{s.key} lacks {', '.join(unmet(requirements, s.provides))}"
                    for s in closest)
    return None, why or "no env specs exist"


def key_for_model(config: Config, model_id: str) -> KeyChoice:
    """Resolve ``model_id`` to an env key."""
    if not model_id or any(c in model_id for c in "\0\n\r"):
        raise ResolutionError(f"invalid model id {model_id!r}")
    rules = load_model_rules(config.specs_dir)
    specs = [load_spec(config.specs_dir, k) for k in list_spec_keys(config.specs_dir)]
    by_key = {s.key: s for s in specs}
    candidates = rules.candidates(model_id)
    if not candidates:
        raise ResolutionError(
            f"no rule in models.yml matches model '{model_id}'",
            hint=f"add a rule for it; known keys: {', '.join(sorted(by_key)) or 'none'}",
        )
    reasons = []
    for rule in candidates:
        if rule.env is not None:
            if rule.env in by_key:
                spec = by_key[rule.env]
                return KeyChoice(spec.key, f"{rule.pattern} -> env {spec.key}",
                                 spec.provides, spec.imports)
            reasons.append(f"rule {rule.pattern} names unknown key {rule.env}")
            log.debug("%s: rule %s names unknown key %s; next rule", model_id, rule.pattern,
                      rule.env)
            continue
        key, why = choose_key(rule.requires, specs)
        log.debug("%s: rule %s requires %s -> %s", model_id, rule.pattern,
                  ", ".join(rule.requires), key or f"no key ({why})")
        if key is not None:
            spec = by_key[key]
            return KeyChoice(key, f"{rule.pattern} requires {', '.join(rule.requires)}",
                             spec.provides, spec.imports)
        reasons.append(f"rule {rule.pattern} requires {', '.join(rule.requires)}: {why}")
    raise ResolutionError(
        f"no env serves model '{model_id}': {' | '.join(reasons)}",
        hint="add an env spec that provides what the rule requires, or change the rule",
    )
