"""The tree shows the architecture: domain subpackages, one-way imports, small modules.

These are the checks ``docs/architecture.md`` promises; they read the source (AST), so
a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import pkgutil
import re
from pathlib import Path

import provisioner

PACKAGE = Path(provisioner.__file__).parent
REPO = PACKAGE.parent
DOMAINS = ["lock", "build", "models", "sample"]
SHARED = ["config", "contained", "errors", "fscopy", "fsdelete", "fsops", "keys", "paths",
          "processes", "progress"]
# who may import whom: a layer imports only layers at or below its own rank
RANK = {"core": 0, "lock": 1, "build": 2, "models": 3, "sample": 4, "cli": 5}
MAX_LINES = 400


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in RANK:
        return parts[1]
    return "core"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("provisioner"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            if base.startswith("provisioner"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names
                             if f"{base}.{a.name}" in _modules())
    return found


def test_top_level_shows_domains_and_a_few_shared_modules() -> None:
    names = {m.name: m.ispkg for m in pkgutil.iter_modules(provisioner.__path__)}
    assert sorted(n for n, pkg in names.items() if pkg) == sorted([*DOMAINS, "cli"])
    assert sorted(n for n, pkg in names.items() if not pkg) == sorted([*SHARED, "__main__"])


def test_no_module_over_the_size_limit() -> None:
    too_long = {m: n for m, p in _modules().items()
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert too_long == {}


def test_imports_run_one_way() -> None:
    wrong = []
    for module, path in _modules().items():
        if module in ("provisioner", "provisioner.__main__"):
            continue  # lazy public re-exports by name; the entry point runs the CLI
        layer = _layer(module)
        for target in _imports(path, module):
            if target == "provisioner":
                continue  # __version__ and the public names
            if RANK[_layer(target)] > RANK[layer]:
                wrong.append(f"{module} ({layer}) imports {target} ({_layer(target)})")
    assert wrong == []


def test_cli_mirrors_the_domains() -> None:
    cli_modules = {m.name for m in pkgutil.iter_modules([str(PACKAGE / "cli")])}
    assert set(DOMAINS) <= cli_modules


def test_tests_mirror_the_packages() -> None:
    tests = REPO / "tests"
    for domain in [*DOMAINS, "cli"]:
        assert (tests / domain).is_dir(), domain
        for test in (tests / domain).glob("test_*.py"):
            stem = test.stem.removeprefix("test_")
            if domain == "cli" or stem in {"reliability", "hostile"}:
                continue  # cross-cutting suites named for what they exercise
            assert (PACKAGE / domain / f"{stem}.py").exists(), f"{test} mirrors no module"


def test_architecture_doc_matches_the_tree() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(provisioner/[\w/]+\.py)`", doc))
    existing = {p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py")
                if p.name != "__init__.py" and p.name != "__main__.py"}
    assert named - existing == set(), "the doc names modules that do not exist"
    assert existing - named == set(), "modules missing from the doc"


def test_public_api_is_exported_and_light() -> None:
    assert sorted(provisioner.__all__) == sorted(["__version__", *provisioner._EXPORTS])
    for name in provisioner._EXPORTS:
        assert getattr(provisioner, name).__name__ == name
