"""Windows ``MAX_PATH``, decided before a build writes anything.

With ``LongPathsEnabled`` off (the Windows default) a path of 260 characters
or more cannot be opened by most programs, the env's own ``python.exe``
included, even where provisioner itself uses ``\\\\?\\`` paths. So once the
packages are checked (their ``paths.json`` read) and before the staging dir
exists, the longest path the build will create is measured with Windows path
rules: each package's longest relative path under the staging dir, the final
prefix and its package-cache entry. Reaching the limit refuses the build with
one line and a hint, instead of a half-built env that fails at import time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePath, PureWindowsPath
from typing import TYPE_CHECKING

from provisioner.errors import EnvironmentProblemError

if TYPE_CHECKING:
    from provisioner.build.package_checks import CheckedPackage

#: Windows' MAX_PATH, the terminating NUL included: 259 characters is the longest usable path
WINDOWS_MAX_PATH = 260
LONG_PATHS_KEY = r"SYSTEM\CurrentControlSet\Control\FileSystem"
LONG_PATHS_VALUE = "LongPathsEnabled"


def _winreg_reader(subkey: str, name: str) -> object:
    if sys.platform != "win32":
        raise OSError("the Windows registry exists only on Windows")
    import winreg

    with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, subkey) as handle:
        value, _kind = winreg.QueryValueEx(handle, name)
    return value


def long_paths_enabled(reader: Callable[[str, str], object] | None = None) -> bool | None:
    """Whether Windows' ``LongPathsEnabled`` is 1; ``None`` off Windows or when unreadable.

    ``reader(subkey, value_name)`` reads one HKLM value (raising
    ``FileNotFoundError`` when it is absent); tests pass a fake.
    """
    if reader is None:
        if sys.platform != "win32":
            return None
        reader = _winreg_reader
    try:
        value = reader(LONG_PATHS_KEY, LONG_PATHS_VALUE)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    return isinstance(value, int) and value == 1


def windows_path_length(base: str | PurePath, relative: str) -> int:
    """Length of ``base`` joined with a package's ``/``-separated ``relative`` path, on Windows."""
    parts = [p for p in relative.split("/") if p]
    return len(str(PureWindowsPath(str(base), *parts)))


@dataclass(frozen=True)
class PathVerdict:
    """The longest path a build creates, and whether Windows can open it."""

    length: int
    path: str  # the base and relative path that reach it, joined
    too_long: bool


def plan_path_lengths(bases: Iterable[str | PurePath], relatives: Iterable[str], *,
                      long_paths: bool) -> PathVerdict:
    """Whether any ``base`` joined with any ``relative`` path reaches :data:`WINDOWS_MAX_PATH`.

    Pure (Windows path rules on any host): ``long_paths`` is ``LongPathsEnabled``.
    Only the longest relative path matters for each base, so callers may pass just that.
    """
    rels = list(relatives) or [""]
    best = PathVerdict(0, "", False)
    for base in bases:
        for rel in rels:
            length = windows_path_length(base, rel)
            if length > best.length:
                parts = [p for p in rel.split("/") if p]
                best = PathVerdict(length, str(PureWindowsPath(str(base), *parts)), False)
    return PathVerdict(best.length, best.path,
                       not long_paths and best.length >= WINDOWS_MAX_PATH)


def refuse_long_paths(key: str, verdict: PathVerdict) -> None:
    """Raise the one-line refusal for ``verdict`` when it is too long; else nothing."""
    if not verdict.too_long:
        return
    raise EnvironmentProblemError(
        f"{key}: a path of this env would be {verdict.length} characters, and Windows long "
        f"paths are off (limit {WINDOWS_MAX_PATH - 1}): ...{verdict.path[-60:]}",
        hint=f"enable long paths (set HKLM\\{LONG_PATHS_KEY}\\{LONG_PATHS_VALUE} to 1, as "
             "an administrator), or set a shorter home (PROVISIONER_HOME or --home, e.g. "
             "C:\\pv)",
    )


def check_build_paths(key: str, env_dirs: Sequence[PurePath], checked: Sequence[CheckedPackage],
                      cache_dir: PurePath, *, windows: bool | None = None,
                      long_paths: bool | None = None) -> None:
    """Refuse a Windows build whose env or package-cache paths reach ``MAX_PATH``.

    ``env_dirs`` are where the packages land (the staging dir and the final
    prefix); each package is also extracted under ``cache_dir/<archive stem>``.
    Off Windows, with long paths on, or when the registry cannot be read, nothing
    is refused.
    """
    if not (sys.platform == "win32" if windows is None else windows):
        return
    enabled = long_paths_enabled() if long_paths is None else long_paths
    if enabled is not False:
        return
    longest = max((c.summary.longest_path for c in checked), key=len, default="")
    verdicts = [plan_path_lengths(env_dirs, [longest], long_paths=False)]
    for c in checked:
        stem = c.artifact.package.file_name.removesuffix(".conda").removesuffix(".tar.bz2")
        verdicts.append(plan_path_lengths([cache_dir / stem],
                                          [c.summary.longest_path], long_paths=False))
    refuse_long_paths(key, max(verdicts, key=lambda v: v.length))
