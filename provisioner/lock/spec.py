"""Environment specs: ``environment-specs/<key>.yml``.

A spec is a conda ``environment.yml`` (``name``, ``channels``, ``dependencies``
with an optional ``pip:`` list, ``platforms``) plus provisioner's own fields in
one ``x-provisioner:`` section::

    x-provisioner:
      cuda: "12.1"                 # __cuda virtual package used when locking
      provides: [torch>=2.2, cuda==12.1]
      imports: [torch, transformers]
      virtual-packages:            # optional per-platform overrides
        linux-64: {__glibc: "2.17"}

The environment.yml part is read with conda-lock's semantics (a test runs
conda-lock's own parser on the same files): ``nodefaults`` is not a channel,
a ``# [linux]`` / ``# [win]`` / ``# [osx]``... selector keeps a line on the
matching platforms only, ``pip:`` lists may sit under selectors too, channels
may be URLs and a dependency may name its channel (``pytorch::pytorch``).
conda-lock itself is not imported here: ``ensure`` reads specs too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import InvalidRequirement, Requirement

from provisioner.errors import SpecError
from provisioner.keys import validate_env_key
from provisioner.lock.platforms import validate_platform

SPEC_SUFFIX = ".yml"
_TOP_LEVEL = {"name", "channels", "dependencies", "platforms", "x-provisioner", "variables"}
_OWN_FIELDS = {"cuda", "provides", "imports", "virtual-packages"}
#: conda-lock's platform selectors (conda_lock/src_parser/selectors.py, adapted from conda-build)
_SELECTORS = {
    "linux-64": {"linux64", "unix", "linux"},
    "linux-aarch64": {"aarch64", "unix", "linux"},
    "osx-64": {"osx64", "osx", "unix"},
    "osx-arm64": {"arm64", "osx", "unix"},
    "win-64": {"win", "win64"},
}
_SELECTOR_RE = re.compile(r"(.+?)\s*(#.*)\[([^\[\]]+)\](?(2)[^\(\)]*)$")
NO_DEFAULTS = "nodefaults"
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class EnvSpec:
    """One parsed and validated environment spec."""

    key: str
    channels: tuple[str, ...]
    dependencies: tuple[str, ...]  # every platform's conda dependencies, in order
    pip: tuple[str, ...]  # every platform's pip requirements, in order
    platforms: tuple[str, ...]
    cuda: str | None = None
    provides: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    virtual_package_overrides: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    path: Path | None = None
    #: per platform, after selectors (a platform missing here has the unfiltered lists)
    per_platform: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=dict, compare=False)  # derived from the same text as the rest

    def dependencies_for(self, platform: str) -> tuple[str, ...]:
        """The conda dependencies that apply on ``platform`` (selectors applied)."""
        return self.per_platform.get(platform, (self.dependencies, self.pip))[0]

    def pip_for(self, platform: str) -> tuple[str, ...]:
        """The pip requirements that apply on ``platform`` (selectors applied)."""
        return self.per_platform.get(platform, (self.dependencies, self.pip))[1]

    def provided_requirements(self) -> list[Requirement]:
        """``provides`` as parsed PEP 440 requirements."""
        return [Requirement(p) for p in self.provides]

    def hash_inputs(self, platform: str) -> dict[str, Any]:
        """Everything about this spec that should trigger a relock on ``platform``."""
        return {
            "channels": list(self.channels),
            "dependencies": sorted(self.dependencies_for(platform)),
            "pip": sorted(self.pip_for(platform)),
            "platforms": sorted(self.platforms),
            "platform": platform,
        }


def spec_path(specs_dir: Path, key: str) -> Path:
    """Where the spec of ``key`` lives (the key is validated first)."""
    return specs_dir / f"{validate_env_key(key)}{SPEC_SUFFIX}"


def list_spec_keys(specs_dir: Path) -> list[str]:
    """Keys of every spec in ``specs_dir``, sorted (``models.yml`` is not a spec)."""
    if not specs_dir.is_dir():
        return []
    return sorted(
        p.stem for p in specs_dir.glob(f"*{SPEC_SUFFIX}") if p.name != "models.yml"
    )


def load_spec(specs_dir: Path, key: str) -> EnvSpec:
    """Read and validate the spec of ``key``."""
    path = spec_path(specs_dir, key)
    if not path.is_file():
        known = list_spec_keys(specs_dir)
        raise SpecError(
            f"no spec for env key '{key}' ({path.name} not found in {specs_dir.name}/)",
            hint=f"known keys: {', '.join(known)}" if known else "add a spec file first",
        )
    return parse_spec(read_text_file(path), source=path, expected_key=key)


def read_text_file(path: Path) -> str:
    """A spec-like file's text; binary content or an unreadable path is a :class:`SpecError`."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#x})",
                        hint="this should be a YAML file; restore it from version control"
                        ) from None
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from None


