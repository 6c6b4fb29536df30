"""The fingerprint of a built env: written last, it is what makes an env "ready".

tox 4 decides between reuse and rebuild the same way: the env records what it
was built from, and a mismatch with the current inputs means rebuild.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from provisioner import __version__
from provisioner.build.layout import FINGERPRINT_NAME, IN_PROGRESS_NAME

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Fingerprint:
    """What an env was built from."""

    key: str
    platform: str
    lock_hash: str
    generation: str
    backend: str
    backend_version: str
    tool_version: str
    created_at: str
    cuda_mismatch_allowed: bool = False
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def fingerprint_path(prefix: Path) -> Path:
    return prefix / FINGERPRINT_NAME


def in_progress_path(prefix: Path) -> Path:
    return prefix / IN_PROGRESS_NAME


def read_fingerprint(prefix: Path) -> Fingerprint | None:
    """The env's fingerprint, or ``None`` when it is missing, corrupt or of another schema."""
    try:
        data = json.loads(fingerprint_path(prefix).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        return None
    try:
        return Fingerprint(**data)
    except TypeError:
        return None


def write_fingerprint(prefix: Path, fingerprint: Fingerprint) -> None:
    """Write the fingerprint atomically, then drop the in-progress marker."""
    from provisioner import fsops

    text = json.dumps(fingerprint.to_dict(), indent=2, sort_keys=True) + "\n"
    fsops.atomic_write_text(fingerprint_path(prefix), text)
    fsops.remove_file(in_progress_path(prefix))


def mark_in_progress(prefix: Path, detail: str) -> None:
    """Mark ``prefix`` as being built (before the first byte of the env is written)."""
    from provisioner import fsops

    fsops.atomic_write_text(in_progress_path(prefix), detail + "\n")


def tool_version() -> str:
    return __version__
