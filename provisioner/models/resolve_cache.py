"""Cached facts for the resolve hot path, keyed by the stat signatures of their inputs.

Model -> key (by every spec file's signature), a lock's content hash (by the
lockfile's), and a legacy venv's health (by its interpreter's, its base
interpreter's (``home =`` in ``pyvenv.cfg``) and site-packages' signatures,
with a TTL) live in the state file, so a repeated
resolution costs a few ``stat`` calls and no YAML, solver or subprocess.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from provisioner.build.fingerprint import read_fingerprint
from provisioner.build.home_checks import is_real_directory
from provisioner.build.layout import IN_PROGRESS_NAME, HomeLayout, python_path, read_pointer
from provisioner.config import Config
from provisioner.errors import ProvisionerError
from provisioner.lock.lockfile import lockfile_path
from provisioner.models.legacy import LegacyEnv, base_interpreter
from provisioner.models.probe import Health
from provisioner.models.state import StateFile, stat_signature


def _specs_signature(config: Config) -> list[object]:
    specs = config.specs_dir
    try:
        names = sorted(p.name for p in specs.iterdir() if p.suffix == ".yml")
    except OSError:
        return []
    return [[n, stat_signature(specs / n)] for n in names]


def cached_key(config: Config, state: StateFile, model_id: str) -> tuple[str, tuple[str, ...],
                                                                          tuple[str, ...]]:
    """Model -> (key, provides, imports), cached by the signature of every spec file."""
    signature = _specs_signature(config)
    entry = state.section("rules").get(model_id)
    if isinstance(entry, dict) and entry.get("sig") == signature:
        return entry["key"], tuple(entry["provides"]), tuple(entry["imports"])
    from provisioner.models.key_choice import key_for_model

    choice = key_for_model(config, model_id)
    state.put("rules", model_id, {"sig": signature, "key": choice.key,
                                  "provides": list(choice.provides),
                                  "imports": list(choice.imports), "rule": choice.rule})
    return choice.key, choice.provides, choice.imports


def cached_lock_hash(config: Config, state: StateFile, key: str, platform: str) -> str | None:
    """The lock's identity for ``platform``, cached by the lockfile's stat signature.

    The value is :func:`provisioner.build.plan.locked_hash`, the same identity that
    ``ensure`` writes into a fingerprint, so a ready env compares equal to it.
    """
    path = lockfile_path(config.locks_dir, key)
    signature = stat_signature(path)
    if signature is None:
        return None
    entry = state.section("lock_hashes").get(str(path))
    known: dict[str, str] = {}
    # "ids" (not the raw content hashes that older versions cached) per platform
    if isinstance(entry, dict) and entry.get("sig") == signature and \
            isinstance(entry.get("ids"), dict):
        known = dict(entry["ids"])
        if platform in known:
            return str(known[platform]) or None
    from provisioner.build.plan import locked_hash

    try:
        value = locked_hash(config, key, platform)
    except ProvisionerError:
        value = ""
    state.put("lock_hashes", str(path), {"sig": signature, "ids": {**known, platform: value}})
    return value or None


def active_env(config: Config, key: str) -> tuple[Path, str, str | None] | None:
    """(prefix, generation, lock hash it was built from) of the key's active generation."""
    layout = HomeLayout(config.home)
    gen = read_pointer(layout, key)
    if gen is None:
        return None
    prefix = layout.generation_dir(key, gen)
    # Never serve through a link: ensure refuses it or moves it aside (build.home_checks).
    if not all(map(is_real_directory, (layout.envs, prefix.parent, prefix))):
        return None
    fp = read_fingerprint(prefix)
    if fp is None or (prefix / IN_PROGRESS_NAME).exists():
        return None
    if not python_path(prefix, fp.platform).exists():
        return None
    return prefix, gen, fp.lock_hash


def cached_health(config: Config, state: StateFile, env: LegacyEnv, provides: tuple[str, ...],
                  imports: tuple[str, ...], *, refresh: bool = False) -> tuple[Health, bool]:
    """Health of a legacy venv: the cached verdict while the venv is unchanged and fresh."""
    base = base_interpreter(env.venv, env.layout)  # uninstalling it breaks the venv
    signature = [stat_signature(env.python) if env.python else None,
                 stat_signature(env.venv), _site_signature(env.venv),
                 list(provides), list(imports),
                 [str(base), stat_signature(base)] if base else None]
    entry = state.section("health").get(str(env.venv))
    now = time.time()
    if (not refresh and isinstance(entry, dict) and entry.get("sig") == signature
            and now - float(entry.get("at", 0)) < config.health_ttl):
        return Health.from_dict(entry["result"]), True
    from provisioner.models.probe import probe_env

    health = probe_env(env.python, provides, imports, timeout=config.probe_timeout)
    state.put("health", str(env.venv), {"sig": signature, "at": now, "result": health.to_dict()})
    return health, False


def _site_signature(venv: Path) -> list[object]:
    candidates = [venv / "Lib" / "site-packages"]
    lib = venv / "lib"
    with contextlib.suppress(OSError):
        candidates += [p / "site-packages" for p in lib.iterdir()]
    return [stat_signature(p) for p in candidates if p.exists()]
