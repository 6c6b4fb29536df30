"""``provisioner diff``: what changed between two locks, GPU-relevant packages first.

A package is identified per platform by ``(manager, name)``; it *changed* when its
version or build differs. GPU-relevant packages (python, pytorch and its CUDA build, CUDA
runtime, cudnn, transformers, accelerate, bitsandbytes) come first; every other one is
named too (folded in markdown). ``diff_git`` compares the project's lockfiles (pip layers
included) at a git revision with the working tree.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from provisioner import fsops, processes
from provisioner.config import Config
from provisioner.errors import InvalidKeyError, UserError
from provisioner.keys import validate_env_key
from provisioner.lock.lockfile import LockData, LockedPackage
from provisioner.lock.reader import read_lockfile
from provisioner.lock.show import _cuda_line

#: GPU-relevant packages (conda or PyPI names), in the order they are reported.
GPU_PACKAGES = (
    "python", "pytorch", "torch", "pytorch-cuda", "cuda-version", "cudatoolkit", "cuda-runtime",
    "cuda-cudart", "cudnn", "nccl", "transformers", "accelerate", "bitsandbytes",
)
# PyPI's CUDA runtime wheels, reported after the named ones.
_GPU_WHEEL_RE = re.compile(r"nvidia-(?:cuda-runtime|cudnn|nccl)-cu\d+")
_LOCK_SUFFIX = ".conda-lock.yml"
_GIT_TIMEOUT_S = 120.0
_EMPTY = LockData(platforms=(), channels=(), content_hash={}, packages=())


def gpu_rank(name: str) -> int | None:
    """Position of ``name`` among the GPU-relevant packages, ``None`` for any other."""
    norm = name.lower().replace("_", "-")
    if norm in GPU_PACKAGES:
        return GPU_PACKAGES.index(norm)
    return len(GPU_PACKAGES) if _GPU_WHEEL_RE.fullmatch(norm) else None


@dataclass(frozen=True)
class PackageChange:
    """One package of one platform: added, removed, changed or (GPU only) unchanged.

    ``change`` is ``added``, ``removed``, ``upgrade``, ``downgrade``, ``rebuild``
    (same version, other build), ``changed`` (versions not comparable) or
    ``unchanged``. ``note`` names the CUDA line of a pytorch build.
    """

    name: str
    manager: str
    change: str
    old_version: str | None = None
    old_build: str | None = None
    new_version: str | None = None
    new_build: str | None = None
    note: str = ""

    @property
    def gpu_relevant(self) -> bool:
        return gpu_rank(self.name) is not None

    @property
    def label(self) -> str:
        """The name, marked when the package comes from the pip layer."""
        return self.name if self.manager == "conda" else f"{self.name} ({self.manager})"

    def change_text(self) -> str:
        return f"{self.change} ({self.note})" if self.note else self.change

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy."""
        old, new = (None if v is None else {"version": v, "build": b or ""}
                    for v, b in ((self.old_version, self.old_build),
                                 (self.new_version, self.new_build)))
        return {"name": self.name, "manager": self.manager, "change": self.change, "old": old,
                "new": new, "note": self.note, "gpu_relevant": self.gpu_relevant}


def _text(version: str | None, build: str | None, *, markdown: bool = False) -> str:
    if version is None:
        return "-"
    if not build:
        return _cell(version) if markdown else version
    return f"{_cell(version)} `{build}`" if markdown else f"{version} ({build})"


def _sort_key(change: PackageChange) -> tuple[int, str, str]:
    rank = gpu_rank(change.name)
    return (len(GPU_PACKAGES) + 1 if rank is None else rank, change.name, change.manager)


