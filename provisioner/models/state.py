"""provisioner's state: one versioned JSON file under the home, written atomically.

It remembers, per model, the last resolution (key, source, python, last used,
migration target), cached health-probe results of legacy venvs, and cached
lockfile hashes. It is a cache and a log, never the truth: a corrupt or
unknown-schema file is set aside and rebuilt, not fatal.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
STATE_SCHEMA = 1


def _empty() -> dict[str, Any]:
    return {"schema": STATE_SCHEMA, "models": {}, "health": {}, "lock_hashes": {},
            "rules": {}, "migrations": {}}


class StateFile:
    """Load, change and save the state file (last writer wins; writes are atomic)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = self._load()
        self.dirty = False

    def _load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _empty()
        except OSError as exc:
            log.warning("cannot read state file %s (%s); starting afresh", self.path, exc)
            return _empty()
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("schema") != STATE_SCHEMA:
            log.warning("state file %s is corrupt or of another version; rebuilding it",
                        self.path.name)
            return _empty()
        base = _empty()
        for key, default in base.items():
            if not isinstance(data.get(key), type(default)):
                data[key] = default
        return data

    def section(self, name: str) -> dict[str, Any]:
        """A top-level mapping of the state (created when missing)."""
        value = self.data.setdefault(name, {})
        assert isinstance(value, dict)
        return value

    def put(self, section: str, key: str, value: Any) -> None:
        """Set ``section[key]`` and mark the state for saving when it changed."""
        sec = self.section(section)
        if sec.get(key) != value:
            sec[key] = value
            self.dirty = True

    def save(self) -> None:
        """Write the state atomically if anything changed. Failing to save only logs."""
        if not self.dirty:
            return
        from provisioner import fsops

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.data, indent=1, sort_keys=True)
            fsops.atomic_write_text(self.path, text)
            self.dirty = False
        except OSError as exc:
            log.warning("could not save state file %s: %s", self.path, exc)


def stat_signature(path: Path) -> list[int] | None:
    """(size, mtime_ns, inode) of ``path``, or ``None`` when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]
