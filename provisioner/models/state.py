"""provisioner's state: one versioned JSON file under the home, written atomically.

It remembers, per model, the last resolution (key, source, python, last used,
migration target), cached health-probe results of legacy venvs, and cached
lockfile hashes. It is a cache and a log, never the truth: a corrupt file is
moved aside and rebuilt, a newer one left alone; neither is fatal.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from provisioner.paths import read_bytes_retrying

log = logging.getLogger(__name__)
STATE_SCHEMA = 1
#: seconds a save waits for another process's save before giving up (the change is kept)
SAVE_LOCK_TIMEOUT_S = 10.0
_warned_newer: set[str] = set()
_warned_lock = threading.Lock()


def _empty() -> dict[str, Any]:
    return {"schema": STATE_SCHEMA, "models": {}, "health": {}, "lock_hashes": {},
            "rules": {}, "migrations": {}}


_DELETED = object()


class StateFile:
    """Load, change and save the state file.

    Reads take no lock. :meth:`save` is a read-modify-write under an OS lock
    (``state.json.lock``): it re-reads the file and applies only this
    instance's changes (:meth:`put`, :meth:`delete`), so concurrent processes
    lose no update. A file of a newer schema is never overwritten (this
    process works from an empty state and warns once); a corrupt one is moved
    aside (``state.json.corrupt-<UTC time>``) before a new one is written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.read_only = False
        self._changes: dict[tuple[str, str], Any] = {}
        self.data = self._load()
        self.dirty = False

    def _parse(self, raw: bytes) -> tuple[dict[str, Any], str]:
        """(data, verdict): verdict is ``ok``, ``newer`` or ``corrupt``."""
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        schema = data.get("schema") if isinstance(data, dict) else None
        if isinstance(schema, int) and not isinstance(schema, bool) and schema > STATE_SCHEMA:
            return _empty(), "newer"
        if not isinstance(data, dict) or schema != STATE_SCHEMA:
            return _empty(), "corrupt"
        base = _empty()
        for key, default in base.items():
            if not isinstance(data.get(key), type(default)):
                data[key] = default
        return data, "ok"

    def _warn_newer(self) -> None:
        self.read_only = True
        with _warned_lock:
            if str(self.path) in _warned_newer:
                return
            _warned_newer.add(str(self.path))
        log.warning("state file %s was written by a newer provisioner; it is left as it is "
                    "and nothing is cached in it", self.path)

    def _load(self) -> dict[str, Any]:
        try:
            raw = read_bytes_retrying(self.path)
        except FileNotFoundError:
            return _empty()
        except OSError as exc:
            log.warning("cannot read state file %s (%s); starting afresh", self.path, exc)
            return _empty()
        data, verdict = self._parse(raw)
        if verdict == "newer":
            self._warn_newer()
        elif verdict == "corrupt":
            log.warning("state file %s is corrupt or of another version; it will be moved "
                        "aside and rebuilt", self.path.name)
        return data

    def section(self, name: str) -> dict[str, Any]:
        """A top-level mapping of the state (created when missing); change it with :meth:`put`."""
        value = self.data.setdefault(name, {})
        assert isinstance(value, dict)
        return value

    def put(self, section: str, key: str, value: Any) -> None:
        """Set ``section[key]`` and mark the state for saving when it changed."""
        sec = self.section(section)
        if sec.get(key) != value:
            sec[key] = value
            self._changes[(section, key)] = value
            self.dirty = True

    def delete(self, section: str, key: str) -> None:
        """Remove ``section[key]`` (saved like a :meth:`put`)."""
        if self.section(section).pop(key, None) is not None:
            self._changes[(section, key)] = _DELETED
            self.dirty = True

    def _merge_and_write(self) -> None:
        from provisioner import fsops

        try:
            raw: bytes | None = read_bytes_retrying(self.path)
        except FileNotFoundError:
            raw = None
        fresh, verdict = self._parse(raw) if raw is not None else (_empty(), "ok")
        if verdict == "newer":
            self._warn_newer()
            return
        if verdict == "corrupt":
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            fsops.rename_with_retry(self.path, aside)
            log.warning("moved the corrupt state file aside to %s", aside.name)
        for (section, key), value in self._changes.items():
            sec = fresh.setdefault(section, {})
            if value is _DELETED:
                sec.pop(key, None)
            else:
                sec[key] = value
        fsops.atomic_write_text(self.path, json.dumps(fresh, indent=1, sort_keys=True))
        self.data = fresh
        self._changes.clear()
        self.dirty = False

    def save(self) -> None:
        """Apply this instance's changes to the file on disk. Failing to save only logs."""
        if not self.dirty or self.read_only:
            return
        from filelock import FileLock, Timeout

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.path) + ".lock", timeout=SAVE_LOCK_TIMEOUT_S,
                            is_singleton=False, thread_local=False, fallback_to_soft=False,
                            preserve_lock_file=True)
            with lock:
                self._merge_and_write()
        except Timeout:
            log.warning("could not save state file %s: another process holds its lock",
                        self.path)
        except OSError as exc:
            log.warning("could not save state file %s: %s", self.path, exc)


def stat_signature(path: Path) -> list[int] | None:
    """(size, mtime_ns, inode) of ``path``, or ``None`` when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]
