"""What is installed, how healthy it is, and running commands in an env.

* :func:`list_envs`: shared envs (every generation) and legacy per-model venvs;
* :func:`health`: strict probes of shared envs, or of every legacy venv;
* :func:`prepare_run` / :func:`run_in_env`: a command with a model's env first on ``PATH``.

Everything returns plain data; the CLI renders it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from provisioner import fsops, processes
from provisioner.build.fingerprint import read_fingerprint
from provisioner.build.home_checks import is_real_directory
from provisioner.build.layout import HomeLayout, python_path, read_pointer
from provisioner.build.retention import generations
from provisioner.config import Config
from provisioner.errors import ProvisionerError, UserError
from provisioner.keys import validate_env_key
from provisioner.models.legacy import LegacyEnv, discover_legacy
from provisioner.models.migrate import human_bytes, iso_time
from provisioner.models.probe import Health
from provisioner.models.state import StateFile


def _plain(value: object) -> object:
    if isinstance(value, PlainRecord):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return {str(k): _plain(v) for k, v in value.items()} if isinstance(value, dict) else value


class PlainRecord:
    """Mixin for the frozen dataclasses below: ``to_dict`` gives JSON-ready plain data."""

    def to_dict(self) -> dict[str, object]:
        """Every field, paths as strings and tuples as lists."""
        return {k: _plain(v) for k, v in vars(self).items()}


@dataclass(frozen=True)
class SharedEnvRow(PlainRecord):
    """One generation of a shared env."""

    key: str
    generation: str
    active: bool
    prefix: Path
    size_bytes: int
    created_at: str | None
    last_used: str | None  # ISO 8601, like created_at
    models: tuple[str, ...]


@dataclass(frozen=True)
class LegacyRow(PlainRecord):
    """One legacy per-model venv."""

    model_id: str
    venv: Path
    size_bytes: int
    health: str  # healthy | degraded | broken | missing | unknown
    reasons: tuple[str, ...]
    cached: bool
    migration_target: str | None


@dataclass(frozen=True)
class Inventory(PlainRecord):
    """Every env provisioner knows about."""

    home: Path
    legacy_root: Path | None
    shared: tuple[SharedEnvRow, ...]
    legacy: tuple[LegacyRow, ...]


def _is_key(name: str) -> bool:
    try:
        return validate_env_key(name) == name
    except ProvisionerError:
        return False


def _built_keys(layout: HomeLayout) -> list[str]:
    found = layout.envs.iterdir() if is_real_directory(layout.envs) else iter(())
    return sorted(p.name for p in found if is_real_directory(p) and _is_key(p.name))


def _shared_rows(config: Config, state: StateFile) -> list[SharedEnvRow]:
    layout = HomeLayout(config.home)
    models = state.section("models")
    migrations = state.section("migrations")
    rows = []
    for key in _built_keys(layout):
        active = read_pointer(layout, key)
        for gen_dir in generations(layout, key):  # real dirs only: no links, nothing moved aside
            users = {m: e for m, e in models.items() if isinstance(e, dict)
                     and e.get("env_key") == key and e.get("source") == "shared"
                     and e.get("generation") == gen_dir.name}
            used = [float(e.get("last_used", 0)) for e in users.values()]
            moved = {m for m, e in migrations.items() if isinstance(e, dict)
                     and e.get("key") == key and e.get("generation") == gen_dir.name
                     and not _served_elsewhere_since(models.get(m), e, key, gen_dir.name)}
            fp = read_fingerprint(gen_dir)
            rows.append(SharedEnvRow(
                key, gen_dir.name, gen_dir.name == active, gen_dir, fsops.tree_size(gen_dir),
                fp.created_at if fp else None, iso_time(max(used)) if used else None,
                tuple(sorted(set(users) | moved)),
            ))
    return rows


def _served_elsewhere_since(last: object, migration: dict[str, object], key: str,
                            generation: str) -> bool:
    """Whether a model's last load, after its migration to ``key``, used another env.

    A migrated model belongs to its key from the migration on, even before its next load.
    """
    if not isinstance(last, dict) or (last.get("env_key"), last.get("generation")) == (
            key, generation):
        return False
    try:
        migrated_at = datetime.fromisoformat(str(migration.get("at"))).timestamp()
    except ValueError:
        return False
    # "at" is whole seconds; a load in the migration's own second came before it.
    return float(last.get("last_used", 0)) >= migrated_at + 1


def _legacy_health(config: Config, state: StateFile, env: LegacyEnv, *, probe: bool,
                   refresh: bool = False) -> tuple[Health, bool, str | None]:
    """(health, from the cache?, key); without a key a probe only checks that it runs."""
    from provisioner.models.resolve_cache import cached_health, cached_key

    key: str | None
    try:
        key, provides, imports = cached_key(config, state, env.model_id)
    except ProvisionerError:
        key, provides, imports = None, (), ()
    if not probe and not refresh:
        entry = state.section("health").get(str(env.venv))
        if isinstance(entry, dict) and isinstance(entry.get("result"), dict):
            return Health.from_dict(entry["result"]), True, key
        return Health("unknown", ("not probed yet",)), False, key
    return (*cached_health(config, state, env, provides, imports, refresh=refresh), key)


def list_envs(config: Config, *, probe: bool = True) -> Inventory:
    """Shared envs and legacy venvs, with sizes; legacy health from the cache, else a probe."""
    state = StateFile(HomeLayout(config.home).state_file)
    try:
        shared = _shared_rows(config, state)
        legacy = []
        for env in discover_legacy(config.legacy_root, config.legacy_models):
            health, cached, key = _legacy_health(config, state, env, probe=probe)
            legacy.append(LegacyRow(env.model_id, env.venv, fsops.tree_size(env.root),
                                    health.status, health.reasons, cached, key))
    finally:
        state.save()
    return Inventory(config.home, config.legacy_root, tuple(shared), tuple(legacy))


@dataclass(frozen=True)
class HealthRow:
    """A strict probe of one env."""

    kind: str  # shared | legacy
    name: str  # the key, or the legacy env's model id
    key: str | None
    path: Path | None
    health: Health

    @property
    def healthy(self) -> bool:
        """Whether the env passed the strict check."""
        return self.health.status == "healthy"

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "name": self.name, "key": self.key,
                "path": str(self.path) if self.path else None, **self.health.to_dict(),
                "checked_at": iso_time(self.health.checked_at)}


def _shared_health(config: Config, key: str) -> HealthRow:
    from provisioner.lock.spec import load_spec
    from provisioner.models.probe import probe_env
    from provisioner.models.resolve_cache import active_env

    spec = load_spec(config.specs_dir, validate_env_key(key))
    active = active_env(config, key)
    if active is None:
        return HealthRow("shared", key, key, None, Health(
            "missing", (f"no ready env; run 'provisioner ensure {key}'",)))
    prefix = active[0]
    health = probe_env(python_path(prefix), spec.provides, spec.imports,
                       timeout=config.probe_timeout, isolated=False)
    return HealthRow("shared", key, key, prefix, health)


def health(config: Config, key: str | None = None, *, legacy: bool = False) -> list[HealthRow]:
    """Strict probes: ``key``'s active env, every legacy venv (``legacy``), or all built keys."""
    if key is not None and legacy:
        raise UserError("give a key or --legacy, not both")
    if key is not None:
        return [_shared_health(config, key)]
    if not legacy:
        from provisioner.lock.spec import list_spec_keys

        specs = set(list_spec_keys(config.specs_dir))
        return [_shared_health(config, k) for k in _built_keys(HomeLayout(config.home))
                if k in specs]
    state = StateFile(HomeLayout(config.home).state_file)
    rows = []
    try:
        for env in discover_legacy(config.legacy_root, config.legacy_models):
            result, _cached, env_key = _legacy_health(config, state, env, probe=True,
                                                      refresh=True)
            rows.append(HealthRow("legacy", env.model_id, env_key, env.venv, result))
    finally:
        state.save()
    return rows


