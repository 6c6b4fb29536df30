"""Where everything lives under provisioner's home.

::

    <home>/
      envs/<key>/<gen>/        immutable generations (gen = short hash of the lock)
      envs/<key>/current       atomically written pointer: the active generation's name
      .staging/<key>.<gen>.<n>/  builds in progress (same filesystem as envs/)
      .trash/                  directories on their way out
      pkgs/                    shared package cache (rattler hardlinks from here)
      locks/<key>.lock         one OS file lock per key, outside every env
      state.json               models -> last resolution (written atomically)

Staging, trash and envs share one filesystem so that promotion is a rename.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from provisioner.keys import validate_env_key
from provisioner.lock.platforms import host_platform, is_windows_platform
from provisioner.paths import read_bytes_retrying

FINGERPRINT_NAME = ".provisioner-fingerprint.json"
IN_PROGRESS_NAME = ".provisioner-in-progress"
POINTER_NAME = "current"
GENERATION_LENGTH = 12


@dataclass(frozen=True)
class HomeLayout:
    """Paths under one provisioner home."""

    home: Path

    @property
    def envs(self) -> Path:
        return self.home / "envs"

    @property
    def staging(self) -> Path:
        return self.home / ".staging"

    @property
    def trash(self) -> Path:
        return self.home / ".trash"

    @property
    def package_cache(self) -> Path:
        return self.home / "pkgs"

    @property
    def locks(self) -> Path:
        return self.home / "locks"

    @property
    def state_file(self) -> Path:
        return self.home / "state.json"

    def key_dir(self, key: str) -> Path:
        return self.envs / validate_env_key(key)

    def generation_dir(self, key: str, generation: str) -> Path:
        return self.key_dir(key) / generation

    def pointer(self, key: str) -> Path:
        return self.key_dir(key) / POINTER_NAME

    def lock_file(self, key: str) -> Path:
        return self.locks / f"{validate_env_key(key)}.lock"

    def staging_prefix(self, key: str) -> str:
        """Staging dirs of ``key`` start with this (checked when cleaning up)."""
        return f"{validate_env_key(key)}."


def generation_name(lock_hash: str) -> str:
    """Short, stable name of the generation built from a lock's content hash."""
    return lock_hash[:GENERATION_LENGTH]


def python_path(prefix: Path, platform: str | None = None) -> Path:
    """The interpreter of a conda prefix (``python.exe`` at the root on Windows)."""
    plat = platform or host_platform()
    return prefix / "python.exe" if is_windows_platform(plat) else prefix / "bin" / "python"


def is_generation_name(value: str) -> bool:
    """Whether ``value`` can name a generation: one plain, visible path component."""
    return (bool(value) and len(value) <= 255 and value != POINTER_NAME
            and not value.startswith(".") and "\0" not in value
            and not any(sep in value for sep in ("/", "\\", ":")))


def read_pointer(layout: HomeLayout, key: str) -> str | None:
    """The active generation of ``key``, or ``None`` (also for a pointer that is not valid).

    A valid pointer is a regular file (never a link or a directory) holding one
    generation name; anything else reads as "no active generation", and
    ``build.home_checks.heal_pointer`` repairs it under the key's lock.
    """
    import stat

    path = layout.pointer(key)
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        value = read_bytes_retrying(path).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value if is_generation_name(value) else None
