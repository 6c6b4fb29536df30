"""Env keys: the names of shared environments.

A key becomes a directory and file name on every platform, so it is checked
before any filesystem call: lower-case ASCII letters, digits, ``.``, ``_`` and
``-``, at most 64 characters, not starting with a dot or a dash, and not a name
that Windows reserves.
"""

from __future__ import annotations

import re

from provisioner.errors import InvalidKeyError

MAX_KEY_LENGTH = 64
_KEY_RE = re.compile(r"[a-z0-9_][a-z0-9._-]*")
_WINDOWS_RESERVED = {
    "con", "prn", "aux", "nul",
    *(f"com{i}" for i in range(10)),
    *(f"lpt{i}" for i in range(10)),
}


def validate_env_key(key: object) -> str:
    """Return ``key`` if it is a valid env key, else raise :class:`InvalidKeyError`."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError("env key must be a non-empty string")
    shown = ascii(key)
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"env key {shown} is longer than {MAX_KEY_LENGTH} characters")
    if not _KEY_RE.fullmatch(key):
        raise InvalidKeyError(
            f"env key {shown} is not valid",
            hint="use lower-case letters, digits, '.', '_' and '-', not starting with '.' or '-'",
        )
    if key.split(".")[0] in _WINDOWS_RESERVED:
        raise InvalidKeyError(f"env key {shown} is a reserved device name on Windows")
    if key.endswith("."):
        raise InvalidKeyError(f"env key {shown} ends with a dot, which Windows strips")
    return key