@dataclass(frozen=True)
class RunPlan(PlainRecord):
    """A command to run in a model's env: its python, environment and argv."""

    model_id: str
    key: str
    source: str
    python: Path
    prefix: Path
    path_prepend: tuple[str, ...]
    argv: tuple[str, ...]
    env: dict[str, str] = field(repr=False)
    generation: str | None = None

    def to_dict(self) -> dict[str, object]:
        """The plan without the (long, possibly secret) environment."""
        return {k: v for k, v in super().to_dict().items() if k != "env"}


def prepare_run(config: Config, model: str, argv: Sequence[str], *,
                is_windows: bool | None = None, policy: str | None = None,
                build: bool = True) -> RunPlan:
    """Resolve ``model``'s env and build the environment that puts its bin dir first on PATH."""
    from provisioner.models.resolve import get_env_for_model

    if not argv:
        raise UserError("no command to run", hint="provisioner run MODEL -- CMD [ARGS...]")
    windows = sys.platform == "win32" if is_windows is None else is_windows
    res = get_env_for_model(model, config=config, policy=policy, build=build)
    python, prefix = Path(res.python), Path(res.prefix)
    dirs = [python.parent]
    if windows and res.source == "shared":
        dirs += [prefix, prefix / "Library" / "bin", prefix / "Scripts"]
    prepend = tuple(dict.fromkeys(str(d) for d in dirs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"}
    env["PATH"] = os.pathsep.join([*prepend, env.get("PATH", os.defpath)])
    env["CONDA_PREFIX" if res.source == "shared" else "VIRTUAL_ENV"] = str(prefix)
    return RunPlan(model, res.env_key, res.source, python, prefix, prepend, tuple(argv), env,
                   res.generation if res.source == "shared" else None)


def run_in_env(config: Config, model: str, argv: Sequence[str], *, policy: str | None = None,
               build: bool = True) -> int:
    """Run ``argv`` in ``model``'s env with the terminal attached; return its exit code.

    A shared env's generation is leased for the whole run, and the command
    inherits the lease, so ``gc`` keeps that generation while the command runs,
    even if this process is killed first (:mod:`provisioner.build.leases`).
    """
    from provisioner.build.leases import Lease, acquire_lease

    plan = prepare_run(config, model, argv, policy=policy, build=build)
    held = (acquire_lease(config.home, plan.key, plan.generation) if plan.generation
            else Lease(plan.key, None))
    with held:
        fds = (held.fd,) if held.fd is not None and sys.platform != "win32" else ()
        return processes.run_passthrough(plan.argv, plan.env, pass_fds=fds)


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render_inventory_text(inv: Inventory) -> list[str]:
    """The inventory as aligned plain-text columns."""
    shared = [[r.key, r.generation, "*" if r.active else "", human_bytes(r.size_bytes),
               r.created_at or "?", r.last_used or "-", ",".join(r.models) or "-"]
              for r in inv.shared]
    legacy = [[r.model_id, r.health + (" (cached)" if r.cached else ""),
               human_bytes(r.size_bytes), r.migration_target or "?"] for r in inv.legacy]
    return [f"shared envs under {inv.home}:",
            *(_columns([["KEY", "GEN", "ACTIVE", "SIZE", "CREATED", "LAST USED", "MODELS"],
                        *shared])
              if shared else ["  (none)"]),
            f"legacy envs under {inv.legacy_root}:",
            *(_columns([["MODEL", "HEALTH", "SIZE", "TARGET"], *legacy])
              if legacy else ["  (none)"])]


def render_health_text(rows: Sequence[HealthRow]) -> list[str]:
    """One aligned line per probed env, reasons indented below."""
    if not rows:
        return ["nothing to check"]
    table = _columns([[r.health.status, r.kind, r.name, str(r.path or "")] for r in rows])
    lines = []
    for line, r in zip(table, rows, strict=True):
        lines.append(line)
        lines += [f"  {why}" for why in r.health.reasons]
    return lines
