"""The pip layer: ``pip:`` requirements locked with uv on top of a conda solve.

The trap (see the project's domain notes): PyPI's bitsandbytes requires
``torch``, and PyPI's torch pulls ``nvidia-*`` wheels and ``triton``. A naive
resolve installs a second torch over conda's. Here, what conda provides counts
as installed: uv resolves the pip requirements with every conda-provided
distribution *constrained* to its conda version (so version conflicts still
surface), and then only the requirements themselves are written out. A
dependency that conda does not provide and that the spec's ``pip:`` list does
not name is an error that names it.

The result is a list of ``manager: pip`` lock entries (name, version, wheel URL,
sha256, dependencies), written into the conda-lock file itself, so conda-lock,
micromamba and ``conda-lock render`` install the layer too. Dependency values
are ``''`` (any version): rattler's lock reader rejects conda-lock's ``'*'``.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from provisioner import processes
from provisioner.config import PipSettings
from provisioner.errors import PipLayerError, ToolMissingError
from provisioner.lock.lockfile import LockedPackage
from provisioner.lock.platforms import VirtualPackages
from provisioner.lock.pypi_names import pypi_distributions

_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
UV_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class PipPin:
    """One pinned wheel of the pip layer."""

    name: str
    version: str
    hashes: tuple[str, ...]


def uv_executable() -> str:
    """The uv binary shipped with the ``uv`` Python package, else one on PATH."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = processes.which("uv")
        if found is None:
            raise ToolMissingError(
                "uv is not installed", hint="pip install uv (it is a provisioner dependency)"
            ) from None
        return found


def index_arguments(settings: PipSettings) -> list[str]:
    """uv options for where wheels come from; none means uv's own configuration."""
    argv = ["--no-index"] if settings.no_index else []
    if settings.index_url:
        argv += ["--index-url", settings.index_url]
    for link in settings.find_links:
        argv += ["--find-links", link]
    return argv


def python_platform_for(platform: str, virtual_packages: VirtualPackages) -> str:
    """uv's ``--python-platform`` for a conda platform."""
    glibc = virtual_packages.get("__glibc", ("2.28", "0"))[0]
    glibc_tag = "_".join(glibc.split(".")[:2])
    return {
        "linux-64": f"x86_64-manylinux_{glibc_tag}",
        "linux-aarch64": f"aarch64-manylinux_{glibc_tag}",
        "win-64": "x86_64-pc-windows-msvc",
        "osx-64": "x86_64-apple-darwin",
        "osx-arm64": "aarch64-apple-darwin",
    }[platform]


def conda_provided(conda_packages: Sequence[LockedPackage]) -> dict[str, str]:
    """PyPI distribution name -> version for everything the conda layer installs.

    Names come from the vendored conda-forge/pytorch mapping
    (:mod:`provisioner.lock.pypi_names`): ``python-xxhash`` provides PyPI's
    ``xxhash``, while the C library ``xxhash``, conda's ``tzdata`` and ``libcurl``
    provide no PyPI distribution and are not constrained. A conda version that
    is not a PEP 440 version cannot constrain uv and is left out.
    """
    provided: dict[str, str] = {}
    for name, pkg in pypi_distributions(conda_packages).items():
        try:
            Version(pkg.version)
        except InvalidVersion:
            continue
        provided[name] = pkg.version
    return provided


def parse_compile_output(text: str) -> tuple[dict[str, PipPin], dict[str, set[str]]]:
    """Parse ``uv pip compile --generate-hashes`` output into pins and a ``via`` graph.

    The graph maps a package to its parents; ``-r`` sources become ``<root>`` and
    ``-c`` constraint sources are dropped.
    """
    pins: dict[str, PipPin] = {}
    parents: dict[str, set[str]] = {}
    current: str | None = None
    hashes: list[str] = []
    in_via = False

    def flush() -> None:
        if current is not None:
            pins[current] = PipPin(current, pins[current].version, tuple(hashes))

    for raw in text.splitlines():
        line = raw.strip()
        match = _PIN_RE.match(raw)
        if match:
            flush()
            current = canonicalize_name(match.group(1))
            pins[current] = PipPin(current, match.group(2), ())
            parents.setdefault(current, set())
            hashes = []
            in_via = False
            continue
        if current is None:
            continue
        if line.startswith("--hash="):
            hashes.append(line.removeprefix("--hash=").rstrip(" \\"))
        elif line.startswith("# via"):
            rest = line.removeprefix("# via").strip()
            in_via = not rest
            if rest:
                _add_parent(parents[current], rest)
        elif in_via and line.startswith("#"):
            _add_parent(parents[current], line.lstrip("#").strip())
    flush()
    return pins, parents


