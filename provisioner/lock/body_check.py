"""Is a lockfile's package section whole? Used by ``lock --check``.

The content hash in the metadata block says whether the spec changed; it says
nothing about the packages below it, so a lockfile cut short (a truncated copy,
a half-written checkout) used to pass. This parses the whole document (plain
YAML through :mod:`provisioner.lock.reader`, no conda-lock import) and checks,
per platform, that every entry is well formed, that every conda package's
dependencies are in the lock, and that every package the spec asks for is there.
"""

from __future__ import annotations

import re
from pathlib import Path

from provisioner.errors import LockfileError
from provisioner.lock.reader import load_document
from provisioner.lock.spec import EnvSpec

_FIELDS = ("name", "version", "manager", "platform", "url", "hash")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MD5 = re.compile(r"[0-9a-f]{32}")
_ARCHIVES = {"conda": (".conda", ".tar.bz2"), "pip": (".whl", ".tar.gz", ".zip")}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def _spec_name(dependency: str) -> str | None:
    """The package name of a conda match spec such as ``pytorch::pytorch >=2.1``."""
    match = _NAME.match(dependency.split("::")[-1].strip())
    return match.group(0).lower() if match else None


def _entry_problem(index: int, entry: object) -> str | None:
    if not isinstance(entry, dict):
        return f"package entry #{index} is not a mapping"
    missing = [f for f in _FIELDS if not entry.get(f)]
    if missing:
        return f"package entry #{index} ({entry.get('name', '?')}) lacks {', '.join(missing)}"
    if not isinstance(entry.get("optional"), bool) or not (
            "category" in entry or "categories" in entry):
        # conda-lock writes both for every entry, last: their absence means a cut.
        return f"package {entry['name']} lacks 'category'/'optional' (cut short?)"
    manager, url, hashes = entry["manager"], str(entry["url"]), entry["hash"]
    if manager not in _ARCHIVES:
        return f"package {entry['name']}: unknown manager {manager!r}"
    if not url.split("#")[0].endswith(_ARCHIVES[manager]):
        return f"package {entry['name']}: url {url[-60:]!r} does not name an archive (cut short?)"
    if not isinstance(hashes, dict):
        return f"package {entry['name']}: 'hash' is not a mapping"
    sha, md5 = hashes.get("sha256"), hashes.get("md5")
    if not (isinstance(sha, str) and _SHA256.fullmatch(sha)) and not (
            sha is None and isinstance(md5, str) and _MD5.fullmatch(md5)):
        return f"package {entry['name']}: malformed sha256 {sha!r} (cut short?)"
    return None


def lock_body_problems(path: Path, spec: EnvSpec) -> list[str]:
    """What is wrong with the package section of ``path``; empty when it is whole."""
    try:
        data = load_document(path)
    except LockfileError as exc:
        return [f"{exc.message} (cut short?)"]
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    assert isinstance(metadata, dict)
    entries = data.get("package") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        return ["the lock has no packages"]
    problems: list[str] = []
    conda: dict[str, dict[str, dict[str, object]]] = {}
    for index, entry in enumerate(entries, 1):
        problem = _entry_problem(index, entry)
        if problem is not None:
            problems.append(problem)
        elif entry["manager"] == "conda":
            conda.setdefault(str(entry["platform"]), {})[str(entry["name"]).lower()] = entry
    platforms = metadata.get("platforms")
    for platform in platforms if isinstance(platforms, list) else []:
        have = conda.get(str(platform), {})
        if not have:
            problems.append(f"{platform}: the lock has no conda packages")
            continue
        for name, entry in sorted(have.items()):
            deps = entry.get("dependencies") or {}
            for dep in sorted(deps if isinstance(deps, dict) else []):
                if not str(dep).startswith("__") and str(dep).lower() not in have:
                    problems.append(f"{platform}: {name} needs {dep}, which the lock lacks "
                                    "(cut short?)")
        for dependency in spec.dependencies:
            wanted = _spec_name(dependency)
            if wanted and wanted not in have:
                problems.append(f"{platform}: the spec asks for {wanted}, which the lock lacks")
    return problems[:10]
