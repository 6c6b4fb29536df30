"""Move models off legacy per-model venvs onto shared envs, one verified step at a time.

For each legacy ``local_<id>/.venv``:

1. resolve the model's key (``models.yml``);
2. make sure the key's shared env is built (``ensure``);
3. probe that env *strictly* against the key's ``provides`` and ``imports``;
4. healthy: record the migration in the state file (section ``migrations``)
   and, only when asked, delete the legacy ``local_<id>`` directory;
   anything else (no rule, a failed build, an unhealthy env): keep the legacy
   env and say why.

:func:`plan_migration` answers what would happen without changing anything;
it is what ``--dry-run`` prints.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from provisioner import fsops
from provisioner.build.layout import HomeLayout
from provisioner.config import Config
from provisioner.errors import ProvisionerError, UserError
from provisioner.models.legacy import LEGACY_DIR_PREFIX, LegacyEnv, discover_legacy
from provisioner.models.state import StateFile

log = logging.getLogger("provisioner.models.migrate")
ADOPTED_ROLE = "legacy-adopted"


@dataclass(frozen=True)
class PlannedMigration:
    """What migrating one legacy env would do."""

    model_id: str
    legacy_dir: Path
    size_bytes: int
    key: str | None
    shared_state: str  # ready | stale | missing
    actions: tuple[str, ...]
    provides: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    problem: str | None = None  # why it cannot migrate at all (e.g. no rule)

    def to_dict(self) -> dict[str, object]:
        return {
            "model_id": self.model_id, "legacy_dir": str(self.legacy_dir),
            "size_bytes": self.size_bytes, "key": self.key, "shared_state": self.shared_state,
            "actions": list(self.actions), "problem": self.problem,
        }


@dataclass(frozen=True)
class MigrationPlan:
    """The plan for every selected legacy env; plain data."""

    legacy_root: Path | None
    delete_legacy: bool
    items: tuple[PlannedMigration, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "legacy_root": str(self.legacy_root) if self.legacy_root else None,
            "delete_legacy": self.delete_legacy,
            "items": [i.to_dict() for i in self.items],
        }


@dataclass(frozen=True)
class MigrationResult:
    """How migrating one legacy env went: ``migrated`` or ``kept``."""

    model_id: str
    key: str | None
    status: str
    reason: str
    legacy_dir: Path
    generation: str | None = None
    deleted: bool = False
    bytes_reclaimed: int = 0
    health: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "model_id": self.model_id, "key": self.key, "status": self.status,
            "reason": self.reason, "legacy_dir": str(self.legacy_dir),
            "generation": self.generation, "deleted": self.deleted,
            "bytes_reclaimed": self.bytes_reclaimed,
            "health": {**self.health, "checked_at": iso_time(self.health.get("checked_at"))}
            if self.health else None,
        }


@dataclass(frozen=True)
class MigrationReport:
    """What :func:`migrate` did (or, with ``dry_run``, only planned)."""

    plan: MigrationPlan
    dry_run: bool
    results: tuple[MigrationResult, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no legacy env had to be kept."""
        return all(r.status == "migrated" for r in self.results)

    @property
    def bytes_reclaimed(self) -> int:
        """Bytes freed by deleting legacy dirs."""
        return sum(r.bytes_reclaimed for r in self.results)

    def to_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run, "ok": self.ok, "bytes_reclaimed": self.bytes_reclaimed,
            "plan": self.plan.to_dict(), "results": [r.to_dict() for r in self.results],
        }


def _select(config: Config, model: str | None, all_: bool) -> list[LegacyEnv]:
    if (model is None) == (not all_):
        raise UserError("choose exactly one of a model or all legacy envs",
                        hint="pass --model MODEL or --all")
    found = discover_legacy(config.legacy_root, config.legacy_models)
    if model is None:
        return found
    chosen = [e for e in found if e.model_id == model]
    if not chosen:
        raise UserError(f"no legacy venv for model '{model}' under {config.legacy_root}",
                        hint="'provisioner list' shows the legacy envs that were found")
    return chosen


