"""Which generations of a key ``gc`` keeps, and why.

Per key: the active generation, and the ``keep`` most recent other generations
(for rollback; ``[gc] keep = N`` in ``provisioner.toml``, default 1) are kept;
older ones may go, unless leased (:mod:`provisioner.build.leases`, checked by
``gc`` while it deletes). A key whose ``current`` pointer is not valid keeps
every generation until the pointer is healed (:func:`heal_pointer`, which a real
``gc`` does first under the key's lock).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from provisioner.build.fingerprint import fingerprint_path, read_fingerprint
from provisioner.build.home_checks import pointer_problem
from provisioner.build.layout import HomeLayout, is_generation_name, read_pointer


@dataclass(frozen=True)
class Verdict:
    """One generation: whether ``gc`` keeps it, and why."""

    path: Path
    keep: bool
    reason: str


def _age(prefix: Path) -> tuple[float, int]:
    """Sort key, oldest first: fingerprint ``created_at`` (else dir mtime), then mtime_ns."""
    fp = read_fingerprint(prefix)
    stamp_path = fingerprint_path(prefix) if fp is not None else prefix
    try:
        mtime_ns = os.stat(stamp_path).st_mtime_ns
    except OSError:
        mtime_ns = 0
    if fp is not None:
        try:
            return datetime.fromisoformat(fp.created_at).timestamp(), mtime_ns
        except ValueError:
            pass
    return mtime_ns / 1e9, mtime_ns


def generations(layout: HomeLayout, key: str) -> list[Path]:
    """The generation dirs of ``key``: its visible real directories (never links)."""
    try:
        entries = list(os.scandir(layout.key_dir(key)))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(Path(e.path) for e in entries
                  if is_generation_name(e.name) and e.is_dir(follow_symlinks=False))


def judge_generations(layout: HomeLayout, key: str, keep: int) -> list[Verdict]:
    """Every generation of ``key`` with its verdict, oldest first."""
    gens = generations(layout, key)
    problem = pointer_problem(layout, key)
    if problem is not None:
        why = f"the key's pointer is {problem}; kept until gc heals the pointer"
        return [Verdict(g, True, why) for g in gens]
    active = read_pointer(layout, key)
    others = sorted((g for g in gens if g.name != active), key=_age)
    recent = set(others[len(others) - keep:]) if keep > 0 else set()
    verdicts = []
    for gen in sorted(gens, key=_age):
        if gen.name == active:
            verdicts.append(Verdict(gen, True, "the active generation"))
        elif gen in recent:
            verdicts.append(Verdict(gen, True, f"one of the {keep} most recent previous "
                                               f"generation(s) kept for rollback ([gc] keep)"))
        else:
            verdicts.append(Verdict(gen, False, f"older than the {keep} previous "
                                                f"generation(s) kept for rollback"))
    return verdicts
