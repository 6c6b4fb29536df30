"""The home's own directories are what provisioner made, or nothing is walked.

provisioner deletes inside ``.trash/``, ``.staging/`` and ``envs/<key>/``; a
link there would carry those deletions outside the home, and a file there turns
every later command into an internal error. Before any command walks the home:

* a link (symlink or junction) at ``.trash`` or ``.staging`` is moved aside (the
  link itself is renamed; its target is never touched), and so is a file or
  anything else at any of these places: scratch space is recreated empty;
* a link at ``envs``, ``envs/<key>`` or ``locks`` is refused with exit 2,
  because it may be someone's deliberate relocation: provisioner never works
  through it (point ``PROVISIONER_HOME`` at the other disk instead).

A key's ``current`` pointer that is a directory, a link, garbage, or names a
generation that is not a real directory of the key is moved aside and healed
from the newest generation with a valid fingerprint (:func:`heal_pointer`, under
the key's lock), or removed so that the next ``ensure`` builds afresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
from datetime import datetime, timezone
from pathlib import Path

from provisioner import fsops
from provisioner.build.fingerprint import in_progress_path, read_fingerprint
from provisioner.build.layout import (
    POINTER_NAME,
    HomeLayout,
    is_generation_name,
    python_path,
)
from provisioner.errors import EnvironmentProblemError, HomeLayoutError, environment_error
from provisioner.paths import is_junction

log = logging.getLogger(__name__)

#: scratch dirs that may be recreated empty when something else sits in their place
SCRATCH = (".trash", ".staging")
#: dirs that hold data; a link there is refused, never followed
DATA = ("envs", "locks")


def _kind(path: Path) -> str | None:
    """``None`` for a real directory or nothing; else what sits there instead."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return "not reachable (a parent is a file)"
    if stat.S_ISLNK(st.st_mode) or is_junction(st):
        try:
            return f"a link to {os.readlink(path)}"
        except OSError:
            return "a link"
    if stat.S_ISDIR(st.st_mode):
        return None
    return "a file" if stat.S_ISREG(st.st_mode) else "not a directory"


def is_real_directory(path: Path) -> bool:
    """Whether ``path`` is a directory itself (not a link or junction to one)."""
    return _kind(path) is None and os.path.lexists(path)


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def move_aside(path: Path, why: str) -> Path:
    """Rename ``path`` itself (a link is not followed) to a timestamped sibling; return it."""
    aside = path.with_name(f"{path.name}.moved-aside-{_stamp()}-{secrets.token_hex(2)}")
    fsops.rename_with_retry(path, aside)
    log.warning("%s was %s; moved it aside to %s", path, why, aside.name)
    return aside


def _refuse(path: Path, what: str) -> HomeLayoutError:
    return HomeLayoutError(
        f"{path} is {what}, not a directory; provisioner never works through it",
        hint="keep everything under one PROVISIONER_HOME (point it at the other disk instead), "
             f"or move {path} away and rerun",
    )


def check_home(layout: HomeLayout) -> list[Path]:
    """Make ``.trash``, ``.staging``, ``envs`` and ``locks`` safe to walk; see the module doc.

    Returns what was moved aside. Raises :class:`HomeLayoutError` (exit 2) for
    a link at ``envs`` or ``locks``. Costs one ``lstat`` per name when all is well.
    """
    home_is = _kind(layout.home)
    if home_is is not None and not (home_is.startswith("a link") and layout.home.is_dir()):
        raise HomeLayoutError(f"the home {layout.home} is {home_is}, not a directory",
                              hint="set PROVISIONER_HOME (or --home) to a directory")
    if not os.path.lexists(layout.home):
        try:
            layout.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HomeLayoutError(f"cannot create the home {layout.home}: {exc.strerror}",
                                  hint="set PROVISIONER_HOME (or --home) to a directory that "
                                       "you can write") from None
    moved = []
    for name in (*SCRATCH, *DATA):
        path = layout.home / name
        what = _kind(path)
        if what is None:
            continue
        if name in DATA and what.startswith("a link"):
            raise _refuse(path, what)
        moved.append(move_aside(path, what))
    return moved