@dataclass(frozen=True)
class PlatformDiff:
    """The changes of one platform. ``presence``: ``both``, ``added`` or ``removed``."""

    platform: str
    added: tuple[PackageChange, ...]
    removed: tuple[PackageChange, ...]
    changed: tuple[PackageChange, ...]
    unchanged_count: int
    gpu_unchanged: tuple[PackageChange, ...] = ()
    presence: str = "both"
    other_unchanged: tuple[str, ...] = ()  # labels of the unchanged packages not GPU-relevant

    @property
    def counts(self) -> dict[str, int]:
        return {"changed": len(self.changed), "added": len(self.added),
                "removed": len(self.removed), "unchanged": self.unchanged_count}

    def summary(self) -> str:
        """``"3 changed, 1 added, 0 removed, 40 unchanged"``."""
        return ", ".join(f"{n} {what}" for what, n in self.counts.items())

    @property
    def has_changes(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def all_changes(self) -> list[PackageChange]:
        """Every added, removed and changed package, GPU-relevant first, then by name."""
        return sorted((*self.changed, *self.added, *self.removed), key=_sort_key)

    def gpu_changes(self) -> list[PackageChange]:
        return [c for c in self.all_changes() if c.gpu_relevant]

    def other_changes(self) -> list[PackageChange]:
        return [c for c in self.all_changes() if not c.gpu_relevant]

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy: counts, the GPU-relevant changes and every other change."""
        return {
            "platform": self.platform, "presence": self.presence, "counts": self.counts,
            "gpu_relevant": [c.to_dict() for c in self.gpu_changes()],
            "gpu_unchanged": [c.to_dict() for c in self.gpu_unchanged],
            "other_unchanged": list(self.other_unchanged),
            "others": [c.to_dict() for c in self.other_changes()],
        }


@dataclass(frozen=True)
class LockDiff:
    """The changes of a whole lock, platform by platform."""

    platforms: tuple[PlatformDiff, ...]

    @property
    def has_changes(self) -> bool:
        return any(p.has_changes for p in self.platforms)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy."""
        return {"changed": self.has_changes, "platforms": [p.to_dict() for p in self.platforms]}


def _index(data: LockData, platform: str) -> dict[tuple[str, str], LockedPackage]:
    """Packages of ``platform`` by identity: (manager, name), pip names canonicalised."""
    return {(p.manager, p.name if p.manager == "conda" else canonicalize_name(p.name)): p
            for p in data.packages if p.platform == platform}


def _platforms(data: LockData) -> list[str]:
    return list(dict.fromkeys([*data.platforms, *sorted({p.platform for p in data.packages})]))


def _compare(old: LockedPackage, new: LockedPackage) -> str:
    if old.version == new.version:
        return "rebuild"
    from packaging.version import Version
    from rattler import Version as CondaVersion

    parse: Callable[[str], Any] = CondaVersion if old.manager == "conda" else Version
    try:
        a, b = parse(old.version), parse(new.version)
    except Exception:  # versions the parser cannot read are just different
        return "changed"
    return "upgrade" if a < b else "downgrade" if b < a else "changed"


def _cuda_of(pkg: LockedPackage | None) -> str | None:
    if pkg is None:
        return None
    text = pkg.build if pkg.manager == "conda" else pkg.version.partition("+")[2]
    line = _cuda_line(text)
    return "CPU" if pkg.manager == "conda" and "cpu" in text else f"CUDA {line}" if line else None


def _change(old: LockedPackage | None, new: LockedPackage | None, kind: str) -> PackageChange:
    shown = new or old
    assert shown is not None
    note = ""
    if shown.name.lower() in ("pytorch", "torch"):
        before, after = _cuda_of(old), _cuda_of(new)
        moved = old is not None and new is not None and before != after
        note = f"{before or '?'} -> {after or '?'}" if moved else (after or before or "")
    return PackageChange(
        name=shown.name, manager=shown.manager, change=kind,
        old_version=old.version if old else None, old_build=old.build if old else None,
        new_version=new.version if new else None, new_build=new.build if new else None,
        note=note,
    )


def diff_platform(old: LockData, new: LockData, platform: str) -> PlatformDiff:
    """The changes of ``platform`` from ``old`` to ``new``."""
    before, after = _index(old, platform), _index(new, platform)
    added = [_change(None, after[k], "added") for k in after.keys() - before.keys()]
    removed = [_change(before[k], None, "removed") for k in before.keys() - after.keys()]
    changed, same = [], []
    for k in before.keys() & after.keys():
        o, n = before[k], after[k]
        if (o.version, o.build) != (n.version, n.build):
            changed.append(_change(o, n, _compare(o, n)))
        else:
            same.append(_change(o, n, "unchanged"))
    in_old, in_new = platform in _platforms(old), platform in _platforms(new)
    return PlatformDiff(
        platform=platform, added=tuple(sorted(added, key=_sort_key)),
        removed=tuple(sorted(removed, key=_sort_key)),
        changed=tuple(sorted(changed, key=_sort_key)), unchanged_count=len(same),
        gpu_unchanged=tuple(sorted((c for c in same if c.gpu_relevant), key=_sort_key)),
        presence="both" if in_old and in_new else "added" if in_new else "removed",
        other_unchanged=tuple(sorted(c.label for c in same if not c.gpu_relevant)),
    )


def diff_locks(old: LockData, new: LockData) -> LockDiff:
    """Compare two locks platform by platform (old platforms first, then new ones)."""
    platforms = list(dict.fromkeys([*_platforms(old), *_platforms(new)]))
    return LockDiff(tuple(diff_platform(old, new, p) for p in platforms))


def diff_files(old: Path, new: Path) -> LockDiff:
    """Compare two lock files of any format (``pixi.lock#env`` picks an environment)."""
    from provisioner.lock.formats import read_any_lock

    return diff_locks(read_any_lock(old), read_any_lock(new))


# --- git ------------------------------------------------------------------------------------


def _git(project: Path, *args: str) -> processes.ProcResult:
    return processes.run(["git", *args], cwd=project, timeout=_GIT_TIMEOUT_S)


def _resolve_rev(project: Path, rev: str) -> str:
    if not rev or rev.startswith("-"):
        raise UserError(f"{rev!r} is not a git revision")
    found = _git(project, "rev-parse", "--verify", "--quiet", "--end-of-options",
                 f"{rev}^{{commit}}")
    if found.ok and found.stdout.strip():
        return found.stdout.strip()
    if not _git(project, "rev-parse", "--git-dir").ok:
        raise UserError(f"{project} is not inside a git repository",
                        hint="--git compares with a committed revision; pass two files instead")
    raise UserError(f"unknown git revision {rev!r}", hint="pass a commit, branch or tag, e.g. HEAD")


def _files_at(project: Path, commit: str, locks_dir: str) -> list[str]:
    listed = _git(project, "ls-tree", "--name-only", "-z", commit, "--", f"{locks_dir}/")
    if not listed.ok:
        raise UserError(f"git ls-tree failed: {listed.stderr.strip()[:200]}")
    return [name.rsplit("/", 1)[-1] for name in listed.stdout.split("\0") if name]


def _keys(names: Iterable[str]) -> set[str]:
    found = set()
    for stem in (n[: -len(_LOCK_SUFFIX)] for n in names if n.endswith(_LOCK_SUFFIX)):
        with contextlib.suppress(InvalidKeyError):
            found.add(validate_env_key(stem))
    return found


def _read_project_lock(locks_dir: Path, key: str) -> LockData:
    path = locks_dir / f"{key}{_LOCK_SUFFIX}"
    if not path.is_file():
        return _EMPTY
    return read_lockfile(path, check_hashes=False)


def _lock_at(project: Path, commit: str, locks_dir: str, names: list[str], key: str) -> LockData:
    """``key``'s lock at ``commit``, via a scratch copy."""
    name = f"{key}{_LOCK_SUFFIX}"
    if name not in names:
        return _EMPTY
    shown = _git(project, "show", f"{commit}:./{locks_dir}/{name}")
    if not shown.ok:
        raise UserError(f"git show of {locks_dir}/{name} failed: {shown.stderr.strip()[:200]}")
    with tempfile.TemporaryDirectory(prefix="provisioner-diff-") as scratch:
        fsops.atomic_write_text(Path(scratch) / name, shown.stdout)
        return _read_project_lock(Path(scratch), key)


def diff_git(
    config: Config, rev: str, keys: Sequence[str] | None = None
) -> list[tuple[str, LockDiff]]:
    """Compare the project's locks at git revision ``rev`` with the working tree.

    ``keys`` defaults to every key whose lockfile exists at ``rev`` or now.
    The pip layer is the locks' ``manager: pip`` entries.
    """
    project, locks = config.project, config.locks_dir.name
    if not project.is_dir():
        raise UserError(f"project directory {project} does not exist")
    commit = _resolve_rev(project, rev)
    names = _files_at(project, commit, locks)
    then = _keys(names)
    now = _keys(p.name for p in config.locks_dir.glob(f"*{_LOCK_SUFFIX}"))
    chosen = [validate_env_key(k) for k in keys] if keys else sorted(then | now)
    for key in chosen:
        if key not in then | now:
            raise UserError(f"no lockfile for {key} at {rev} or in {locks}/",
                            hint=f"known keys: {', '.join(sorted(then | now)) or 'none'}")
    return [
        (key, diff_locks(_lock_at(project, commit, locks, names, key),
                         _read_project_lock(config.locks_dir, key)))
        for key in chosen
    ]


# --- rendering ------------------------------------------------------------------------------


def _others_text(others: list[PackageChange]) -> str:
    kinds = {"changed": 0, "added": 0, "removed": 0}
    for c in others:
        kinds[c.change if c.change in ("added", "removed") else "changed"] += 1
    return ", ".join(f"{n} {k}" for k, n in kinds.items() if n)


def _platform_heading(pd: PlatformDiff) -> str:
    return pd.platform + {"added": " (new)", "removed": " (removed)"}.get(pd.presence, "")


def render_text(diff: LockDiff, title: str | None = None) -> list[str]:
    """Terminal lines: per platform the counts, each GPU-relevant change, a count of the rest."""
    lines = [title] if title else []
    for pd in diff.platforms:
        gpu = pd.gpu_changes()
        lines.append(f"{_platform_heading(pd)}: {pd.summary()}")
        width = max((len(c.label) for c in gpu), default=0)
        lines += [f"  {c.label:<{width}}  {_text(c.old_version, c.old_build)} -> "
                  f"{_text(c.new_version, c.new_build)}  {c.change_text()}" for c in gpu]
        if pd.gpu_unchanged:
            lines.append("  unchanged: " + ", ".join(
                f"{c.label} {_text(c.new_version, c.new_build)}" for c in pd.gpu_unchanged))
        if pd.other_unchanged:
            lines.append(f"  {len(pd.other_unchanged)} other unchanged: "
                         + ", ".join(pd.other_unchanged))
        others = pd.other_changes()
        if others:
            lines.append(f"  {len(others)} other package(s): {_others_text(others)}")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(changes: list[PackageChange]) -> list[str]:
    rows = ["| Package | Old | New | Change |", "| --- | --- | --- | --- |"]
    rows += [
        f"| {_cell(c.label)} | {_text(c.old_version, c.old_build, markdown=True)} | "
        f"{_text(c.new_version, c.new_build, markdown=True)} | {_cell(c.change_text())} |"
        for c in changes
    ]
    return rows


def render_markdown(diff: LockDiff, title: str) -> str:
    """A PR body: per changed platform a table of GPU-relevant changes, the rest folded."""
    out = [f"## {title}", ""]
    if not diff.has_changes:
        out += ["No package changed.", ""]
    for pd in diff.platforms:
        if not pd.has_changes:
            continue
        out += [f"### {_platform_heading(pd)}", "", pd.summary(), ""]
        gpu = pd.gpu_changes()
        out += [*_md_table(gpu), ""] if gpu else ["No GPU-relevant package changed.", ""]
        if pd.gpu_unchanged:
            out += ["Unchanged: " + ", ".join(
                f"{_cell(c.label)} {_text(c.new_version, c.new_build, markdown=True)}"
                for c in pd.gpu_unchanged), ""]
        others = pd.other_changes()
        if others:
            out += [f"<details><summary>{len(others)} other package(s): "
                    f"{_others_text(others)}</summary>", "", *_md_table(others), "",
                    "</details>", ""]
    return "\n".join(out)