def _add_parent(parents: set[str], text: str) -> None:
    if text.startswith("-r"):
        parents.add("<root>")
    elif not text.startswith("-c") and text:
        parents.add(canonicalize_name(text.split()[0]))


def lock_pip_layer(
    *,
    key: str,
    requirements: Sequence[str],
    platform: str,
    virtual_packages: VirtualPackages,
    conda_packages: Sequence[LockedPackage],
    settings: PipSettings,
) -> list[LockedPackage]:
    """Lock ``requirements`` on top of ``conda_packages``: ``manager: pip`` lock entries."""
    python = next((p for p in conda_packages if p.name == "python"), None)
    if python is None:
        raise PipLayerError(f"{key}: a pip: section needs python in the conda dependencies")
    py_version = ".".join(python.version.split(".")[:2])
    provided = conda_provided(conda_packages)
    wanted: set[str] = {canonicalize_name(Requirement(r).name) for r in requirements}
    overlap = sorted(wanted & set(provided))
    if overlap:
        name = overlap[0]
        raise PipLayerError(
            f"{key}: pip requirement '{name}' is already provided by conda ({provided[name]})",
            hint="drop it from the pip: section, or from the conda dependencies",
        )
    with tempfile.TemporaryDirectory(prefix="provisioner-pip-") as tmp:
        req_in = Path(tmp) / "requirements.in"
        req_in.write_text("\n".join(requirements) + "\n", encoding="utf-8")
        constraints = Path(tmp) / "conda-provided.txt"
        constraints.write_text(
            "".join(f"{name}=={version}\n" for name, version in sorted(provided.items())),
            encoding="utf-8",
        )
        target = ["--python-version", py_version,
                  "--python-platform", python_platform_for(platform, virtual_packages)]
        argv = [uv_executable(), "pip", "compile", str(req_in), "--constraint", str(constraints),
                *target, "--generate-hashes", "--no-header", "--quiet",
                *index_arguments(settings),
                "--find-links", str(_provided_wheels(Path(tmp) / "conda-provided", provided))]
        pins, parents = parse_compile_output(_run_uv(argv, key, platform))
        _check_needed(key, platform, pins, parents, set(wanted), set(provided))
        chosen = [pins[name] for name in sorted(wanted)]
        pinned = Path(tmp) / "pinned.in"
        pinned.write_text("".join(f"{p.name}=={p.version}\n" for p in chosen), encoding="utf-8")
        # Only the pylock.toml format names each wheel's URL; --no-deps keeps it to the pins.
        wheels = parse_pylock_wheels(_run_uv(
            [uv_executable(), "pip", "compile", str(pinned), *target, "--no-deps",
             "--format", "pylock.toml", "--no-header", "--quiet", *index_arguments(settings)],
            key, platform))
    return [
        _entry(pin, platform, wheels.get(pin.name, []),
               sorted(c for c, via in parents.items() if pin.name in via), key)
        for pin in chosen
    ]


def _check_needed(key: str, platform: str, pins: dict[str, PipPin],
                  parents: dict[str, set[str]], wanted: set[str], provided: set[str]) -> None:
    """Fail, naming it, on a dependency that neither conda nor the pip: section provides."""
    needed = _needed_by_pip_layer(parents, provided)
    missing = sorted(needed - wanted - provided)
    if missing:
        via = {m: sorted(parents.get(m, set()) - {"<root>"}) for m in missing}
        names = ", ".join(f"{m}=={pins[m].version} (needed by {', '.join(via[m]) or 'pip:'})"
                          for m in missing)
        raise PipLayerError(
            f"{key} ({platform}): the pip layer needs {names}, which conda does not provide "
            "and the pip: section does not pin",
            hint="add it to the conda dependencies (preferred) or to the pip: section",
        )


