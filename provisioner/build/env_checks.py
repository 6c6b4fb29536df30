"""Checks of a built env: records, files, imports and relocation. They return data.

* :func:`check_records`: every locked package is in ``conda-meta/`` with the locked sha256.
* :func:`check_files`: every recorded file exists (quick) and, with ``deep``, has
  the recorded sha256 (``sha256_in_prefix`` for files patched at install, as
  ``conda doctor`` does).
* :func:`check_imports`: the env's python imports the spec's modules (once, in
  staging; it writes no ``.pyc`` into the env, and a timeout stops it).
* :func:`check_python_prefix`: the env's python starts and reports the env as
  ``sys.prefix`` (what is checked after promotion: a rename changes nothing else).
* :func:`find_staging_path`: no file (``.pyc`` aside) still names the staging path.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from provisioner import processes
from provisioner.lock.lockfile import LockedPackage
from provisioner.lock.platforms import is_windows_platform
from provisioner.paths import os_path

IMPORT_TIMEOUT_S = 300.0
IMPORT_TIMEOUT_ENV = "PROVISIONER_IMPORT_TIMEOUT"
PREFIX_TIMEOUT_S = 60.0
IMPORT_PROBE = (
    "import importlib, json, sys\n"
    "out = {}\n"
    "for name in sys.argv[1:]:\n"
    "    try:\n"
    "        mod = importlib.import_module(name)\n"
    "        out[name] = {'ok': True, 'version': str(getattr(mod, '__version__', ''))}\n"
    "    except BaseException as exc:\n"
    "        out[name] = {'ok': False, 'error': type(exc).__name__ + ': ' + str(exc)}\n"
    "print(json.dumps(out))\n"
)


@dataclass(frozen=True)
class CheckReport:
    """Problems found by a check; empty means healthy."""

    problems: tuple[str, ...] = ()
    checked: int = 0
    details: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def site_packages(prefix: Path, python_version: str, platform: str) -> Path:
    """The site-packages dir of a conda prefix."""
    if is_windows_platform(platform):
        return prefix / "Lib" / "site-packages"
    xy = ".".join(python_version.split(".")[:2])
    return prefix / "lib" / f"python{xy}" / "site-packages"


def _records(prefix: Path) -> dict[str, dict[str, object]]:
    meta = Path(os_path(prefix)) / "conda-meta"  # extended-length on Windows, as every walk
    result: dict[str, dict[str, object]] = {}
    if not meta.is_dir():
        return result
    for path in meta.glob("*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            result[data["name"]] = data
    return result


def check_records(prefix: Path, packages: Sequence[LockedPackage]) -> CheckReport:
    """Every locked conda package is installed, with the locked version and sha256."""
    records = _records(prefix)
    problems = []
    for pkg in packages:
        rec = records.get(pkg.name)
        if rec is None:
            problems.append(f"{pkg.name} {pkg.version} is not installed")
        elif str(rec.get("version")) != pkg.version or rec.get("sha256") != pkg.sha256:
            problems.append(
                f"{pkg.name}: installed {rec.get('version')} sha256 {rec.get('sha256')}, "
                f"lock has {pkg.version} sha256 {pkg.sha256}"
            )
    return CheckReport(tuple(problems), len(packages))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(prefix: Path, *, deep: bool = False, sizes: bool = False,
                on_total: Callable[[int], None] | None = None,
                on_package: Callable[[], None] | None = None) -> CheckReport:
    """Recorded files exist (and with ``deep``, match their recorded sha256).

    With ``sizes``, files linked unpatched also have their recorded size.
    ``on_total`` hears the number of packages, ``on_package`` each one checked.
    """
    missing: list[str] = []
    altered: list[str] = []
    count = 0
    base = Path(os_path(prefix))  # recorded paths may pass 260 characters on Windows
    records = sorted(_records(prefix).items())
    if on_total is not None:
        on_total(len(records))
    for name, rec in records:
        paths = rec.get("paths_data")
        entries = paths.get("paths", []) if isinstance(paths, dict) else []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("_path"), str):
                continue
            count += 1
            path = base / entry["_path"]
            if not os.path.lexists(path):
                missing.append(f"{name}: {entry['_path']}")
                continue
            if sizes and _size_differs(path, entry):
                altered.append(f"{name}: {entry['_path']}")
                continue
            if not deep or entry.get("path_type") == "softlink" or path.is_symlink():
                continue
            expected = entry.get("sha256_in_prefix") or entry.get("sha256")
            if isinstance(expected, str) and _file_sha256(path) != expected:
                altered.append(f"{name}: {entry['_path']}")
        if on_package is not None:
            on_package()
    problems = [f"missing file {m}" for m in missing] + [f"altered file {a}" for a in altered]
    return CheckReport(
        tuple(problems), count, {"missing": missing, "altered": altered, "deep": deep}
    )


def _size_differs(path: Path, entry: dict[str, object]) -> bool:
    expected = entry.get("size_in_bytes")
    if (not isinstance(expected, int) or entry.get("path_type", "hardlink") != "hardlink"
            or entry.get("prefix_placeholder")):  # patched at install: another size
        return False
    try:
        return os.lstat(path).st_size != expected
    except OSError:
        return True


def import_timeout() -> float:
    """Seconds the import check may take: ``PROVISIONER_IMPORT_TIMEOUT``, else 300."""
    try:
        value = float(os.environ.get(IMPORT_TIMEOUT_ENV, ""))
    except ValueError:
        return IMPORT_TIMEOUT_S
    return value if value > 0 else IMPORT_TIMEOUT_S


def _python_env(extra_path: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    # The build writes exactly the packages' files: no .pyc as a side effect of a check.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if extra_path is not None:
        # A staged env's launcher may already name the final prefix; point it at the stage.
        env["PYTHONPATH"] = str(extra_path)
    else:
        env.pop("PYTHONPATH", None)
    return env


def check_imports(
    python: Path, imports: Sequence[str], *, extra_path: Path | None = None,
    timeout: float | None = None,
) -> CheckReport:
    """Import each module in the env's python (a fresh process) and report failures.

    Writes no ``.pyc`` files. After ``timeout`` seconds (default
    :func:`import_timeout`) the probe and everything it started are killed and
    the report's ``details["timed_out"]`` is true.
    """
    if not imports:
        return CheckReport()
    if not python.exists():
        return CheckReport((f"interpreter {python} does not exist",))
    limit = import_timeout() if timeout is None else timeout
    result = processes.run(
        [str(python), "-c", IMPORT_PROBE, *imports], timeout=limit, env=_python_env(extra_path)
    )
    if not result.ok:
        why = f"timed out after {limit:g} s" if result.timed_out else (
            result.stderr.strip() or "failed")
        return CheckReport((f"import probe failed: {why.splitlines()[-1]}",), len(imports),
                           {"timed_out": result.timed_out})
    try:
        data = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return CheckReport(("import probe printed no JSON",), len(imports))
    problems = tuple(
        f"import {name}: {info.get('error')}" for name, info in data.items() if not info.get("ok")
    )
    return CheckReport(problems, len(imports), {"imports": data})


def check_python_prefix(python: Path, prefix: Path) -> CheckReport:
    """The env's python starts and its ``sys.prefix`` is ``prefix``."""
    if not python.exists():
        return CheckReport((f"interpreter {python} does not exist",))
    result = processes.run([str(python), "-c", "import sys; print(sys.prefix)"],
                           timeout=PREFIX_TIMEOUT_S, env=_python_env(None))
    if not result.ok:
        why = "timed out" if result.timed_out else (result.stderr.strip() or "failed")
        return CheckReport((f"python does not start: {why.splitlines()[-1]}",), 1)
    lines = result.stdout.strip().splitlines()
    reported = lines[-1] if lines else ""
    if not reported or os.path.realpath(reported) != os.path.realpath(prefix):
        return CheckReport((f"sys.prefix is {reported or 'empty'}, not {prefix}",), 1)
    return CheckReport((), 1)


def find_staging_path(prefix: Path, staging: str, *, trust_hardlinks: bool = True) -> list[str]:
    """Files under ``prefix`` (``.pyc`` aside) whose bytes contain ``staging``.

    With ``trust_hardlinks``, files whose inode is shared (``st_nlink > 1``) are
    skipped: they are the package cache's bytes, hardlinked unmodified, and the
    cache never names a staging dir. Only files written for this env (patched
    placeholders, generated scripts, records, copies) are read, so the check
    does not grow with the size of a multi-GB env.
    """
    needle = staging.encode()
    hits = []
    top = os_path(prefix)
    for root, _dirs, files in os.walk(top):
        for name in files:
            if name.endswith(".pyc"):
                continue
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode) or (trust_hardlinks and st.st_nlink > 1):
                    continue
                with open(path, "rb") as fh:
                    if needle in fh.read():
                        hits.append(os.path.relpath(path, top))
            except OSError:
                continue
    return sorted(hits)