def load_yaml_mapping(text: str, source: str) -> dict[str, Any]:
    """Parse YAML text that must be a mapping, with one-line errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SpecError(f"{source}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level")
    return data


def _str_list(value: object, what: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SpecError(f"{source}: '{what}' must be a list of non-empty strings")
    return [v.strip() for v in value]


def parse_spec(text: str, *, source: Path | str, expected_key: str | None = None) -> EnvSpec:
    """Parse spec ``text``; ``source`` names it in errors."""
    name = Path(source).name if isinstance(source, Path) else source
    data = load_yaml_mapping(text, name)
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise SpecError(
            f"{name}: unknown top-level field(s) {', '.join(unknown)}",
            hint="put provisioner's own fields under 'x-provisioner:'",
        )
    key = validate_env_key(data.get("name"))
    if expected_key is not None and key != expected_key:
        raise SpecError(f"{name}: name '{key}' does not match the file name '{expected_key}'")
    # conda-lock's reading: "nodefaults" says "no implicit defaults channel", it is no channel
    channels = [c for c in _str_list(data.get("channels"), "channels", name) if c != NO_DEFAULTS]
    if not channels:
        raise SpecError(f"{name}: at least one channel is needed")
    platforms = [validate_platform(p) for p in _str_list(data.get("platforms"), "platforms", name)]
    if not platforms:
        raise SpecError(f"{name}: at least one platform is needed")

    conda_deps, pip_deps = _dependencies(data.get("dependencies"), name)
    per_platform = {}
    for plat in platforms:
        filtered = load_yaml_mapping(select_lines(text, plat), name)
        per_platform[plat] = _dependencies(filtered.get("dependencies"), name, allow_empty=True)
    for req in pip_deps:
        try:
            Requirement(req)
        except InvalidRequirement as exc:
            reason = str(exc).splitlines()[0]  # packaging adds the text and a caret below
            raise SpecError(f"{name}: pip requirement {req!r} is invalid: {reason}") from None

    own = data.get("x-provisioner") or {}
    if not isinstance(own, dict):
        raise SpecError(f"{name}: 'x-provisioner' must be a mapping")
    unknown_own = sorted(set(own) - _OWN_FIELDS)
    if unknown_own:
        raise SpecError(f"{name}: unknown x-provisioner field(s) {', '.join(unknown_own)}")
    cuda = own.get("cuda")
    if cuda is not None:
        if not isinstance(cuda, str):
            raise SpecError(
                f"{name}: x-provisioner.cuda must be a quoted string",
                hint='write cuda: "12.1" (unquoted, YAML reads 12.10 as the number 12.1)',
            )
        if not all(part.isdigit() for part in cuda.split(".")):
            raise SpecError(f"{name}: x-provisioner.cuda {cuda!r} is not a version like '12.1'")
    provides = _str_list(own.get("provides", []), "x-provisioner.provides", name)
    for req in provides:
        try:
            Requirement(req)
        except InvalidRequirement as exc:
            reason = str(exc).splitlines()[0]
            raise SpecError(f"{name}: provides entry {req!r} is invalid: {reason}") from None
    imports = _str_list(own.get("imports", []), "x-provisioner.imports", name)
    for module in imports:
        if not _MODULE_RE.fullmatch(module):
            raise SpecError(f"{name}: imports entry {module[:80]!r} is not a module name",
                            hint="list importable module names such as torch or "
                                 "transformers.models")
    overrides_raw = own.get("virtual-packages", {})
    if not isinstance(overrides_raw, dict):
        raise SpecError(f"{name}: x-provisioner.virtual-packages must be a mapping")
    overrides: dict[str, dict[str, str]] = {}
    for plat, values in overrides_raw.items():
        validate_platform(str(plat))
        if not isinstance(values, dict):
            raise SpecError(f"{name}: virtual-packages.{plat} must map names to versions")
        overrides[str(plat)] = {str(k): str(v) for k, v in values.items()}

    return EnvSpec(
        key=key,
        channels=tuple(channels),
        dependencies=conda_deps,
        pip=pip_deps,
        platforms=tuple(platforms),
        cuda=cuda,
        provides=tuple(provides),
        imports=tuple(imports),
        virtual_package_overrides=overrides,
        path=source if isinstance(source, Path) else None,
        per_platform=per_platform,
    )


def select_lines(text: str, platform: str) -> str:
    """``text`` with conda-lock's platform selectors applied for ``platform``.

    Like conda-lock, comment-only lines go and a line whose trailing comment
    holds a ``[selector]`` stays only where the selector names the platform.
    """
    kept = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = _SELECTOR_RE.match(line)
        if match and match.group(3) not in _SELECTORS[platform]:
            continue
        kept.append(line)
    return "\n".join(kept)


def _dependencies(raw: object, name: str, *,
                  allow_empty: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(conda dependencies, pip requirements) of a ``dependencies:`` list."""
    if raw is None and allow_empty:
        return (), ()
    if not isinstance(raw, list) or (not raw and not allow_empty):
        raise SpecError(f"{name}: 'dependencies' must be a non-empty list")
    conda_deps: list[str] = []
    pip_deps: list[str] = []
    for item in raw:
        if isinstance(item, str) and item.strip():
            conda_deps.append(item.strip())
        elif isinstance(item, dict) and set(item) == {"pip"}:
            if item["pip"] is not None:  # None: every line under it was deselected
                pip_deps.extend(_str_list(item["pip"], "pip", name))
        else:
            raise SpecError(f"{name}: dependency {item!r} is neither a string nor a 'pip:' list")
    return tuple(conda_deps), tuple(pip_deps)