def check_key_dir(layout: HomeLayout, key: str, *, scan: bool = True) -> list[Path]:
    """Make ``envs/<key>`` safe to walk: a link is refused, a file moved aside.

    With ``scan``, a generation name inside it that is a link is moved aside
    (only the link); do that holding the key's lock.
    """
    key_dir = layout.key_dir(key)
    what = _kind(key_dir)
    if what is not None:
        if what.startswith("a link"):
            raise _refuse(key_dir, what)
        return [move_aside(key_dir, what)]
    moved: list[Path] = []
    if not scan:
        return moved
    try:
        entries = list(os.scandir(key_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        if is_generation_name(entry.name) and entry.is_symlink():
            moved.append(move_aside(Path(entry.path), "a link, not a generation"))
    return moved


def is_ready_generation(prefix: Path, key: str) -> bool:
    """A real directory with a fingerprint for ``key``, no in-progress marker, and a python."""
    if _kind(prefix) is not None or not prefix.is_dir():
        return False
    fp = read_fingerprint(prefix)
    return (fp is not None and fp.key == key and fp.generation == prefix.name
            and not in_progress_path(prefix).exists()
            and python_path(prefix, fp.platform).exists())


def pointer_problem(layout: HomeLayout, key: str) -> str | None:
    """Why ``key``'s pointer is not valid, or ``None`` (also when there is none)."""
    path = layout.pointer(key)
    what = _kind(path)
    if what is None:
        if not os.path.lexists(path):
            return None
        what = "a directory"
    elif what == "a file":
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            return f"unreadable ({exc})"
        if not is_generation_name(value):
            return f"names {value[:80]!r}, which is not a generation of {key}"
        if not is_real_directory(layout.generation_dir(key, value)):
            return f"names {value}, which is not a generation directory"
        return None
    return what


def newest_ready_generation(layout: HomeLayout, key: str) -> str | None:
    """The generation of ``key`` with the newest valid fingerprint, or ``None``."""
    best: tuple[str, str] | None = None
    try:
        entries = list(os.scandir(layout.key_dir(key)))
    except OSError:
        return None
    for entry in entries:
        if not is_generation_name(entry.name) or entry.is_symlink():
            continue
        prefix = Path(entry.path)
        if is_ready_generation(prefix, key):
            fp = read_fingerprint(prefix)
            assert fp is not None
            if best is None or (fp.created_at, entry.name) > best:
                best = (fp.created_at, entry.name)
    return best[1] if best else None


def heal_pointer(layout: HomeLayout, key: str) -> str | None:
    """Repair an invalid ``current`` of ``key``; call it holding the key's lock.

    The bad pointer is moved aside (a directory or link is never followed or
    deleted), then the pointer is rewritten to the newest ready generation, if
    any. Returns a line saying what was done, or ``None`` when the pointer was fine.
    """
    problem = pointer_problem(layout, key)
    if problem is None:
        return None
    path = layout.pointer(key)
    aside = path.with_name(f".{POINTER_NAME}.moved-aside-{_stamp()}-{secrets.token_hex(2)}")
    fsops.rename_with_retry(path, aside)
    newest = newest_ready_generation(layout, key)
    if newest is None:
        done = f"{key}: its pointer was {problem}; moved aside to {aside.name}, no ready generation"
    else:
        fsops.replace_pointer(path, newest)
        done = (f"{key}: its pointer was {problem}; moved aside to {aside.name} and healed "
                f"to generation {newest}")
    log.warning("%s", done)
    return done


_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def environment_problem(exc: BaseException, home: Path,
                        doing: str) -> EnvironmentProblemError | None:
    """An exit-2 error when ``exc`` (or what caused it) is a full disk, read-only or denied home.

    An ``OSError`` is judged by its errno and names its own path; an installer's
    error (rattler reports ``(os error 28)`` in its text) names the home and its
    free space. Anything else gives ``None``: it stays what it was.
    """
    if isinstance(exc, OSError):
        if exc.filename is None and exc.errno is not None:
            # Some writes (a lock file, a temp file) fail without naming a path: name the home.
            exc = OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(home))
        return environment_error(exc, doing)
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    for match in _OS_ERROR_RE.finditer("\n".join(str(e) for e in seen)):
        code = int(match.group(1) or match.group(2))
        problem = environment_error(OSError(code, os.strerror(code), str(home)), doing)
        if problem is not None:
            with contextlib.suppress(OSError):
                problem.message += f" ({fsops.free_disk_bytes(home)} bytes free)"
            return problem
    return None