def shared_state(config: Config, key: str) -> str:
    """``ready`` (reusable as is), ``stale`` (an older generation is active) or ``missing``."""
    from provisioner.build.plan import make_plan

    try:
        plan = make_plan(config, key)
    except ProvisionerError:
        return "missing"
    if plan.action == "reuse":
        return "ready"
    return "stale" if plan.active_generation is not None else "missing"


def _plan_one(config: Config, env: LegacyEnv, delete_legacy: bool) -> PlannedMigration:
    from provisioner.models.key_choice import key_for_model

    size = fsops.tree_size(env.root)
    try:
        choice = key_for_model(config, env.model_id)
    except ProvisionerError as exc:
        return PlannedMigration(env.model_id, env.root, size, None, "missing",
                                (f"keep {env.root}: {exc.message}",), problem=exc.message)
    state = shared_state(config, choice.key)
    actions = [
        f"reuse shared env {choice.key}" if state == "ready"
        else f"{'rebuild' if state == 'stale' else 'build'} shared env {choice.key}",
        f"probe {choice.key} strictly ({len(choice.provides)} provides, "
        f"{len(choice.imports)} imports)",
        "record the migration in the state file",
        f"delete {env.root} ({human_bytes(size)})" if delete_legacy else f"keep {env.root}",
    ]
    return PlannedMigration(env.model_id, env.root, size, choice.key, state, tuple(actions),
                            choice.provides, choice.imports)


def plan_migration(config: Config, *, model: str | None = None, all_: bool = False,
                   delete_legacy: bool = False) -> MigrationPlan:
    """Plan migrating ``model``'s legacy venv (or ``all_`` of them); changes nothing."""
    envs = _select(config, model, all_)
    return MigrationPlan(config.legacy_root, delete_legacy,
                         tuple(_plan_one(config, e, delete_legacy) for e in envs))


def migrate(config: Config, *, model: str | None = None, all_: bool = False,
            dry_run: bool = False, delete_legacy: bool = False) -> MigrationReport:
    """Migrate legacy venvs to shared envs; a legacy env is only deleted when asked and safe."""
    plan = plan_migration(config, model=model, all_=all_, delete_legacy=delete_legacy)
    if dry_run:
        for item in plan.items:
            log.debug("plan %s: %s", item.model_id, "; ".join(item.actions))
        return MigrationReport(plan, dry_run=True)
    state = StateFile(HomeLayout(config.home).state_file)
    results = []
    try:
        for item in plan.items:
            results.append(_migrate_one(config, state, item, delete_legacy))
            state.save()
    finally:
        state.save()
    return MigrationReport(plan, dry_run=False, results=tuple(results))


def _kept(item: PlannedMigration, reason: str, generation: str | None = None,
          health: dict[str, object] | None = None) -> MigrationResult:
    log.warning("%s: keeping %s (%s)", item.model_id, item.legacy_dir, reason)
    return MigrationResult(item.model_id, item.key, "kept", reason, item.legacy_dir,
                           generation, health=health or {})


def _migrate_one(config: Config, state: StateFile, item: PlannedMigration,
                 delete_legacy: bool) -> MigrationResult:
    from provisioner.build.ensure import ensure
    from provisioner.models.probe import probe_env

    if item.key is None:
        return _kept(item, item.problem or "no env key for this model")
    log.info("%s: ensuring shared env %s (%s)", item.model_id, item.key, item.shared_state)
    try:
        built = ensure(config, item.key)
    except ProvisionerError as exc:
        return _kept(item, f"building {item.key} failed: {exc.message.splitlines()[0]}")
    log.info("%s: probing %s generation %s strictly", item.model_id, item.key, built.generation)
    health = probe_env(built.python, item.provides, item.imports,
                       timeout=config.probe_timeout, isolated=False)
    if health.status != "healthy":
        why = "; ".join(health.reasons) or "no reason given"
        return _kept(item, f"shared env {item.key} is {health.status}: {why}",
                     built.generation, health.to_dict())
    deleted, reclaimed, note = False, 0, ""
    if delete_legacy:
        try:
            reclaimed = _delete_legacy(config, item.legacy_dir)
            deleted = True
        except (ProvisionerError, OSError) as exc:
            note = f"; legacy dir not deleted: {exc}"
            log.warning("%s: could not delete %s: %s", item.model_id, item.legacy_dir, exc)
    state.put("migrations", item.model_id, {
        "key": item.key, "generation": built.generation,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "legacy_dir": str(item.legacy_dir), "deleted": deleted,
    })
    if deleted:
        venv = str(item.legacy_dir / ".venv")
        state.delete("health", venv)
    log.info("%s: migrated to %s generation %s%s", item.model_id, item.key, built.generation,
             f", deleted {item.legacy_dir} ({reclaimed} bytes)" if deleted else "")
    return MigrationResult(item.model_id, item.key, "migrated",
                           f"shared env {item.key} is healthy{note}", item.legacy_dir,
                           built.generation, deleted, reclaimed, health.to_dict())