def _run_uv(argv: list[str], key: str, platform: str) -> str:
    result = processes.run(argv, timeout=UV_TIMEOUT_S)
    if result.timed_out or result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise PipLayerError(
            f"{key} ({platform}): uv could not lock the pip layer:\n{detail}",
            hint="check the pip: requirements and that the package index is reachable",
        )
    return result.stdout


def parse_pylock_wheels(text: str) -> dict[str, list[tuple[str, str]]]:
    """PEP 751 ``pylock.toml`` text -> {name: [(wheel url, sha256), ...]}."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    data = tomllib.loads(text)
    result: dict[str, list[tuple[str, str]]] = {}
    for package in data.get("packages", []):
        wheels = result.setdefault(canonicalize_name(str(package.get("name", ""))), [])
        for wheel in package.get("wheels", []):
            url = wheel.get("url") or wheel.get("path")
            sha = (wheel.get("hashes") or {}).get("sha256")
            if url and sha:
                wheels.append((str(url), str(sha)))
    return result


def _entry(pin: PipPin, platform: str, wheels: list[tuple[str, str]], deps: list[str],
           key: str) -> LockedPackage:
    """The lock entry of ``pin``: the wheel uv chose for the platform, with its sha256."""
    hashes = {h.removeprefix("sha256:") for h in pin.hashes}
    wheel = next((w for w in wheels if w[1] in hashes), None)
    if wheel is None:
        raise PipLayerError(
            f"{key} ({platform}): no wheel of {pin.name}=={pin.version} for this platform",
            hint="the pip layer installs wheels only; pin a version that has one",
        )
    return LockedPackage(
        name=pin.name, version=pin.version, manager="pip", platform=platform,
        url=wheel[0], sha256=wheel[1], dependencies=tuple((d, "") for d in deps),
    )


def _provided_wheels(directory: Path, provided: dict[str, str]) -> Path:
    """Metadata-only wheels standing for what conda installs.

    They let uv resolve a conda-provided dependency where the index has no
    wheel of that version for the platform, or where there is no index at all;
    where the index has one, uv may use either, and the conda branch is dropped
    from the result anyway.
    """
    from provisioner.lock.wheels import build_wheel

    for name, version in provided.items():
        build_wheel(directory, name, version, files={})
    return directory


def _needed_by_pip_layer(parents: dict[str, set[str]], provided: set[str]) -> set[str]:
    """Packages reachable from the requirements without passing through a conda package."""
    needed: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, via in parents.items():
            if name in needed:
                continue
            if "<root>" in via or any(p in needed and p not in provided for p in via):
                needed.add(name)
                changed = True
    return needed


def install_pip_layer(
    *,
    entries: Sequence[LockedPackage],
    site_packages: Path,
    python_version: str,
    platform: str,
    virtual_packages: VirtualPackages,
    settings: PipSettings,
) -> int:
    """Install the lock's ``manager: pip`` entries into ``site_packages``; return their number.

    Each wheel is named by version and required to have the locked sha256, and
    fetched through the configured index (or find-links), so a mirror serves it
    as well as the URL in the lock would.
    """
    if not entries:
        return 0
    with tempfile.TemporaryDirectory(prefix="provisioner-pip-") as tmp:
        req = Path(tmp) / "pip-layer.txt"
        req.write_text("".join(f"{e.name}=={e.version} --hash=sha256:{e.sha256}\n"
                               for e in sorted(entries, key=lambda e: e.name)), encoding="utf-8")
        argv = [
            uv_executable(), "pip", "install", "--require-hashes", "--no-deps",
            "--requirement", str(req),
            "--target", str(site_packages),
            "--python-version", ".".join(python_version.split(".")[:2]),
            "--python-platform", python_platform_for(platform, virtual_packages),
            "--only-binary", ":all:", "--quiet",
        ]
        argv += index_arguments(settings)
        result = processes.run(argv, timeout=UV_TIMEOUT_S)
    if not result.ok:
        detail = (result.stderr or result.stdout).strip()
        raise PipLayerError(
            f"uv could not install the pip layer:\n{detail}",
            hint="a hash mismatch means the wheel differs from the lock; relock or fix the index",
        )
    return len(entries)