def _delete_legacy(config: Config, directory: Path) -> int:
    """Delete one discovered ``local_<id>`` dir inside the legacy root; return its size."""
    root = config.legacy_root
    if root is None:
        raise UserError("no legacy root is configured")
    known = {e.root for e in discover_legacy(root, config.legacy_models)}
    if (directory not in known or directory.is_symlink()
            or not directory.name.startswith(LEGACY_DIR_PREFIX)
            or Path(os.path.realpath(directory)).parent != Path(os.path.realpath(root))):
        raise UserError(f"refusing to delete {directory}: not a legacy env inside {root}")
    started = time.monotonic()
    size = fsops.tree_size(directory)
    from provisioner.build.trash import discard

    fsops.write_marker(directory, ADOPTED_ROLE)
    try:  # one rename out of the legacy root: never a venv that lost its pyvenv.cfg
        gone = discard(HomeLayout(config.home), directory, stem=f"legacy.{directory.name}",
                       in_place_ok=True)
    except fsops.InUseError:
        fsops.remove_file(directory / fsops.MARKER_NAME)  # nothing moved: leave it as it was
        raise
    if gone.in_use and gone.trashed == directory:
        raise fsops.InUseError(directory, gone.in_use)
    if gone.in_use:
        log.warning("%d file(s) of %s are in use by another process; they stay in %s until "
                    "the next 'provisioner gc'", len(gone.in_use), directory, gone.trashed)
    log.info("deleted %s (%d bytes) in %.2f s", directory, size, time.monotonic() - started)
    return size


def iso_time(epoch: object) -> str | None:
    """An epoch time as ISO 8601 in UTC, to the second (None for none)."""
    if not isinstance(epoch, (int, float)) or not epoch:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def human_bytes(size: int | None) -> str:
    """``1.5 GiB``-style sizes for text output."""
    if size is None or size < 1024:
        return "?" if size is None else f"{size} B"
    value, units = size / 1024, ["KiB", "MiB", "GiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.1f} {units[0]}"


def render_plan_text(plan: MigrationPlan) -> list[str]:
    """The plan as plain lines for a terminal."""
    if not plan.items:
        return [f"no legacy envs under {plan.legacy_root}"]
    lines = []
    for item in plan.items:
        lines.append(f"{item.model_id}  ->  {item.key or '?'}  [shared env {item.shared_state}]"
                     f"  {item.legacy_dir} ({human_bytes(item.size_bytes)})")
        lines += [f"  - {action}" for action in item.actions]
    return lines


def render_report_text(report: MigrationReport) -> list[str]:
    """The report as plain lines for a terminal."""
    if report.dry_run:
        return ["dry run: nothing changed", *render_plan_text(report.plan)]
    if not report.results:
        return [f"no legacy envs under {report.plan.legacy_root}"]
    lines = []
    for r in report.results:
        extra = f", deleted {r.legacy_dir} ({human_bytes(r.bytes_reclaimed)})" if r.deleted else ""
        lines.append(f"{r.status:8} {r.model_id} -> {r.key or '?'}: {r.reason}{extra}")
    lines.append(f"reclaimed {human_bytes(report.bytes_reclaimed)}")
    return lines
